"""MDLM's diffusion transformer (DiT) in plain PyTorch, and ``--model mdlm:PATH_OR_ID``.

Sahoo et al., "Simple and Effective Masked Diffusion Language Models", NeurIPS 2024
(arXiv 2406.07524), released as ``kuleshov-group/mdlm-owt``. The network is a DiT (Peebles & Xie
2023) over token embeddings with rotary position embeddings (Su et al. 2021) and adaLN
conditioning on the noise level sigma. Attention is ``torch.nn.functional.scaled_dot_product_attention``
(no flash-attn), so it runs on CPU and any GPU.

Parameter names equal the release's, so both release containers load strictly:
  * hub / ``save_pretrained`` folder: ``config.json`` (``hidden_dim, cond_dim, n_blocks, n_heads,
    model_length, vocab_size, time_conditioning``) + ``model.safetensors`` with keys ``backbone.*``;
  * Lightning ``.ckpt``: ``{"state_dict": {"backbone.*": ...}, "hyper_parameters": {"config": ...},
    "ema": {"shadow_params": [...]}}``; the EMA weights (what MDLM evaluates with) are used when
    present. The pickle is read by a restricted unpickler: tensors and plain containers only,
    every other object (the hydra config, the pickled tokenizer) becomes inert data.

Block b (code name -> meaning), x: (B, L, H), c = silu(sigma_map(sigma)): (B, C):
    adaLN_modulation(c) -> shift/scale/gate for attention and MLP (6 H)
    norm1, norm2        weight-only LayerNorm in float32
    attn_qkv, attn_out  bias-free projections; rotary on q and k (non-interleaved halves)
    mlp                 Linear(H, 4H) - GELU(tanh) - Linear(4H, H)
Output: ``output_layer`` (adaLN shift/scale, LayerNorm, Linear(H, V)). Logits (B, L, V) with
V = vocab_size including the mask id (MDLM: mask = V - 1 = 50257 for GPT-2); the sampler gives
the mask logit probability zero ("subs" parameterisation, MDLM eq. 8-9).

Time: MDLM's released models are time-agnostic (``time_conditioning: false``): the network gets
sigma = 0 whatever t is (MDLM ``_process_sigma``). Time-conditioned checkpoints get
sigma(t) = -log alpha_t of their noise schedule.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .loading import LoadedModel

FREQ_DIM = 256  # sinusoidal frequency features of sigma (MDLM TimestepEmbedder)
HUB_CONFIG_KEYS = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
# MDLM noise types -> our masking schedules (docs/first_hitting.md)
NOISE_TO_SCHEDULE = {"loglinear": "loglinear", "cosine": "cosine"}


# -- network -----------------------------------------------------------------------------------
class WeightLayerNorm(nn.Module):
    """LayerNorm without bias, computed in float32 (MDLM ``LayerNorm``), then scaled by ``weight``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), [self.dim]).to(self.weight.dtype) * self.weight


class SigmaEmbedding(nn.Module):
    """sigma (B,) -> (B, C): [cos(sigma w_j), sin(sigma w_j)], w_j = 10000^(-j / 128), then an MLP."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]  # (B, 128)
        feats = torch.cat([torch.cos(args), torch.sin(args)], -1)  # (B, 256)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class RotaryFrequencies(nn.Module):
    """inv_freq_j = 10000^(-2j / d) for head width d (a saved buffer in the release)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def cos_sin(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, device=device, dtype=torch.float32)
        ang = pos[:, None] * self.inv_freq.float().to(device)[None]  # (L, d/2)
        ang = torch.cat([ang, ang], -1)  # (L, d): the two halves share a frequency
        return ang.cos(), ang.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, non-interleaved (first half paired with second half). x: (B, L, h, d)."""
    x1, x2 = x.chunk(2, -1)
    return x * cos[None, :, None, :] + torch.cat([-x2, x1], -1) * sin[None, :, None, :]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift  # shift, scale: (B, 1, H)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = WeightLayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = WeightLayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, L, H = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, -1)  # (B, 1, H) each
        qkv = self.attn_qkv(_modulate(self.norm1(x), shift_a, scale_a)).view(B, L, 3, self.n_heads, H // self.n_heads)
        q, k, v = qkv.unbind(2)  # (B, L, h, d)
        q, k = rotate(q.float(), cos, sin).to(v.dtype), rotate(k.float(), cos, sin).to(v.dtype)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, L, d)
        x = x + gate_a * self.attn_out(att.transpose(1, 2).reshape(B, L, H))
        return x + gate_m * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class DiTFinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.norm_final = WeightLayerNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class MDLMBackbone(nn.Module):
    """The DiT itself: ``forward(indices (B, L) int64, sigma (B,)) -> logits (B, L, vocab_size)``."""

    def __init__(self, vocab_size: int, hidden_dim: int, cond_dim: int, n_blocks: int, n_heads: int):
        super().__init__()
        if hidden_dim % n_heads or (hidden_dim // n_heads) % 2:
            raise ValueError(f"hidden_dim ({hidden_dim}) must split into n_heads ({n_heads}) heads of even width")
        self.vocab_embed = nn.Module()
        self.vocab_embed.embedding = nn.Parameter(torch.empty(vocab_size, hidden_dim))
        nn.init.normal_(self.vocab_embed.embedding, std=0.02)
        self.sigma_map = SigmaEmbedding(cond_dim)
        self.rotary_emb = RotaryFrequencies(hidden_dim // n_heads)
        self.blocks = nn.ModuleList(DiTBlock(hidden_dim, n_heads, cond_dim) for _ in range(n_blocks))
        self.output_layer = DiTFinalLayer(hidden_dim, vocab_size, cond_dim)

    def forward(self, indices: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = self.vocab_embed.embedding[indices]  # (B, L, H)
        c = F.silu(self.sigma_map(sigma))  # (B, C)
        cos, sin = self.rotary_emb.cos_sin(indices.shape[1], indices.device)
        for block in self.blocks:
            x = block(x, cos, sin, c)
        return self.output_layer(x, c)


class MDLMNetwork(nn.Module):
    """Release layout (``backbone.*``) and the masked-sampler interface ``network(ids, time) -> logits``.

    ``time`` is sigma(t) from the sampler for time-conditioned models; for time-agnostic ones
    (``time_conditioning=False``) the backbone always gets sigma = 0, as MDLM does.
    """

    def __init__(self, vocab_size: int = 50258, model_length: int = 1024, hidden_dim: int = 768, cond_dim: int = 128,
                 n_blocks: int = 12, n_heads: int = 12, time_conditioning: bool = False):
        super().__init__()
        self.config = {"vocab_size": int(vocab_size), "model_length": int(model_length), "hidden_dim": int(hidden_dim),
                       "cond_dim": int(cond_dim), "n_blocks": int(n_blocks), "n_heads": int(n_heads),
                       "time_conditioning": bool(time_conditioning)}
        self.time_conditioning = bool(time_conditioning)
        self.backbone = MDLMBackbone(vocab_size, hidden_dim, cond_dim, n_blocks, n_heads)

    def forward(self, input_ids: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        if self.time_conditioning:
            if time is None:
                raise ValueError("this MDLM checkpoint is time-conditioned: pass sigma(t) as `time`")
            sigma = torch.as_tensor(time, device=input_ids.device).reshape(-1).expand(input_ids.shape[0])
        else:
            sigma = torch.zeros(input_ids.shape[0], device=input_ids.device)
        return self.backbone(input_ids, sigma)

    # -- release formats ----------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Hub layout: config.json (the release's keys) + model.safetensors with ``backbone.*`` keys."""
        from safetensors.torch import save

        from ..io import atomic_write_bytes, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"architectures": ["MDLM"], "model_type": "mdlm", "return_dict": False,
               "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
               "dropout": 0.1, "torch_dtype": "float32", **self.config}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(folder / "model.safetensors", save(tensors))
        atomic_write_json(folder / "config.json", cfg)

    def load_release_state_dict(self, state: dict, source: str) -> None:
        """Strict load of ``backbone.*`` weights; ``rotary_emb.inv_freq`` may be absent (recomputed)."""
        state = {k: v for k, v in state.items() if torch.is_tensor(v)}
        own = self.state_dict()
        missing = sorted(set(own) - set(state) - {"backbone.rotary_emb.inv_freq"})
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not match the MDLM DiT layout; "
                             f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                             f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
        bad = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
        if bad:
            k = bad[0]
            raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, the config implies {tuple(own[k].shape)}")
        if "backbone.rotary_emb.inv_freq" in state and not torch.allclose(
                state["backbone.rotary_emb.inv_freq"].float(), own["backbone.rotary_emb.inv_freq"], rtol=1e-5):
            raise ValueError(f"{source}: rotary inv_freq differs from base-10000 frequencies (unsupported variant)")
        state.setdefault("backbone.rotary_emb.inv_freq", own["backbone.rotary_emb.inv_freq"])
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# -- Lightning .ckpt: restricted unpickling --------------------------------------------------------
class _Inert:
    """Stand-in for any pickled object outside torch / builtins: keeps its state as plain data."""

    args: tuple = ()
    state = None

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # pickled callables (copyreg reconstructors) stay inert
        return _Inert(*args, **kwargs)

    def __setitem__(self, key, value):  # dict subclasses are filled item by item
        if not isinstance(self.state, dict):
            self.state = {}
        self.state[key] = value

    def append(self, value):  # list subclasses
        self.args = (*self.args, value)

    def extend(self, values):
        self.args = (*self.args, *values)


_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "bool", "str", "bytes", "bytearray",
                  "complex", "slice", "range", "object"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            return super().find_class(module, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module.startswith("torch") and (name.startswith("_rebuild") or module == "torch._utils"
                                           or name in ("Size", "device", "dtype")
                                           or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "dtype", "_reconstruct", "ndarray"):
            return super().find_class(module, name)
        return _Inert


class _RestrictedPickleModule:
    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "gensample_restricted_pickle"


def _plain(obj, depth: int = 0):
    """Inert omegaconf/hydra containers -> plain dicts/lists/values (best effort, for the config)."""
    if depth > 50:
        return None
    if isinstance(obj, _Inert):
        st = obj.state if isinstance(obj.state, dict) else {}
        inner = st.get("_content", st.get("_val", None))
        if inner is None and isinstance(st.get("__dict__"), dict):
            inner = st["__dict__"].get("_content", st["__dict__"].get("_val"))
        if inner is None and obj.args:
            inner = obj.args[0] if len(obj.args) == 1 else list(obj.args)
        return _plain(inner, depth + 1)
    if isinstance(obj, dict):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else None


def read_lightning_ckpt(path: str | Path) -> tuple[dict, dict, list | None]:
    """(state_dict, plain config dict, EMA shadow params or None) of an MDLM Lightning checkpoint."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"--model mdlm:{path}: cannot read the Lightning checkpoint ({err.__class__.__name__}: {err})") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"--model mdlm:{path}: not a Lightning checkpoint (no 'state_dict' mapping)")
    hp = ckpt.get("hyper_parameters") or {}
    config = _plain(hp.get("config")) if isinstance(hp, dict) else None
    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    return ckpt["state_dict"], config if isinstance(config, dict) else {}, shadow


# -- loading ---------------------------------------------------------------------------------------
def _config_from_state(state: dict, source: str, cfg: dict) -> dict:
    """Architecture from the weights' shapes; n_heads (not in any shape) and length from the config."""
    try:
        V, H = state["backbone.vocab_embed.embedding"].shape
        C = state["backbone.sigma_map.mlp.0.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"{source}: no MDLM DiT weights (missing {err.args[0]})") from err
    n_blocks = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")})
    model = cfg.get("model") or {}
    n_heads = model.get("n_heads")
    if n_heads is None:
        n_heads = max(1, H // 64)
        warnings.warn(f"{source}: config has no model.n_heads; assuming head width 64 ({n_heads} heads)")
    return {"vocab_size": int(V), "hidden_dim": int(H), "cond_dim": int(C), "n_blocks": n_blocks,
            "n_heads": int(n_heads), "model_length": int(model.get("length") or 1024),
            "time_conditioning": bool(cfg.get("time_conditioning", False))}


def _schedule_for(noise_type: str | None, source: str) -> str:
    if noise_type is None:
        return "loglinear"  # MDLM's default (configs/noise/loglinear.yaml); the hub config has no noise key
    if noise_type not in NOISE_TO_SCHEDULE:
        raise ValueError(f"{source}: MDLM noise type {noise_type!r} has no masking schedule here; "
                         f"supported: {sorted(NOISE_TO_SCHEDULE)}")
    return NOISE_TO_SCHEDULE[noise_type]


class FallbackTokenizer:
    """Used when no GPT-2 tokenizer is available offline: ids are written as ``<id>``."""

    def encode(self, text: str) -> list[int]:
        raise ValueError("--prompt needs a tokenizer: put the GPT-2 tokenizer files next to the weights "
                         "(or make `transformers.AutoTokenizer.from_pretrained('gpt2')` work offline)")

    def decode(self, ids) -> str:
        return " ".join(f"<{int(i)}>" for i in ids)


class GPT2TextTokenizer:
    """encode/decode over a transformers tokenizer; the MDLM mask id (outside its vocabulary) decodes as ``_``."""

    def __init__(self, tok, mask_token_id: int):
        self.tok, self.mask_token_id = tok, int(mask_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        parts, run = [], []
        for i in ids:
            if i == self.mask_token_id:
                parts.append(self.tok.decode(run) if run else "")
                parts.append("_")
                run = []
            else:
                run.append(i)
        parts.append(self.tok.decode(run) if run else "")
        return "".join(parts)


def _tokenizer_for(folder: Path | None, mask_token_id: int):
    """GPT-2 tokenizer: files next to the weights first, then transformers' 'gpt2' (cache or hub)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return FallbackTokenizer(), "none (transformers not installed)"
    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if folder is not None and any((folder / n).exists() for n in names):
        try:
            return GPT2TextTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), mask_token_id), str(folder)
        except (OSError, ValueError) as err:
            raise ValueError(f"{folder}: tokenizer files present but unreadable ({err})") from err
    for local_only in (True, False):
        try:
            return GPT2TextTokenizer(AutoTokenizer.from_pretrained("gpt2", local_files_only=local_only), mask_token_id), "gpt2"
        except Exception:  # noqa: BLE001 - offline / no cache: fall back to id text
            continue
    return FallbackTokenizer(), "none (gpt2 tokenizer unavailable offline)"


def _loaded(name: str, net: MDLMNetwork, schedule: str, folder: Path | None, **extras) -> LoadedModel:
    from .masked_lm import masked_lm_model

    V = net.config["vocab_size"]
    mask_id = V - 1  # MDLM: GPT-2 has no mask token, so the mask is the one id appended to its vocabulary
    tok, tok_source = _tokenizer_for(folder, mask_id)
    return masked_lm_model(name, net, mask_token_id=mask_id, length=net.config["model_length"], tokenizer=tok,
                           time_conditioning=net.time_conditioning, masking_schedule=schedule,
                           max_length=None, tokenizer_source=tok_source, mdlm_config=dict(net.config), **extras)


def load_mdlm_folder(folder: str | Path, name: str | None = None) -> LoadedModel:
    """A hub-layout folder (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise ValueError(f"--model mdlm:{folder}: an MDLM folder needs config.json and model.safetensors "
                         f"(found: {sorted(p.name for p in folder.iterdir())[:8]})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file}: not valid JSON ({err})") from err
    missing = [k for k in HUB_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_file}: not an MDLM config (missing {missing})")
    net = MDLMNetwork(**{k: cfg[k] for k in HUB_CONFIG_KEYS}, time_conditioning=bool(cfg.get("time_conditioning", False)))
    net.load_release_state_dict(load_file(str(weights)), str(weights))
    schedule = _schedule_for(cfg.get("noise_type"), str(cfg_file))
    return _loaded(name or f"mdlm:{folder}", net.eval(), schedule, folder, weights_source="safetensors")


def load_mdlm_ckpt(path: str | Path, name: str | None = None) -> LoadedModel:
    """A Lightning ``.ckpt`` of the MDLM training code (EMA weights when stored)."""
    path = Path(path)
    state, cfg, shadow = read_lightning_ckpt(path)
    state = {k: v for k, v in state.items() if k.startswith("backbone.") and torch.is_tensor(v)}
    arch = _config_from_state(state, str(path), cfg)
    if cfg.get("backbone", "dit") != "dit":
        raise ValueError(f"{path}: backbone {cfg.get('backbone')!r} is not the DiT (only `backbone: dit` loads)")
    if cfg.get("parameterization", "subs") != "subs":
        raise ValueError(f"{path}: parameterization {cfg.get('parameterization')!r}; only MDLM's 'subs' is a masked denoiser")
    net = MDLMNetwork(**arch)
    net.load_release_state_dict(state, str(path))
    weights = "state_dict"
    if shadow is not None:
        params = [p for _, p in net.named_parameters()]
        tensors = [s for s in shadow if torch.is_tensor(s)]
        # MDLM's EMA tracks backbone.parameters() then noise.parameters() (none for log-linear)
        if len(tensors) >= len(params) and all(tuple(s.shape) == tuple(p.shape) for s, p in zip(tensors, params)):
            with torch.no_grad():
                for s, p in zip(tensors, params):
                    p.copy_(s.to(p.dtype))
            weights = "ema"
        else:
            raise ValueError(f"{path}: the EMA shadow parameters do not match the backbone's parameters")
    schedule = _schedule_for((cfg.get("noise") or {}).get("type"), str(path))
    return _loaded(name or f"mdlm:{path}", net.eval(), schedule, path.parent if (path.parent / "tokenizer.json").exists()
                   or (path.parent / "vocab.json").exists() else None, weights_source=weights)


def load_mdlm(spec: str) -> LoadedModel:
    """``--model mdlm:PATH_OR_ID``: a hub-layout folder, a Lightning .ckpt, or a hub id (downloaded)."""
    path = Path(spec)
    if path.is_dir():
        return load_mdlm_folder(path, name=f"mdlm:{spec}")
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth"):
            return load_mdlm_ckpt(path, name=f"mdlm:{spec}")
        raise ValueError(f"--model mdlm:{spec}: expected a folder (config.json + model.safetensors) or a Lightning .ckpt")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(spec, allow_patterns=["config.json", "model.safetensors"])
        except Exception as err:  # noqa: BLE001 - network/auth/missing repo
            raise ValueError(f"--model mdlm:{spec}: not a local path and the hub download failed "
                             f"({err.__class__.__name__}: {str(err)[:200]})") from err
        return load_mdlm_folder(folder, name=f"mdlm:{spec}")
    raise ValueError(f"--model mdlm:{spec}: no such folder or file")
