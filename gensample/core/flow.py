"""Flow-matching (rectified-flow) models as denoisers: the conversion and the sigma grid.

A flow model predicts the velocity v = eps - x0 on the straight path
x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1] (Liu et al. 2023, arXiv 2209.03003, eq. 1;
Esser et al. 2024, arXiv 2403.03206, sec. 2, "rectified flow"). The network time is
t = sigma * num_train_timesteps (what diffusers' FlowMatchEulerDiscreteScheduler hands it).

| code name        | symbol                                                  |
|------------------|---------------------------------------------------------|
| ``sigma``        | sigma, the noise weight of x_sigma                      |
| ``v_hat``        | v_theta(x_sigma, t) = E[eps - x0 | x_sigma]             |
| ``twin_scale``   | c(sigma) = sqrt((1 - sigma)^2 + sigma^2)                |
| ``twin alpha_bar``| alpha_bar(sigma) = (1 - sigma)^2 / c(sigma)^2          |

The conversion (docs/flow_matching.md "The conversion"):

- x0_hat = x - sigma v_hat, eps_hat = x + (1 - sigma) v_hat (from x = (1 - sigma) x0 + sigma eps
  and v = eps - x0);
- the VP twin: x_VP = x / c(sigma) = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps with the
  alpha_bar above, the same x0 and the same eps. Every VP sampler (DDIM/DDPM math, FK weights,
  Tweedie) therefore runs unchanged on (x_VP, alpha_bar(sigma)); DDIM(eta = 0) on the twin mapped
  back is the Euler step x + (sigma_s - sigma_t) v_hat, DDIM(eta = 1) a marginal-preserving SDE.

``flow_sigmas`` reproduces FlowMatchEulerDiscreteScheduler.set_timesteps (static ``shift``, dynamic
shifting with ``mu``, ``shift_terminal``, Karras / exponential / beta sigmas, ``invert_sigmas``)
with the same float32 / float64 operation order, so its grid equals the scheduler's bit for bit.
Pure torch and numpy; no diffusers import.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

TIME_SHIFT_TYPES = ("exponential", "linear")


# -- the conversion ----------------------------------------------------------------------------
def twin_scale(sigma):
    """c(sigma) = sqrt((1 - sigma)^2 + sigma^2): x_VP = x_flow / c. Float or tensor (float64 advised)."""
    if isinstance(sigma, torch.Tensor):
        return ((1 - sigma) ** 2 + sigma**2).sqrt()
    return math.sqrt((1 - sigma) ** 2 + sigma**2)


def twin_alpha_bar(sigma):
    """alpha_bar(sigma) = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2) of the VP twin: 1 at sigma = 0,
    0 at sigma = 1; log-SNR lambda = 2 log((1 - sigma) / sigma). Float or tensor."""
    return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)


def sigma_of_alpha_bar(alpha_bar):
    """The inverse of `twin_alpha_bar`: sigma = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab)), from
    (1 - sigma) / sigma = sqrt(ab / (1 - ab)). Finite at both ends (ab = 0 -> 1, ab = 1 -> 0)."""
    if isinstance(alpha_bar, torch.Tensor):
        a, b = alpha_bar.clamp(0, 1).sqrt(), (1 - alpha_bar).clamp(0, 1).sqrt()
        return b / (a + b)
    a, b = math.sqrt(min(max(alpha_bar, 0.0), 1.0)), math.sqrt(min(max(1 - alpha_bar, 0.0), 1.0))
    return b / (a + b)


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return s if s.ndim == 0 else s.reshape(s.shape[0], *([1] * (x.ndim - 1)))


def flow_to_twin(x_flow: torch.Tensor, sigma) -> torch.Tensor:
    """x_VP = x_flow / c(sigma); sigma scalar or (B,). float64 math, x's dtype out."""
    return (x_flow.double() / twin_scale(_per_sample(sigma, x_flow))).to(x_flow.dtype)


def twin_to_flow(x_vp: torch.Tensor, sigma) -> torch.Tensor:
    """x_flow = c(sigma) x_VP; sigma scalar or (B,). float64 math, x's dtype out."""
    return (x_vp.double() * twin_scale(_per_sample(sigma, x_vp))).to(x_vp.dtype)


def eps_x0_from_velocity(v_hat: torch.Tensor, x_flow: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) = (x + (1 - sigma) v, x - sigma v) in float64, both finite for every
    sigma in [0, 1] (the twin's zero terminal SNR at sigma = 1 included). x_flow, v_hat: (B, ...)."""
    s = _per_sample(sigma, x_flow)
    x, v = x_flow.double(), v_hat.double()
    return x + (1 - s) * v, x - s * v


def euler_step(x_flow: torch.Tensor, v_hat: torch.Tensor, sigma_t, sigma_s) -> torch.Tensor:
    """x_s = x_t + (sigma_s - sigma_t) v_hat: FlowMatchEulerDiscreteScheduler's update."""
    return x_flow + (sigma_s - sigma_t) * v_hat


# -- the sigma grid ---------------------------------------------------------------------------
def twin_ddim_update(x0_hat: torch.Tensor, eps_hat: torch.Tensor, sigma_t, sigma_s: float, eta: float,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM(eta) step (Song et al. 2021, eq. 12) on the VP twin from noise level sigma_t to sigma_s,
    given x0_hat and eps_hat: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - s^2) eps + s z with the twin's alpha_bars
    and s = ``core.ddim.ddim_sigma`` (clamped), in float64. sigma_t: a float (the grid's) or a (B,) tensor
    (per-row model times, Time-Shift); ``noise``: z (None for eta = 0). Returns the twin state at sigma_s,
    float64; the flow state is it times c(sigma_s)."""
    from .ddim import ddim_sigma, ddim_update

    dev = x0_hat.device
    if isinstance(sigma_t, torch.Tensor):
        ab_t = twin_alpha_bar(sigma_t.to(dev, torch.float64)).reshape((-1,) + (1,) * (x0_hat.ndim - 1))
    else:
        ab_t = torch.tensor(twin_alpha_bar(float(sigma_t)), dtype=torch.float64, device=dev)
    ab_s = torch.tensor(twin_alpha_bar(float(sigma_s)), dtype=torch.float64, device=dev)
    std = ddim_sigma(ab_t, ab_s, float(eta), clamp=True)
    return ddim_update(x0_hat.double(), eps_hat.double(), ab_s, std, None if noise is None else noise.double(), clamp=True)


def is_flow_config(config: Mapping[str, Any] | None) -> bool:
    """True for a flow-matching scheduler config: a FlowMatch* class name, or the keys only
    FlowMatchEulerDiscreteScheduler has (``shift`` with ``use_dynamic_shifting``, no betas)."""
    if not config:
        return False
    get = config.get
    if str(get("_class_name", "")).startswith("FlowMatch"):
        return True
    return "use_dynamic_shifting" in config and "beta_schedule" not in config and "trained_betas" not in config


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The dynamic-shifting mu of a resolution, linear in the image token count (Esser et al. 2024,
    sec. 5.3.2, resolution-dependent shifting; diffusers' Flux ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def mu_for_config(config: Mapping[str, Any], image_seq_len: int) -> float:
    """`calculate_shift` with a FlowMatch config's base / max sequence lengths and shifts."""
    get = config.get
    return calculate_shift(int(image_seq_len), int(get("base_image_seq_len", 256)), int(get("max_image_seq_len", 4096)),
                           float(get("base_shift", 0.5) if get("base_shift") is not None else 0.5),
                           float(get("max_shift", 1.15) if get("max_shift") is not None else 1.15))


def _static_shift(shift: float, sigmas):
    """sigma' = s sigma / (1 + (s - 1) sigma) (Esser et al. 2024, eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _dynamic_shift(config: Mapping[str, Any], mu: float, sigmas):
    """exponential: e^mu / (e^mu + (1/sigma - 1)); linear: mu / (mu + (1/sigma - 1))."""
    kind = config.get("time_shift_type", "exponential")
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {kind!r}")
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return mu / (mu + (1 / sigmas - 1) ** 1.0)


def _train_sigma_range(config: Mapping[str, Any]) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the scheduler's training table, computed in float32 as its
    constructor does (sigmas = t / T for t = T..1, statically shifted unless dynamic)."""
    T = int(config.get("num_train_timesteps", 1000))
    t = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()).to(torch.float32)
    sig = t / T
    if not config.get("use_dynamic_shifting", False):
        sig = _static_shift(float(config.get("shift", 1.0)), sig)
    return sig[0].item(), sig[-1].item()


def _karras(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0):
    """Karras et al. 2022, eq. 5: (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _exponential(sigma_max: float, sigma_min: float, n: int):
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _beta(sigma_max: float, sigma_min: float, n: int, a: float = 0.6, b: float = 0.6):
    """Beta-quantile spacing (Lee et al. 2024, arXiv 2407.12173): min + ppf(1 - i/(n-1)) (max - min)."""
    import scipy.stats

    q = [scipy.stats.beta.ppf(u, a, b) for u in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in q])


def flow_sigmas(config: Mapping[str, Any], steps: int | None = None, mu: float | None = None,
                sigmas: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (N + 1,) float32 ending with the terminal value, timesteps (N,) float32) of
    FlowMatchEulerDiscreteScheduler(**config).set_timesteps(steps, sigmas=sigmas, mu=mu).

    Steps (the scheduler's order): base grid linspace(sigma_max T, sigma_min T, N) / T of the
    training table, or the caller's ``sigmas`` (Flux pipelines pass linspace(1, 1/N, N)); a dynamic
    shift with ``mu`` or the static ``shift``; the ``shift_terminal`` stretch 1 - (1 - s) (1 - s_term) /
    (1 - s_N); a Karras / exponential / beta respacing; ``timesteps = sigmas * T``; a final 0 appended
    (``invert_sigmas``: sigmas -> 1 - sigmas and a final 1). ValueError names a bad argument.
    """
    get = config.get
    T = int(get("num_train_timesteps", 1000))
    if sigmas is None and (steps is None or isinstance(steps, bool) or int(steps) < 1):
        raise ValueError(f"steps must be an integer >= 1 when no sigmas are given, got {steps!r}")
    if sigmas is not None and steps is not None and len(sigmas) != int(steps):
        raise ValueError(f"sigmas must have steps={steps} entries, got {len(sigmas)}")
    dynamic = bool(get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        raise ValueError("mu is required: the scheduler config has use_dynamic_shifting=True "
                         "(mu = calculate_shift(image_seq_len, ...), e.g. the model's extras['sigma_mu'])")
    spacings = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if get(k, False)]
    if len(spacings) > 1:
        raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set, got {spacings}")
    sigma_max, sigma_min = _train_sigma_range(config)
    if sigmas is None:
        n = int(steps)
        base = np.linspace(sigma_max * T, sigma_min * T, n) / T
    else:
        base = np.array(sigmas).astype(np.float32)
        n = len(base)
    base = _dynamic_shift(config, float(mu), base) if dynamic else _static_shift(float(get("shift", 1.0)), base)
    if get("shift_terminal"):
        one_minus = 1 - base
        base = 1 - one_minus / (one_minus[-1] / (1 - get("shift_terminal")))
    if spacings:
        lo = get("sigma_min") if get("sigma_min") is not None else base[-1].item()
        hi = get("sigma_max") if get("sigma_max") is not None else base[0].item()
        base = {"use_karras_sigmas": _karras, "use_exponential_sigmas": _exponential, "use_beta_sigmas": _beta}[spacings[0]](hi, lo, n)
    sig = torch.from_numpy(np.asarray(base)).to(dtype=torch.float32)
    if get("invert_sigmas", False):
        sig = 1.0 - sig
        return torch.cat([sig, torch.ones(1)]), sig * T
    return torch.cat([sig, torch.zeros(1)]), sig * T
