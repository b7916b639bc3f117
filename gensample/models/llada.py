"""LLaDA / LLaDA-Instruct (Nie et al. 2025, "Large Language Diffusion Models", arXiv 2502.09992) in plain PyTorch.

LLaDA's mask predictor p_theta(x_0 | x_t) (paper sec. 2.1, eq. 3) is a LLaMA-style transformer without a
causal mask: pre-norm RMSNorm blocks, rotary position embeddings (Su et al. 2021, eq. 34 in the
"rotate half" layout), SwiGLU feed-forward (out = W_out(silu(W_ff h) * W_up h)) and grouped-query
attention. Every position attends to every position; the mask token (id 126336 in the release) is an
ordinary input id, and the logits at position i score x_0^i directly (no shift).

The modules below keep the release's state-dict names (``model.transformer.wte``,
``model.transformer.blocks.{i}.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj,
ff_out}``, ``model.transformer.ln_f``, ``model.transformer.ff_out``), so a released folder
(``config.json`` + ``model*.safetensors``) loads with ``load_state_dict(strict=True)``.

Shared pieces (RMSNorm, rotary tables, bidirectional attention with an optional prefix of cached
keys/values, the prefix cache) are used by ``gensample.models.dream`` too.

Prefix cache (Fast-dLLM, Wu et al. 2025, arXiv 2505.22618, sec. 3.2): at the first call of a block the
whole sequence is run and every layer's keys/values of the positions before the block are kept; later
calls inside the same block recompute only the block and what follows it, attending to the kept
prefix keys/values. With bidirectional attention the prefix's keys/values depend on the tokens of the
block, which change while the block is decoded, so the cached call is an approximation; it is exact
at the refresh call and whenever the block's tokens equal those at the refresh (tested). It is
therefore opt-in (``--block-cache prefix``), never the default network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .loading import LoadedModel

# LLaDA's config defaults (the release's ModelConfig) for keys a config.json may omit
LLADA_DEFAULTS = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1, "alibi": False, "rope": False,
    "rope_full_precision": True, "multi_query_attention": None, "attention_layer_norm": False,
    "input_emb_norm": False, "layer_norm_type": "default", "layer_norm_with_affine": True, "rms_norm_eps": 1e-5,
    "max_sequence_length": 1024, "rope_theta": 10000.0, "include_qkv_bias": False, "include_bias": False,
    "bias_for_layer_norm": None, "scale_logits": False, "vocab_size": 50257, "embedding_size": 50304,
    "weight_tying": True, "eos_token_id": 50256, "pad_token_id": 50256, "mask_token_id": 50256,
}
LLADA_ACTIVATIONS = ("silu", "gelu", "relu")


# -- shared math --------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) (+ b), the normalisation in float32 (Zhang & Sennrich 2019, eq. 4).

    ``gemma=True`` scales by (1 + w) instead of w. Parameters are named ``weight`` / ``bias`` as in
    the LLaDA and Dream releases."""

    def __init__(self, size: int, eps: float, affine: bool = True, bias: bool = False, gemma: bool = False):
        super().__init__()
        self.eps = float(eps)
        self.gemma = bool(gemma)
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        x = xf.to(dtype)
        if self.weight is None:
            return x
        scale = (1 + self.weight) if self.gemma else self.weight
        return scale * x + self.bias if self.bias is not None else scale * x


def rope_tables(length: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """sin, cos of the angles m * theta^(-2i/d) for positions m < length, float32, shape (1, 1, length, head_dim)
    (RoFormer eq. 34 with the two halves of the head concatenated, as LLaMA/Qwen implement it)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.sin()[None, None], angles.cos()[None, None]


def apply_rope(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, d) by the tables of its T positions: t cos + rotate_half(t) sin."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


def bidirectional_attention(q, k, v) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with no mask (every query sees every key); k/v heads repeated for GQA.
    q: (B, H, Tq, d); k, v: (B, Hkv, Tk, d)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)


def attend(q, k, v, *, n_heads: int, n_kv_heads: int, sin, cos, past=None, rope_float32: bool = False):
    """Multi-head bidirectional attention of the rows (B, T, H*d) given as projections, with rotary
    embeddings at their absolute positions (``sin``/``cos`` already sliced to those positions for q;
    the tables must cover past + T positions for k).

    past: (k, v) of the earlier positions (B, Hkv, P, d), already rotated, or None.
    Returns (output (B, T, H*d), (k, v) of these T rows after rotation, for a cache)."""
    bsz, length, _ = q.shape
    head_dim = q.shape[-1] // n_heads
    q = q.view(bsz, length, n_heads, head_dim).transpose(1, 2)
    k = k.view(bsz, length, n_kv_heads, head_dim).transpose(1, 2)
    v = v.view(bsz, length, n_kv_heads, head_dim).transpose(1, 2)
    start = 0 if past is None else past[0].shape[2]
    s, c = sin[:, :, start:start + length], cos[:, :, start:start + length]
    if rope_float32:
        q, k = apply_rope(q.float(), s, c).to(q.dtype), apply_rope(k.float(), s, c).to(k.dtype)
    else:
        s, c = s.to(q.dtype), c.to(q.dtype)
        q, k = apply_rope(q, s, c), apply_rope(k, s, c)
    new_kv = (k, v)
    if past is not None:
        k = torch.cat((past[0], k), dim=2)
        v = torch.cat((past[1], v), dim=2)
    out = bidirectional_attention(q, k, v)
    return out.transpose(1, 2).reshape(bsz, length, n_heads * head_dim), new_kv


# -- LLaDA ----------------------------------------------------------------------------------------
def llada_config(raw: dict) -> dict:
    """The release's config.json completed with LLaDA's defaults, checked for what this module implements."""
    cfg = {**LLADA_DEFAULTS, **{k: v for k, v in raw.items() if k in LLADA_DEFAULTS or k in ("model_type",)}}
    unsupported = []
    if cfg["block_type"] != "llama":
        unsupported.append(f"block_type={cfg['block_type']!r} (only 'llama')")
    if not cfg["rope"] or cfg["alibi"]:
        unsupported.append("position encoding other than rope")
    if cfg["activation_type"] not in LLADA_ACTIVATIONS:
        unsupported.append(f"activation_type={cfg['activation_type']!r} (allowed: {', '.join(LLADA_ACTIVATIONS)})")
    if cfg["layer_norm_type"] not in ("rms", "gemma_rms"):
        unsupported.append(f"layer_norm_type={cfg['layer_norm_type']!r} (allowed: rms, gemma_rms)")
    if cfg["block_group_size"] != 1:
        unsupported.append(f"block_group_size={cfg['block_group_size']} (only 1)")
    if cfg["attention_layer_norm"]:
        unsupported.append("attention_layer_norm=true")
    if unsupported:
        raise ValueError("LLaDA config not supported: " + "; ".join(unsupported))
    if cfg["d_model"] % cfg["n_heads"]:
        raise ValueError(f"LLaDA config: d_model ({cfg['d_model']}) must be divisible by n_heads ({cfg['n_heads']})")
    kv = cfg["n_kv_heads"]
    mqa = cfg["multi_query_attention"]
    if kv is None:
        kv = 1 if mqa else cfg["n_heads"]
    elif mqa is not None and kv != (1 if mqa else cfg["n_heads"]):
        raise ValueError("LLaDA config: multi_query_attention and n_kv_heads disagree")
    cfg["effective_n_kv_heads"] = int(kv)
    cfg["hidden"] = int(cfg["mlp_hidden_size"] or cfg["mlp_ratio"] * cfg["d_model"])
    cfg["logits_size"] = int(cfg["embedding_size"] or cfg["vocab_size"])
    return cfg


class LLaDALlamaBlock(nn.Module):
    """x + Attn(RMSNorm(x)), then + W_out(act(W_ff h) * W_up h) with h = RMSNorm(.) (the release's llama block)."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, hd = cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
        bias, qkv_bias = bool(cfg["include_bias"]), bool(cfg["include_bias"] or cfg["include_qkv_bias"])
        norm_bias = cfg["include_bias"] if cfg["bias_for_layer_norm"] is None else cfg["bias_for_layer_norm"]
        gemma = cfg["layer_norm_type"] == "gemma_rms"
        self.n_heads, self.n_kv_heads = cfg["n_heads"], cfg["effective_n_kv_heads"]
        self.rope_float32 = bool(cfg["rope_full_precision"])
        self.act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[cfg["activation_type"]]
        self.attn_norm = RMSNorm(d, cfg["rms_norm_eps"], cfg["layer_norm_with_affine"], bool(norm_bias), gemma)
        self.ff_norm = RMSNorm(d, cfg["rms_norm_eps"], cfg["layer_norm_with_affine"], bool(norm_bias), gemma)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_proj = nn.Linear(d, cfg["hidden"], bias=bias)
        self.up_proj = nn.Linear(d, cfg["hidden"], bias=bias)
        self.ff_out = nn.Linear(cfg["hidden"], d, bias=bias)

    def forward(self, x, sin, cos, past=None):
        h = self.attn_norm(x)
        att, kv = attend(self.q_proj(h), self.k_proj(h), self.v_proj(h), n_heads=self.n_heads,
                         n_kv_heads=self.n_kv_heads, sin=sin, cos=cos, past=past, rope_float32=self.rope_float32)
        x = x + self.attn_out(att)
        h = self.ff_norm(x)
        return x + self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h)), kv


class _LLaDABody(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["d_model"]
        gemma = cfg["layer_norm_type"] == "gemma_rms"
        norm_bias = cfg["include_bias"] if cfg["bias_for_layer_norm"] is None else cfg["bias_for_layer_norm"]
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(cfg["logits_size"], d),
            "blocks": nn.ModuleList(LLaDALlamaBlock(cfg) for _ in range(cfg["n_layers"])),
            "ln_f": RMSNorm(d, cfg["rms_norm_eps"], cfg["layer_norm_with_affine"], bool(norm_bias), gemma),
        })
        if not cfg["weight_tying"]:
            self.transformer["ff_out"] = nn.Linear(d, cfg["logits_size"], bias=bool(cfg["include_bias"]))


class LLaDANetwork(nn.Module):
    """LLaDA's mask predictor: ``forward(input_ids (B, L)) -> logits (B, L, embedding_size)``.

    ``layers(x, start, past)`` is the cache-aware core (see ``PrefixCachedNetwork``): it runs the rows
    ``x[:, start:]`` given the per-layer keys/values ``past`` of positions < start."""

    logit_shift = 0  # logits[:, i] score position i

    def __init__(self, config: dict):
        super().__init__()
        self.cfg = llada_config(config)
        self.model = _LLaDABody(self.cfg)
        self.head_dim = self.cfg["d_model"] // self.cfg["n_heads"]
        self.max_length = int(self.cfg["max_sequence_length"])

    def _check(self, input_ids):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")

    def layers(self, input_ids: torch.Tensor, start: int = 0, past=None, head_rows: tuple | None = None):
        """Logits of rows [start, L) (only rows start + a .. start + b with ``head_rows=(a, b)``) and each
        layer's (k, v) of rows [start, L)."""
        tr = self.model.transformer
        x = tr["wte"](input_ids[:, start:])
        if self.cfg["input_emb_norm"]:
            x = x * (self.cfg["d_model"] ** 0.5)
        sin, cos = rope_tables(input_ids.shape[1], self.head_dim, float(self.cfg["rope_theta"]), x.device)
        kvs = []
        for i, block in enumerate(tr["blocks"]):
            x, kv = block(x, sin, cos, None if past is None else past[i])
            kvs.append(kv)
        if head_rows is not None:
            x = x[:, head_rows[0]:head_rows[1]]
        x = tr["ln_f"](x)
        logits = F.linear(x, tr["wte"].weight) if self.cfg["weight_tying"] else tr["ff_out"](x)
        if self.cfg["scale_logits"]:
            logits = logits * (1 / math.sqrt(self.cfg["d_model"]))
        return logits, kvs

    def forward(self, input_ids: torch.Tensor, time=None) -> torch.Tensor:
        self._check(input_ids)
        return self.layers(input_ids)[0]


class PrefixCachedNetwork(nn.Module):
    """A network with Fast-dLLM's prefix cache, called as ``cached(x, block=(start, end))`` and returning the
    block's logits (B, end - start, K), each row scoring its own position (the block sampler's cached form).

    Let p = start - shift (shift = 1 for models whose raw logits at i score position i + 1, e.g. Dream;
    0 for LLaDA). At a refresh (new block, other batch shape or changed tokens before p) the whole
    sequence runs once (exact) and every layer's keys/values of positions < p are kept. Later calls
    for the same block run only rows >= p against the kept keys/values, and the output head only on
    the rows the block needs. Approximate while the block's tokens differ from the refresh's (module
    docstring of ``gensample.models.llada``); ``refreshes`` and ``calls`` count the two kinds.
    Without ``block`` it is the plain network."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.reset()

    def reset(self, seeds=None) -> None:
        """Forget the cache (``seeds`` is accepted for the common network interface and unused)."""
        self._key = None
        self._past = None
        self.refreshes = 0
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, time=None, block: tuple | None = None) -> torch.Tensor:
        net = self.network
        if block is None:
            return net(input_ids)
        start, end = int(block[0]), int(block[1])
        p = start - int(getattr(net, "logit_shift", 0))
        if p <= 0:
            return net(input_ids)[:, start:end]
        self.calls += 1
        rows = (0, end - start)  # raw rows p .. p + (end - start) score the block's positions
        prefix = input_ids[:, :p]
        if self._key is None or self._key[0] != (tuple(input_ids.shape), p) or not torch.equal(self._key[1], prefix):
            self.refreshes += 1  # one exact full pass; its keys/values of positions < p are kept
            logits, kvs = net.layers(input_ids, head_rows=(p, p + end - start))
            self._key = ((tuple(input_ids.shape), p), prefix.clone())
            self._past = [(k[:, :, :p], v[:, :, :p]) for k, v in kvs]
            return logits
        logits, _ = net.layers(input_ids, p, self._past, head_rows=rows)
        return logits


# -- loading --------------------------------------------------------------------------------------
def read_state_dict(folder: Path) -> dict:
    """Weights of a transformers-layout folder: ``model.safetensors`` or the shards named in
    ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)")


def load_weights(network: nn.Module, folder: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The folder's weights into ``network``, cast to ``dtype`` (default: the weights' own floating dtype).
    A network built on the meta device (``build_on_meta``) takes the loaded tensors as its parameters, so a
    7-8 B release is never materialised as a random float32 copy first."""
    state = read_state_dict(folder)
    if dtype is None:
        dtype = next(iter(state.values())).dtype if state else torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32
    try:
        on_meta = any(p.is_meta for p in network.parameters())
        missing, unexpected = network.load_state_dict(state, strict=False, assign=on_meta)
    except RuntimeError as err:  # a tensor whose shape config.json does not give
        msg = " ".join(str(err).split())
        raise ValueError(f"{folder}: the weights do not match the architecture in config.json ({msg})") from None
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the architecture in config.json "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return network.to(dtype).eval()


def build_llada(folder: str | Path, dtype: torch.dtype | None = None) -> LLaDANetwork:
    """LLaDANetwork with the weights of a released LLaDA folder (config.json + safetensors)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    return load_weights(build_on_meta(LLaDANetwork, cfg), folder, dtype)


def build_on_meta(cls, cfg: dict) -> nn.Module:
    """``cls(cfg)`` on the meta device: shapes only, no memory and no random initialisation (``load_weights``
    then assigns every parameter from the folder; a missing one is an error there)."""
    with torch.device("meta"):
        return cls(cfg)


# -- LoadedModel ------------------------------------------------------------------------------------------
def read_config(folder: Path, spec: str) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--model {spec}: {folder} is not a local folder (hub downloads are not supported here)")
    try:
        return json.loads((folder / "config.json").read_text())
    except OSError as err:
        raise ValueError(f"--model {spec}: {folder} has no readable config.json ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--model {spec}: {folder / 'config.json'} is not valid JSON ({err})") from None


def extra_eos_ids(tok, names=("<|eot_id|>", "<|im_end|>", "<|endoftext|>")) -> list[int]:
    """Ids of the end-of-turn / end-of-text tokens a tokenizer defines (EOS handling of Instruct models)."""
    vocab = tok.get_vocab()
    return [vocab[n] for n in names if n in vocab]


def load_llada(path: str, name: str | None = None) -> "LoadedModel":
    """``--model llada:DIR``: a LLaDA / LLaDA-Instruct folder in the release's layout (config.json with
    model_type "llada", model*.safetensors, the tokenizer files). The network is this module's
    plain-PyTorch LLaDA; the folder's own modeling code is never run."""
    spec = f"llada:{path}"
    raw = read_config(Path(path), spec)
    if raw.get("model_type") != "llada" and "LLaDAModelLM" not in (raw.get("architectures") or []):
        raise ValueError(f"--model {spec}: config.json describes model_type {raw.get('model_type')!r}, not a LLaDA "
                         "model (model_type 'llada')")
    try:
        net = build_llada(path)
    except ValueError as err:
        raise ValueError(f"--model {spec}: {err}") from None
    return bare_dlm_model(name or spec, net, path, spec, family="llada", mask_id=int(raw.get("mask_token_id", 126336)),
                          logits_size=net.cfg["logits_size"])


def bare_dlm_model(name: str, net, path: str, spec: str, *, family: str, mask_id: int, logits_size: int) -> "LoadedModel":
    """The masked-LM ``LoadedModel`` of a plain-PyTorch network (LLaDA, Dream) and the folder's tokenizer:
    EOS ids = config.json's eos_token_id and the end-of-turn tokens the tokenizer defines; pad = the
    tokenizer's pad id, else config.json's; ``block_cache="prefix"`` uses ``PrefixCachedNetwork``."""
    from .masked_lm import DLMTokenizer, dlm_model, load_local_tokenizer

    hf_tok = load_local_tokenizer(path, spec)
    eos = [net.cfg["eos_token_id"], *extra_eos_ids(hf_tok)]
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else net.cfg["pad_token_id"]
    tok = DLMTokenizer(hf_tok, mask_id, eos_ids=eos, pad_token_id=pad)
    return dlm_model(name, net, tok, family=family, logits_size=logits_size, max_length=net.max_length,
                     network_cached=PrefixCachedNetwork(net))


def register_bare_family(name: str, architecture: str, label: str, load) -> None:
    """A bare transformers-layout folder (config.json ``architectures`` = [architecture], no
    model_index.json) as a model family, for ``--model DIR`` detection (LLaDA, Dream)."""
    from .loading import Family, register_family

    def load_folder(folder, index, comps, name_, spec, variant):
        if variant is not None:
            raise ValueError(f"--model {spec}: --weights-variant does not apply to {label} folders")
        return load(str(folder), name=name_)

    register_family(Family(name=name, detect=lambda cls, comps: cls == architecture and not comps,
                           load_folder=load_folder))


register_bare_family("llada", "LLaDAModelLM", "LLaDA", lambda path, name: load_llada(path, name=name))
