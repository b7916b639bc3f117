"""A tiny MAR (masked autoregressive model with a per-token diffusion head) for 8x8 digits.

Li et al. 2024, "Autoregressive Image Generation without Vector Quantization" (arXiv 2406.11838),
scaled down (docs/disa.md, "mar-digits"): a bidirectional transformer over a class token plus
N = 16 slots (2x2 patches of an 8x8 image, C = 4 values each, learned mask embedding), and the
MAR head (paper sec. 3.2; SimpleMLPAdaLN: sinusoidal t embedding + z embedding, AdaLN
residual MLP blocks, zero-initialised modulation), trained with eps-MSE on the improved-DDPM
cosine schedule (T = 1000, Nichol & Dhariwal 2021, eq. 17).

The generic interface that ``ARDiffusionPipeline`` / ``samplers.disa`` need (any MAR-like model
that follows it plugs in):

    backbone(tokens, mask, class_labels) -> z
        tokens: (B, N, C) float, current token values (masked slots hold anything);
        mask: (B, N) bool, True where a token is still unknown;
        class_labels: (B,) int64, ``num_classes`` (the null class) for the unconditional half;
        z: (B, N, D) float, one condition vector per slot.
    head(x_t, t, z) -> eps_hat  (M, C), or (M, 2C) = [eps, variance interpolant v] (learned range)
        x_t: (M, C) noisy tokens, t: (M,) int64 original training timesteps, z: (M, D).

Both networks are diffusers ``ModelMixin, ConfigMixin`` modules (``save_pretrained`` writes
safetensors + config.json).
"""

from __future__ import annotations


import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..core.schedule import make_betas
from .mar_backbone import timestep_embedding  # one sinusoidal embedding for both MARs

PATCH = 2  # 2x2 patches of an 8x8 image -> 16 tokens of 4 values
HEAD_PREDICTIONS = ("epsilon", "v")


def patchify(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, c, H, W) images -> (B, N, C) tokens, N = (H/p)(W/p) row-major, C = c p p."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {(h, w)} must be divisible by the patch size {patch}")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)  # (B, c, h', p, w', p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, channels: int = 1, size: int = 8, patch: int = PATCH) -> torch.Tensor:
    """Inverse of ``patchify``: (B, N, C) -> (B, channels, size, size)."""
    b = tokens.shape[0]
    g = size // patch
    x = tokens.reshape(b, g, g, channels, patch, patch)  # (B, h', w', c, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, size, size)


class MARBackbone(ModelMixin, ConfigMixin):
    """Bidirectional transformer: [class token, N slots] -> z per slot (docs/disa.md)."""

    @register_to_config
    def __init__(self, num_tokens: int = 16, token_dim: int = 4, width: int = 64, depth: int = 2,
                 num_heads: int = 4, num_classes: int = 10):
        super().__init__()
        self.token_in = nn.Linear(token_dim, width)
        self.mask_embed = nn.Parameter(torch.zeros(width))
        self.class_embed = nn.Embedding(num_classes + 1, width)  # last row = null class (CFG)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h = self.token_in(tokens)  # (B, N, W)
        h = torch.where(mask[..., None], self.mask_embed.to(h.dtype), h)
        cls = self.class_embed(class_labels)[:, None]  # (B, 1, W)
        h = torch.cat([cls, h], dim=1) + self.pos_embed  # (B, N + 1, W)
        return self.norm(self.blocks(h))[:, 1:]  # (B, N, W)


class _AdaLNBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class MARHead(ModelMixin, ConfigMixin):
    """MAR's SimpleMLPAdaLN diffusion head: eps_hat(x_t, t, z) per token (docs/disa.md)."""

    @register_to_config
    def __init__(self, token_dim: int = 4, cond_dim: int = 64, width: int = 128, depth: int = 3,
                 learn_sigma: bool = False, prediction: str = "epsilon", num_train_timesteps: int = 1000,
                 beta_schedule: str = "squaredcos_cap_v2"):
        super().__init__()
        if prediction not in HEAD_PREDICTIONS:
            raise ValueError(f"prediction must be one of {HEAD_PREDICTIONS}, got {prediction!r}")
        if prediction == "v" and learn_sigma:
            raise ValueError("learn_sigma is only supported with prediction='epsilon'")
        ab = torch.cumprod(1 - make_betas(num_train_timesteps, beta_schedule=beta_schedule), 0)
        self.register_buffer("alphas_cumprod", ab.float(), persistent=False)
        self.x_in = nn.Linear(token_dim, width)
        self.t_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.z_in = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList([_AdaLNBlock(width) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim * (2 if learn_sigma else 1))
        for mod in [*(b.ada[-1] for b in self.blocks), self.final_ada[-1], self.out]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The network output in its own parameterisation (eps[, v-range] or v)."""
        y = self.t_mlp(timestep_embedding(t).to(x_t.dtype)) + self.z_in(z)  # (M, W)
        h = self.x_in(x_t)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_ada(y).chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """eps_hat (M, C) (or (M, 2C) with learn_sigma), whatever the internal parameterisation.

        prediction="v": the net predicts v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022,
        arXiv 2202.00512, sec. 4) and eps_hat = sqrt(ab) v_hat + sqrt(1-ab) x_t. At t = T-1 of the
        capped cosine schedule ab = 2.4e-9, where an eps net's error is amplified by 1/sqrt(ab)
        in x0_hat; here it is damped by sqrt(ab) instead (docs/disa.md, "mar-digits").
        """
        out = self.raw(x_t, t, z)
        if self.config.prediction == "epsilon":
            return out
        ab = self.alphas_cumprod.to(x_t.device)[t.long()][:, None].to(x_t.dtype)  # (M, 1)
        return ab.sqrt() * out + (1 - ab).sqrt() * x_t


# -- data and training ------------------------------------------------------------------------
MAR_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                        "prediction_type": "epsilon", "clip_sample": False}


def digits_split(seed: int = 0, holdout: float = 0.2):
    """sklearn digits as (x, y): x (n, 1, 8, 8) float32 in [-1, 1] (x/8 - 1), y (n,) int64.

    Returns ((x_train, y_train), (x_test, y_test)) with a fixed permutation from ``seed``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(round(holdout * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def train_mar(steps: int = 2000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
              label_dropout: float = 0.1, t_repeat: int = 2, head_prediction: str = "v", log_every: int = 50,
              progress=None):
    """Train (MARBackbone, MARHead) on the digits training split (docs/disa.md).

    Per batch: random order per image, r ~ U(1/N, 1] of slots masked (m = ceil(r N)), label
    dropout to the null class, and an eps-MSE loss on the masked slots only, each token repeated
    ``t_repeat`` times with independent t ~ U{0..T-1} (MAR's diffusion_batch_mul). With
    ``head_prediction="v"`` the loss is the MSE of the head's v output (the head still returns eps).
    Returns (backbone, head, curve) with curve a list of {"step", "loss"} (mean over the window).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisation
    (x_train, y_train), _ = digits_split()
    tokens_all = patchify(x_train)  # (n, 16, 4)
    n_data, num_tokens, token_dim = tokens_all.shape
    backbone = MARBackbone(num_tokens=num_tokens, token_dim=token_dim)
    head = MARHead(token_dim=token_dim, cond_dim=backbone.config.width, prediction=head_prediction)
    null = backbone.config.num_classes
    alpha_bar = torch.cumprod(1 - make_betas(**{k: v for k, v in MAR_SCHEDULER_CONFIG.items()
                                                 if k in ("num_train_timesteps", "beta_schedule")}), 0).float()
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    curve, window = [], []
    for step in range(1, steps + 1):
        idx = torch.randint(n_data, (batch_size,), generator=gen)
        tokens, labels = tokens_all[idx], y_train[idx].clone()
        labels[torch.rand(batch_size, generator=gen) < label_dropout] = null
        order = torch.rand(batch_size, num_tokens, generator=gen).argsort(dim=1)  # random order
        m = torch.ceil(torch.rand(batch_size, generator=gen).clamp(min=1e-6) * num_tokens).long()  # (B,) in 1..N
        rank = order.argsort(dim=1)  # rank of each slot in the order
        mask = rank < m[:, None]  # (B, N): first m slots of the order are masked
        z = backbone(tokens, mask, labels)  # (B, N, D)
        z_m, x0 = z[mask].repeat(t_repeat, 1), tokens[mask].repeat(t_repeat, 1)  # (M, D), (M, C)
        t = torch.randint(len(alpha_bar), (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        ab = alpha_bar[t][:, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        target = eps if head_prediction == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        loss = (head.raw(x_t, t, z_m) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            curve.append({"step": step, "loss": float(np.mean(window))})
            window = []
            if progress is not None:
                progress(step, curve[-1]["loss"])
    return backbone.eval(), head.eval(), curve
