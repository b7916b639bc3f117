"""Masked-diffusion language models: our small transformer and an adapter for transformers MLMs.

Model interface used by the masked samplers (docs/first_hitting.md):

    network(input_ids: Long[B, L], time: Float[B] | None) -> logits: Float[B, L, K']

``K'`` is the vocabulary the network scores; the mask id (and any ``exclude_ids``) are forced to
probability zero by the sampler. A time-agnostic network (MDLM default; Zheng et al. 2024, sec. 3) ignores ``time``.

``masked_lm_model(...)`` packs a network into a ``LoadedModel`` of kind ``"masked_lm"`` whose
``extras`` hold: ``network``, ``mask_token_id``, ``length`` (default sequence length),
``tokenizer`` (``encode(str) -> list[int]``, ``decode(list[int]) -> str``), ``exclude_ids``
(token ids never sampled besides the mask) and ``time_conditioning`` (bool).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .loading import LoadedModel


class CharTokenizer:
    """Character-level tokenizer over a fixed alphabet; the mask id is ``len(alphabet)``.

    Characters outside the alphabet encode as ``unknown`` (a space by default).
    """

    def __init__(self, alphabet: str, unknown: str = " "):
        if not isinstance(alphabet, str) or len(alphabet) < 2 or len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must be a string of at least 2 distinct characters")
        if unknown not in alphabet:
            raise ValueError(f"unknown character {unknown!r} must be in the alphabet")
        self.alphabet = alphabet
        self.index = {c: i for i, c in enumerate(alphabet)}
        self.unknown = unknown
        self.mask_token_id = len(alphabet)

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        unk = self.index[self.unknown]
        return [self.index.get(c, unk) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] if 0 <= i < len(self.alphabet) else "_" for i in (int(j) for j in ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"alphabet": self.alphabet, "unknown": self.unknown}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        data = json.loads(Path(path).read_text())
        return cls(data["alphabet"], data.get("unknown", " "))


class MaskedDiffusionTransformer(ModelMixin, ConfigMixin):
    """Bidirectional transformer denoiser mu(x)[i, :] over ``vocab_size`` real tokens (MDLM "subs").

    Input ids range over 0..vocab_size (vocab_size is the mask id). Time-agnostic: ``time`` is
    accepted and ignored (Zheng et al. 2024, sec. 3: the optimal denoiser does not depend on t).
    A residual depthwise convolution (width ``conv_kernel``) over the embeddings gives every
    position its neighbours from the first step of training (characters depend mostly on nearby
    ones); the transformer blocks then mix globally. Output logits: (B, L, vocab_size).
    """

    @register_to_config
    def __init__(self, vocab_size: int = 96, max_length: int = 64, d_model: int = 128, num_layers: int = 3,
                 num_heads: int = 4, ff_mult: int = 2, dropout: float = 0.0, conv_kernel: int = 5):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.token_emb = nn.Embedding(vocab_size + 1, d_model)
        self.pos_emb = nn.Embedding(max_length, d_model)
        self.local = nn.Conv1d(d_model, d_model, conv_kernel, padding=conv_kernel // 2, groups=d_model) if conv_kernel > 1 else None
        layer = nn.TransformerEncoderLayer(d_model, num_heads, ff_mult * d_model, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    @property
    def mask_token_id(self) -> int:
        return int(self.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"sequence length {length} exceeds the model's max_length {self.config.max_length}")
        pos = torch.arange(length, device=input_ids.device)
        h = self.token_emb(input_ids) + self.pos_emb(pos)  # (B, L, D)
        if self.local is not None:
            h = h + self.local(h.transpose(1, 2)).transpose(1, 2)  # (B, L, D) neighbour mixing
        h = self.norm(self.blocks(h))
        return self.head(h)  # (B, L, K)


TIME_ARG_NAMES = ("timesteps", "sigma", "time", "t")


class HFMaskedLMAdapter(nn.Module):
    """A transformers masked LM (``AutoModelForMaskedLM``) as a masked-diffusion network.

    Returns ``.logits`` (B, L, V_hf). ``attention_mask`` is passed only when the model's forward
    takes one. A forward with a time argument (``timesteps``/``sigma``/...; e.g. MDLM's hub code)
    gets sigma(t) when the model is time-conditioned and zeros otherwise (MDLM's convention for
    time-agnostic checkpoints).
    """

    def __init__(self, model: nn.Module, time_conditioning: bool = False):
        super().__init__()
        self.model = model
        self.time_conditioning = bool(time_conditioning)
        params = inspect.signature(model.forward).parameters
        self.takes_attention_mask = "attention_mask" in params
        self.time_arg = next((n for n in TIME_ARG_NAMES if n in params), None)
        if self.time_conditioning and self.time_arg is None:
            raise ValueError(f"{type(model).__name__} is time-conditioned but its forward takes none of {TIME_ARG_NAMES}")

    def forward(self, input_ids: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if self.takes_attention_mask:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        if self.time_arg is not None:
            if self.time_conditioning:
                if time is None:
                    raise ValueError("time-conditioned masked LM called without a time input")
                kwargs[self.time_arg] = torch.as_tensor(time, device=input_ids.device).reshape(-1).expand(input_ids.shape[0])
            else:
                kwargs[self.time_arg] = torch.zeros(input_ids.shape[0], device=input_ids.device)
        out = self.model(**kwargs)
        if hasattr(out, "logits"):
            return out.logits
        return out if torch.is_tensor(out) else out[0]


def masked_lm_model(name: str, network: nn.Module, *, mask_token_id: int, length: int, tokenizer,
                    exclude_ids: tuple = (), time_conditioning: bool = False, **extras) -> LoadedModel:
    """A LoadedModel of kind "masked_lm" (see the module docstring for the extras it carries)."""
    if hasattr(network, "eval"):
        network.eval()
    return LoadedModel(
        name=name,
        kind="masked_lm",
        event_shape=(int(length),),
        extras={"network": network, "mask_token_id": int(mask_token_id), "length": int(length),
                "tokenizer": tokenizer, "exclude_ids": tuple(int(i) for i in exclude_ids),
                "time_conditioning": bool(time_conditioning), **extras},
    )


def load_mdm_folder(path: str | Path, name: str | None = None) -> LoadedModel:
    """Our MaskedDiffusionTransformer saved by `gensample train mdm` (config.json, weights, tokenizer.json)."""
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "tokenizer.json").exists():
        raise ValueError(f"{path} is not a masked-diffusion model folder (needs config.json and tokenizer.json)")
    net = MaskedDiffusionTransformer.from_pretrained(path)
    tok = CharTokenizer.load(path / "tokenizer.json")
    if tok.vocab_size != net.config.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tok.vocab_size} symbols but the network {net.config.vocab_size}")
    return masked_lm_model(name or str(path), net, mask_token_id=net.mask_token_id, length=net.config.max_length,
                           tokenizer=tok)


class _HFTokenizer:
    """encode/decode wrapper over a transformers tokenizer (no special tokens added)."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        mask = self.tok.mask_token_id
        return self.tok.decode([int(i) for i in ids if int(i) != mask], skip_special_tokens=False)


def _needs_remote_code(err: Exception) -> bool:
    return "trust_remote_code" in str(err)


def load_hf_masked_lm(path: str, length: int = 64, trust_remote_code: bool = False) -> LoadedModel:
    """``--model mlm:PATH``: a local transformers masked-LM folder (model + tokenizer), no download.

    ``trust_remote_code`` is always passed explicitly (transformers never prompts). A folder whose
    model needs its own code loads without it only as far as the tokenizer; the network is built
    when the sampler runs with ``--trust-remote-code`` (the ``materialize`` hook), else exit 2.
    """
    try:
        from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a test extra
        raise ValueError("--model mlm:PATH needs the `transformers` package") from err
    if not Path(path).is_dir():
        raise ValueError(f"--model mlm:{path}: not a local folder (hub downloads are not supported here)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as err:
        raise ValueError(f"--model mlm:{path}: cannot load a tokenizer there ({err})") from err
    if tok.mask_token_id is None:
        raise ValueError(f"--model mlm:{path}: the tokenizer ({type(tok).__name__}) has no mask token, so it cannot "
                         "act as a masked diffusion model; for MDLM checkpoints (GPT-2 tokenizer + appended mask id) "
                         "use --model mdlm:PATH")
    special = tuple(i for i in tok.all_special_ids if i != tok.mask_token_id)
    name = f"mlm:{path}"

    def build(trust: bool):
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
            model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
        except (OSError, ValueError) as err:
            if _needs_remote_code(err) and not trust:
                raise ValueError(f"--model {name}: this model ships its own modeling code; rerun with "
                                 "--trust-remote-code to allow it to run") from err
            raise ValueError(f"--model {name}: cannot load a masked LM there ({err})") from err
        timed = bool(getattr(config, "time_conditioning", False))
        max_len = getattr(config, "max_position_embeddings", None)
        default_len = getattr(config, "model_length", None) or (min(length, max_len) if max_len else length)
        return HFMaskedLMAdapter(model, time_conditioning=timed), timed, max_len, int(default_len)

    try:
        net, timed, max_len, default_len = build(bool(trust_remote_code))
    except ValueError as err:
        if trust_remote_code or not _needs_remote_code(err.__cause__ or err):
            raise
        loaded = masked_lm_model(name, nn.Identity(), mask_token_id=tok.mask_token_id, length=length,
                                 tokenizer=_HFTokenizer(tok), exclude_ids=special, max_length=None)

        def materialize(trust: bool) -> None:
            if loaded.extras.get("network_ready"):
                return
            if not trust:
                raise ValueError(f"--model {name}: this model ships its own modeling code; rerun with "
                                 "--trust-remote-code to allow it to run")
            net, timed, max_len, default_len = build(True)
            net.eval()
            loaded.extras.update(network=net, time_conditioning=timed, max_length=max_len, length=default_len,
                                 network_ready=True)
            loaded.event_shape = (default_len,)

        loaded.extras["materialize"] = materialize
        return loaded
    return masked_lm_model(name, net, mask_token_id=tok.mask_token_id, length=default_len,
                           tokenizer=_HFTokenizer(tok), exclude_ids=special, max_length=max_len,
                           time_conditioning=timed)


# -- diffusion LMs with a transformers tokenizer (LLaDA, Dream, DiffusionGemma) -------------------------------
class DLMTokenizer:
    """A transformers tokenizer as the block sampler needs it.

    ``encode(text)``: ids without special tokens (pieces of an ``--infill`` template); ``encode_prompt(text,
    chat)``: the prompt as the model expects it: the chat template with a generation prompt when ``chat`` is
    true and the tokenizer has one, else the text with the tokenizer's own special tokens (BOS);
    ``decode(ids)``: text of ids, mask and padding ids dropped; ``eos_ids``: ids that end a generation."""

    def __init__(self, tok, mask_token_id: int, eos_ids=(), pad_token_id: int | None = None):
        self.tok = tok
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        ids = []
        for i in [tok.eos_token_id, *eos_ids]:
            ids.extend(i if isinstance(i, (list, tuple)) else [i])
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in ids if i is not None))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.tok.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str, chat: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        if chat and self.has_chat_template:
            out = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return [int(i) for i in ids]
        return [int(i) for i in self.tok(text)["input_ids"]]

    def decode(self, ids) -> str:
        drop = {self.mask_token_id, self.pad_token_id}
        return self.tok.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

    def decode_until_eos(self, ids) -> str:
        """Text of ids up to (not including) the first EOS id."""
        out = []
        for i in (int(j) for j in ids):
            if i in self.eos_ids:
                break
            out.append(i)
        return self.decode(out)


def load_local_tokenizer(folder: str | Path, spec: str):
    """The transformers tokenizer of a local folder, without running the folder's own code: AutoTokenizer;
    for a folder whose tokenizer class is remote code (Dream's DreamTokenizer), the generic fast
    tokenizer from tokenizer.json or Qwen2's BPE tokenizer from vocab.json + merges.txt."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json, whose custom fields it warns about
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        first = err
    finally:
        hf_logging.set_verbosity(level)
    try:
        if (folder / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            from transformers import Qwen2Tokenizer

            return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {spec}: cannot load the tokenizer in {folder} ({err})") from err
    raise ValueError(f"--model {spec}: cannot load the tokenizer in {folder} ({first})")


def dlm_model(name: str, network: nn.Module, tok: DLMTokenizer, *, family: str, logits_size: int,
              max_length: int | None, network_cached: nn.Module | None = None, **extras) -> LoadedModel:
    """LoadedModel of kind "masked_lm" for a diffusion LM with a transformers tokenizer.

    Extras besides ``masked_lm_model``'s: ``family`` ("llada", "dream", "diffusion_gemma"),
    ``eos_token_ids``, ``pad_token_id``, ``network_cached`` (a network taking ``block=(start, end)``:
    LLaDA/Dream's opt-in prefix cache, DiffusionGemma's encoder cache) and ``block_sampler`` (True).
    Ids the tokenizer never produces (``len(tokenizer)`` up to the logits size) are excluded from draws."""
    vocab = len(tok)
    exclude = tuple(i for i in range(vocab, int(logits_size)) if i != tok.mask_token_id)
    return masked_lm_model(name, network, mask_token_id=tok.mask_token_id, length=min(64, max_length or 64),
                           tokenizer=tok, exclude_ids=exclude, max_length=max_length, family=family,
                           eos_token_ids=tok.eos_ids, pad_token_id=tok.pad_token_id,
                           network_cached=network_cached, block_sampler=True, **extras)
