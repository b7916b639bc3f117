"""VP noise-schedule math (DDPM, Ho et al. 2020, arXiv 2006.11239, eq. 4; zero terminal SNR,
Lin et al. 2023, arXiv 2305.08891, Algorithm 1).

Pure torch; no diffusers import. Conventions follow diffusers' scheduler configs so any
`scheduler.config` (DDPM/DDIM/DPMSolver/Euler) maps to the same tables:

| code name          | paper symbol                         |
|--------------------|--------------------------------------|
| ``betas[t]``       | beta_t, t = 0..T-1                   |
| ``alphas_cumprod`` | alpha_bar_t = prod_{s<=t}(1-beta_s)  |
| ``sigma``          | sqrt(1 - alpha_bar)                  |
| ``log_snr``        | lambda = log(alpha_bar / (1-alpha_bar)) |
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def cosine_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    """Improved-DDPM cosine alpha_bar(s) on s in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """beta_t, t = 0..T-1, float64, with the same rules as diffusers' DDPM/DDIM schedulers."""
    if trained_betas is not None:
        betas = torch.as_tensor(list(trained_betas), dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError("trained_betas must be a non-empty 1-D sequence")
        return betas
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    T = int(num_train_timesteps)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        s = torch.arange(T + 1, dtype=torch.float64) / T
        ab = cosine_alpha_bar(s)
        return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift/scale sqrt(alpha_bar) so the last value is 0 (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """alpha_bar_t (float64, length T) from any diffusers VP scheduler config (dict or FrozenDict)."""
    get = config.get
    betas = make_betas(
        num_train_timesteps=get("num_train_timesteps", 1000),
        beta_start=get("beta_start", 1e-4),
        beta_end=get("beta_end", 0.02),
        beta_schedule=get("beta_schedule", "linear"),
        trained_betas=get("trained_betas", None),
    )
    if get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, 0)


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """alpha_bar at (possibly fractional) discrete time t in [0, T-1], by linear interpolation
    of log alpha_bar; t < 0 returns 1 (the clean end). Output float64, shape of t."""
    ab = alphas_cumprod.double()
    t = torch.as_tensor(t, dtype=torch.float64, device=ab.device)
    T = ab.numel()
    tc = t.clamp(0, T - 1)
    lo = tc.floor().long().clamp(max=T - 1)
    hi = (lo + 1).clamp(max=T - 1)
    frac = tc - lo.double()
    log_ab = ab.log()
    out = torch.exp(log_ab[lo] * (1 - frac) + log_ab[hi] * frac)
    return torch.where(t < 0, torch.ones_like(out), out)


def continuous_alpha_bar(alphas_cumprod: torch.Tensor, u: torch.Tensor | float) -> torch.Tensor:
    """alpha_bar(u) for continuous u in [0, 1], u = t / (T - 1) (u = 0 clean end, u = 1 noise end)."""
    T = alphas_cumprod.numel()
    return alpha_bar_at(alphas_cumprod, torch.as_tensor(u, dtype=torch.float64) * (T - 1))


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    return (1 - alpha_bar).clamp(min=0).sqrt()


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_bar / (1 - alpha_bar)); +inf at alpha_bar = 1, -inf at 0."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return ab.log() - torch.log1p(-ab)


def timestep_from_log_snr(alphas_cumprod: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Fractional discrete time whose log-SNR is lam: the exact inverse of log_snr(alpha_bar_at(.)),
    found in the same log alpha_bar space that alpha_bar_at interpolates linearly."""
    log_ab = alphas_cumprod.double().log()  # (T,) decreasing in t
    lam = torch.as_tensor(lam, dtype=torch.float64)
    target = torch.nn.functional.logsigmoid(lam)  # log alpha_bar
    inc = -log_ab  # increasing
    q = (-target).clamp(inc[0], inc[-1])
    idx = torch.searchsorted(inc, q).clamp(1, inc.numel() - 1)
    lo, hi = inc[idx - 1], inc[idx]
    frac = ((q - lo) / (hi - lo).clamp(min=1e-300)).clamp(0, 1)
    return (idx - 1).double() + frac


def expand_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) or scalar tensor to broadcast against x (B, ...)."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))
