"""Dream (Ye et al. 2025, "Dream 7B: Diffusion Large Language Models", arXiv 2508.15487) in plain PyTorch.

Dream's denoiser is Qwen2.5's decoder (biased q/k/v projections, RMSNorm pre-norm, rotary embeddings,
SwiGLU MLP, grouped-query attention) with the causal mask removed. It was adapted from an
autoregressive model and keeps its output convention ("shift operation", paper sec. 2): the raw
logits at position i score the token at position i + 1. ``DreamNetwork.forward`` returns logits
re-aligned so that row i scores position i: row 0 keeps the raw row 0 and row i > 0 is the raw row
i - 1 (the same re-alignment as the release's sampler). ``raw_logits`` gives the unshifted output.

State-dict names are the release's (``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``model.layers.{i}.mlp.{gate,up,down}_proj``, ``model.layers.{i}.{input,post_attention}_layernorm``,
``model.norm``, ``lm_head``), so a released folder loads with ``load_state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .llada import (RMSNorm, attend, bare_dlm_model, build_on_meta, load_weights, read_config, register_bare_family,
                    rope_tables)

DREAM_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def dream_config(raw: dict) -> dict:
    cfg = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 32768,
           "mask_token_id": 151666, "pad_token_id": 151643, "eos_token_id": 151643}
    cfg.update({k: v for k, v in raw.items() if k in cfg})
    params = raw.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params and "rope_theta" not in raw:
        cfg["rope_theta"] = params["rope_theta"]
    scaling = cfg["rope_scaling"] or ({k: v for k, v in params.items() if k != "rope_theta"} if params else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"Dream config: rope_scaling {scaling!r} is not supported (only the default rotary embedding)")
    if cfg["hidden_act"] not in DREAM_ACTIVATIONS:
        raise ValueError(f"Dream config: hidden_act {cfg['hidden_act']!r} not supported (allowed: {', '.join(DREAM_ACTIVATIONS)})")
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError("Dream config: hidden_size must be divisible by num_attention_heads")
    return cfg


class DreamAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, h, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = d // h
        self.n_heads, self.n_kv_heads = h, kv
        self.q_proj = nn.Linear(d, h * hd, bias=True)
        self.k_proj = nn.Linear(d, kv * hd, bias=True)
        self.v_proj = nn.Linear(d, kv * hd, bias=True)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x, sin, cos, past=None):
        out, kv = attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), n_heads=self.n_heads,
                         n_kv_heads=self.n_kv_heads, sin=sin, cos=cos, past=past)
        return self.o_proj(out), kv


class DreamMLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, m = cfg["hidden_size"], cfg["intermediate_size"]
        self.act = DREAM_ACTIVATIONS[cfg["hidden_act"]]
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DreamLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = DreamAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = DreamMLP(cfg)

    def forward(self, x, sin, cos, past=None):
        att, kv = self.self_attn(self.input_layernorm(x), sin, cos, past)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class _DreamBody(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DreamLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class DreamNetwork(nn.Module):
    """Dream's denoiser: ``forward(input_ids (B, L)) -> logits (B, L, vocab)`` with row i scoring position i."""

    logit_shift = 1  # raw row i scores position i + 1

    def __init__(self, config: dict):
        super().__init__()
        self.cfg = dream_config(config)
        self.model = _DreamBody(self.cfg)
        self.tied = bool(self.cfg["tie_word_embeddings"])
        if not self.tied:
            self.lm_head = nn.Linear(self.cfg["hidden_size"], self.cfg["vocab_size"], bias=False)
        self.head_dim = self.cfg["hidden_size"] // self.cfg["num_attention_heads"]
        self.max_length = int(self.cfg["max_position_embeddings"])

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        if self.tied:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        return super().load_state_dict(state, strict=strict, assign=assign)

    def layers(self, input_ids: torch.Tensor, start: int = 0, past=None, head_rows: tuple | None = None):
        """Raw (unshifted) logits of rows [start, L) (only rows start + a .. start + b with ``head_rows=(a, b)``)
        and each layer's (k, v) of rows [start, L)."""
        x = self.model.embed_tokens(input_ids[:, start:])
        sin, cos = rope_tables(input_ids.shape[1], self.head_dim, float(self.cfg["rope_theta"]), x.device)
        kvs = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, sin, cos, None if past is None else past[i])
            kvs.append(kv)
        if head_rows is not None:
            x = x[:, head_rows[0]:head_rows[1]]
        x = self.model.norm(x)
        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return F.linear(x, weight), kvs

    @staticmethod
    def shift_logits(raw: torch.Tensor) -> torch.Tensor:
        """Row i <- raw row i - 1 (row 0 unchanged): logits that score position i at row i."""
        return torch.cat((raw[:, :1], raw[:, :-1]), dim=1)

    def raw_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        return self.layers(input_ids)[0]

    def forward(self, input_ids: torch.Tensor, time=None) -> torch.Tensor:
        return self.shift_logits(self.raw_logits(input_ids))


def build_dream(folder: str | Path, dtype: torch.dtype | None = None) -> DreamNetwork:
    """DreamNetwork with the weights of a released Dream folder (config.json + safetensors)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    return load_weights(build_on_meta(DreamNetwork, cfg), folder, dtype)


def load_dream(path: str, name: str | None = None):
    """``--model dream:DIR``: a Dream folder in the release's layout (config.json with model_type "Dream",
    model*.safetensors, tokenizer files). The network is this module's plain-PyTorch Dream (logits
    re-aligned to the position they score); the folder's own code is never run."""
    spec = f"dream:{path}"
    raw = read_config(Path(path), spec)
    if str(raw.get("model_type", "")).lower() != "dream" and "DreamModel" not in (raw.get("architectures") or []):
        raise ValueError(f"--model {spec}: config.json describes model_type {raw.get('model_type')!r}, not a Dream "
                         "model (model_type 'Dream')")
    try:
        net = build_dream(path)
    except ValueError as err:
        raise ValueError(f"--model {spec}: {err}") from None
    return bare_dlm_model(name or spec, net, path, spec, family="dream", mask_id=int(net.cfg["mask_token_id"]),
                          logits_size=net.cfg["vocab_size"])


register_bare_family("dream", "DreamModel", "Dream", lambda path, name: load_dream(path, name=name))
