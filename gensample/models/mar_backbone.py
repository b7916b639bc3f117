"""The released MAR model (Li et al. 2024, "Autoregressive Image Generation without Vector
Quantization", arXiv 2406.11838) re-implemented in plain PyTorch with the release's parameter names.

``MARModel.load_state_dict(checkpoint["model_ema"], strict=True)`` loads the LTH14/mar checkpoints
(mar_base / mar_large / mar_huge); ``mar_config_from_state_dict`` reads the sizes off the tensor
shapes. Plain PyTorch rather than timm: the model needs only timm's ``Block`` (pre-norm ViT block:
LayerNorm -> multi-head self-attention with a fused qkv -> residual, LayerNorm -> GELU MLP ->
residual), whose parameter names ``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2`` are
reproduced here, so no dependency is added and the block's math is visible (docs/disa.md, "Released
MAR checkpoints"). A golden test compares it with the reference code run under timm.

Architecture (paper sec. 3.3-3.4 and 5; "MAE-style" bidirectional encoder/decoder):

- tokens: N = 256 KL-16 latents of C = 16 (a 16 x 16 grid, row-major), ``z_proj`` -> width W.
- a buffer of 64 slots in front, all holding the class embedding (``class_emb[y]``), or the learned
  ``fake_latent`` for the unconditional (CFG) branch; + ``encoder_pos_embed_learned``; LayerNorm.
- encoder: only the known tokens (and the buffer) enter the ViT blocks (masked ones are dropped).
- decoder: ``decoder_embed``, masked slots filled with ``mask_token``, + ``decoder_pos_embed_learned``,
  ViT blocks, LayerNorm, buffer removed, + ``diffusion_pos_embed_learned`` -> z (B, N, W).
- head (``diffloss.net``): the per-token AdaLN MLP of paper sec. 3.2 (``MARDiffHead``), output
  (M, 2C) = [eps, v] with v the learned-range variance interpolant (Nichol & Dhariwal 2021, eq. 15).

Interface used by ``gensample.samplers.disa.sample_mar`` (docs/disa.md, "Plugging in a model"):
``MARModel.backbone(tokens, mask, class_labels) -> z`` with mask (B, N) bool (True = unknown, the
release's float mask is built from it) and class label ``num_classes`` meaning the null class
(fake_latent); ``MARModel.diffloss.net(x_t, t, z) -> (M, 2C)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Released sizes (the release's mar_base / mar_large / mar_huge functions and README commands).
MAR_SIZES = {
    "mar_base": {"width": 768, "depth": 12, "heads": 12, "head_depth": 6, "head_width": 1024},
    "mar_large": {"width": 1024, "depth": 16, "heads": 16, "head_depth": 8, "head_width": 1280},
    "mar_huge": {"width": 1280, "depth": 20, "heads": 16, "head_depth": 12, "head_width": 1536},
}
VAE_SCALE = 0.2325  # KL-16 latents are multiplied by this when encoded (tokens / 0.2325 before decoding)


@dataclass(frozen=True)
class MARConfig:
    """Sizes of a MAR model. seq_len N = (img_size / vae_stride / patch_size)^2, token_dim C = 16 p^2."""

    seq_len: int = 256
    token_dim: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    class_num: int = 1000
    buffer_size: int = 64
    diffloss_d: int = 6
    diffloss_w: int = 1024

    def __post_init__(self):
        for name in ("seq_len", "token_dim", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "class_num", "diffloss_d", "diffloss_w"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MARConfig.{name} must be an int >= 1, got {value!r}")
        if self.buffer_size < 0:
            raise ValueError(f"MARConfig.buffer_size must be >= 0, got {self.buffer_size}")
        for w, h, part in ((self.encoder_embed_dim, self.encoder_num_heads, "encoder"),
                           (self.decoder_embed_dim, self.decoder_num_heads, "decoder")):
            if w % h:
                raise ValueError(f"{part} width {w} is not divisible by its {h} heads")

    def to_dict(self) -> dict:
        return asdict(self)


def default_heads(width: int) -> int:
    """Attention heads of the released sizes (head dim 64, but 16 heads for width 1280)."""
    for size in MAR_SIZES.values():
        if size["width"] == width:
            return size["heads"]
    return max(1, width // 64) if width % 64 == 0 else 1


class _DeviceMixin:
    """``.device`` / ``.dtype`` of the first parameter (what diffusers pipelines ask their modules)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


# -- timm-compatible ViT block ------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, h, n, d/h)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # softmax(q k^T / sqrt(d/h)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block with timm's ``Block`` parameter names (LayerNorm eps 1e-6)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# -- the diffusion head (release name: diffloss.net, SimpleMLPAdaLN) -------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (M,) -> (M, dim), [cos, sin] halves (DDPM / ADM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t.float()[:, None] * freqs[None]  # (M, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class _TimeEmbed(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class _FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class MARDiffHead(_DeviceMixin, nn.Module):
    """The per-token denoiser eps_theta(x_t | t, z) of paper sec. 3.2 with learned-range variance.

    forward(x_t (M, C), t (M,) int64 training timesteps, z (M, W)) -> (M, 2C) = [eps_hat, v],
    v in [-1, 1] interpolating log beta and log beta-tilde (Nichol & Dhariwal 2021, eq. 15).
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.token_dim = token_dim
        self.time_embed = _TimeEmbed(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([_ResBlock(width) for _ in range(depth)])
        self.final_layer = _FinalLayer(width, 2 * token_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x_t)  # (M, W)
        y = self.time_embed(t) + self.cond_embed(z)  # (M, W)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)  # (M, 2C)


class _DiffLoss(nn.Module):
    """Holder so that the head's parameters are named ``diffloss.net.*`` as in the release."""

    def __init__(self, head: MARDiffHead):
        super().__init__()
        self.net = head


# -- the MAE-style backbone ---------------------------------------------------------------------
class MARModel(_DeviceMixin, nn.Module):
    """MAR with the release's state-dict layout; ``backbone`` gives z, ``diffloss.net`` the head."""

    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = config
        c = config
        n_all = c.seq_len + c.buffer_size
        self.class_emb = nn.Embedding(c.class_num, c.encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, c.encoder_embed_dim))
        self.z_proj = nn.Linear(c.token_dim, c.encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(c.encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_all, c.encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList([ViTBlock(c.encoder_embed_dim, c.encoder_num_heads, c.mlp_ratio)
                                             for _ in range(c.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(c.encoder_embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(c.encoder_embed_dim, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_all, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([ViTBlock(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio)
                                             for _ in range(c.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len, c.decoder_embed_dim))
        self.diffloss = _DiffLoss(MARDiffHead(c.token_dim, c.decoder_embed_dim, c.diffloss_w, c.diffloss_d))

    @property
    def null_class(self) -> int:
        return self.config.class_num

    def init_random(self, generator: torch.Generator | None = None, std: float = 0.02) -> "MARModel":
        """Random weights (every tensor, including the head's zero-initialised output layers, so a
        random model has a non-trivial output); for tests and speed benchmarks only."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("weight") and p.ndim == 1:  # LayerNorm gains
                    p.copy_(1 + std * torch.randn(p.shape, generator=generator))
                elif p.ndim >= 2 and name.endswith("weight"):
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=generator))
        return self

    def condition(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """(B, W) class embeddings; label == class_num (the null class) or None -> fake_latent."""
        if class_labels is None:
            return self.fake_latent.expand(batch, -1)
        labels = class_labels.to(device=device, dtype=torch.long)
        if ((labels < 0) | (labels > self.config.class_num)).any():
            raise ValueError(f"class labels must be in [0, {self.config.class_num}] ({self.config.class_num} = null class)")
        null = labels == self.config.class_num
        emb = self.class_emb(labels.clamp(max=self.config.class_num - 1))  # (B, W)
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)

    def forward_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C), mask (B, N) float (1 = masked), cond (B, W) -> (B, buffer + known, W)."""
        x = self.z_proj(tokens)  # (B, N, W)
        bsz, _, width = x.shape
        buf = self.config.buffer_size
        x = torch.cat([cond[:, None].expand(bsz, buf, width).to(x.dtype), x], dim=1)  # (B, 64 + N, W)
        keep = torch.cat([mask.new_zeros(bsz, buf), mask], dim=1) == 0  # (B, 64 + N) bool
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x[keep].reshape(bsz, -1, width)  # masked tokens dropped (same count in every row)
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, buffer + known, W_enc), mask (B, N) float -> z (B, N, W_dec)."""
        x = self.decoder_embed(x)
        bsz, _, width = x.shape
        keep = torch.cat([mask.new_zeros(bsz, self.config.buffer_size), mask], dim=1) == 0
        full = self.mask_token.to(x.dtype).expand(bsz, keep.shape[1], width).clone()  # (B, 64 + N, W)
        full[keep] = x.reshape(-1, width)
        x = full + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.config.buffer_size:]  # (B, N, W)
        return x + self.diffusion_pos_embed_learned

    def backbone(self, tokens: torch.Tensor, mask: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """z (B, N, W) for every slot; mask (B, N) bool or float, True/1 = still unknown."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.config.seq_len, self.config.token_dim):
            raise ValueError(f"tokens must have shape (B, {self.config.seq_len}, {self.config.token_dim}), got {tuple(tokens.shape)}")
        maskf = mask.to(tokens.dtype)
        known = (maskf == 0).sum(1)
        if (known != known[0]).any():
            raise ValueError("every row must have the same number of known tokens (MAR drops masked tokens)")
        cond = self.condition(class_labels, tokens.shape[0], tokens.device)
        return self.forward_decoder(self.forward_encoder(tokens, maskf, cond), maskf)


class MARBackboneView(_DeviceMixin, nn.Module):
    """``backbone(tokens, mask, class_labels) -> z`` callable sharing the MARModel's weights."""

    def __init__(self, model: MARModel):
        super().__init__()
        self.model = model

    @property
    def config(self):
        c = self.model.config
        return _Cfg(num_tokens=c.seq_len, token_dim=c.token_dim, num_classes=c.class_num)

    def forward(self, tokens, mask, class_labels):
        return self.model.backbone(tokens, mask, class_labels)


@dataclass(frozen=True)
class _Cfg:
    num_tokens: int
    token_dim: int
    num_classes: int


def mar_config_from_state_dict(state: dict) -> MARConfig:
    """Sizes from tensor shapes and key counts; attention heads by width (as the release's sizes)."""
    required = ("encoder_pos_embed_learned", "diffusion_pos_embed_learned", "z_proj.weight", "class_emb.weight",
                "decoder_embed.weight", "diffloss.net.input_proj.weight", "fake_latent")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not a MAR state dict: missing {missing}")

    def count(prefix):
        idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    seq_len = state["diffusion_pos_embed_learned"].shape[1]
    enc_w = state["z_proj.weight"].shape[0]
    dec_w = state["decoder_embed.weight"].shape[0]
    mlp_hidden = state["encoder_blocks.0.mlp.fc1.weight"].shape[0] if "encoder_blocks.0.mlp.fc1.weight" in state else 4 * enc_w
    return MARConfig(
        seq_len=int(seq_len),
        token_dim=int(state["z_proj.weight"].shape[1]),
        encoder_embed_dim=int(enc_w),
        encoder_depth=count("encoder_blocks."),
        encoder_num_heads=default_heads(enc_w),
        decoder_embed_dim=int(dec_w),
        decoder_depth=count("decoder_blocks."),
        decoder_num_heads=default_heads(dec_w),
        mlp_ratio=mlp_hidden / enc_w,
        class_num=int(state["class_emb.weight"].shape[0]),
        buffer_size=int(state["encoder_pos_embed_learned"].shape[1] - seq_len),
        diffloss_d=count("diffloss.net.res_blocks."),
        diffloss_w=int(state["diffloss.net.input_proj.weight"].shape[0]),
    )


def size_name(config: MARConfig) -> str | None:
    """'mar_base' | 'mar_large' | 'mar_huge' when the sizes are a released one, else None."""
    for name, s in MAR_SIZES.items():
        if (config.encoder_embed_dim, config.encoder_depth, config.diffloss_w, config.diffloss_d) == (
                s["width"], s["depth"], s["head_width"], s["head_depth"]):
            return name
    return None


def released_config(name: str, **overrides) -> MARConfig:
    if name not in MAR_SIZES:
        raise ValueError(f"MAR size must be one of {sorted(MAR_SIZES)}, got {name!r}")
    s = MAR_SIZES[name]
    kw = dict(encoder_embed_dim=s["width"], encoder_depth=s["depth"], encoder_num_heads=s["heads"],
              decoder_embed_dim=s["width"], decoder_depth=s["depth"], decoder_num_heads=s["heads"],
              diffloss_d=s["head_depth"], diffloss_w=s["head_width"])
    kw.update(overrides)
    return MARConfig(**kw)


def write_release_checkpoint(model: MARModel, path, model_name: str = "mar_custom", epoch: int = 0) -> None:
    """Write ``model`` as the release does (``checkpoint-last.pth``: {"model", "model_ema", "epoch",
    "args"}; args an argparse.Namespace naming the size). "model" and "model_ema" share storage
    here (the release stores two copies); for random-weight test and benchmark checkpoints."""
    import argparse
    import io

    from ..io import atomic_write_bytes

    c = model.config
    grid = int(round(c.seq_len ** 0.5))
    args = argparse.Namespace(model=model_name, img_size=grid * 16, vae_stride=16, patch_size=1,
                              vae_embed_dim=c.token_dim, diffloss_d=c.diffloss_d, diffloss_w=c.diffloss_w,
                              class_num=c.class_num, buffer_size=c.buffer_size)
    state = model.state_dict()
    buf = io.BytesIO()
    torch.save({"model": state, "model_ema": state, "epoch": epoch, "args": args}, buf)
    from pathlib import Path

    atomic_write_bytes(Path(path), buf.getvalue())
