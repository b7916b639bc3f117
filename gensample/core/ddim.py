"""The one DDIM / DDPM step and the one timestep grid, as small pure functions.

Every sampler and scheduler in gensample that takes a DDIM or DDPM step calls these; none writes
the formulas again. Notation (time is a suffix; s < t is the next, less noisy state; the names
across files are in docs/naming.md):

| code            | paper symbol                                  |
|-----------------|-----------------------------------------------|
| ``alpha_bar_t`` | alpha_t of DDIM (Song et al. 2021) = alpha-bar_t of DDPM (Ho et al. 2020) |
| ``alpha_bar_s`` | the same at the next time s (DDIM's t-1)      |
| ``eps_hat``     | eps_theta(x_t, t)                             |
| ``x0_hat``      | the "predicted x0" of DDIM eq. 12, DDPM eq. 15 |
| ``sigma_s``     | sigma_t(eta) of DDIM eq. 16                   |
| ``eta``         | DDIM's eta (0: deterministic DDIM, 1: DDPM ancestral) |

Tensors are elementwise: ``alpha_bar_*`` is a Python float, a 0-dim tensor, or a tensor that
broadcasts against x ((B, 1, ...) per sample). The functions do no dtype conversion of their own:
a caller that wants float64 math passes float64 tensors. ``coef_dtype`` casts the square-root
coefficients to that dtype before they multiply x (diffusers' DDIMScheduler computes its
coefficients in float32 from a float32 table this way; schedulers that must equal it bit for bit
pass the sample's dtype). ``clamp`` floors a variance at 0 before its square root (a rounding
guard for float64 callers; off by default, so a negative variance shows as NaN as in diffusers).
The operation order of each formula is fixed: callers rely on bit-equal results.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")


def _root(value, coef_dtype=None):
    """sqrt of a float (math.sqrt) or a tensor (Tensor.sqrt), the tensor cast to coef_dtype if given."""
    if isinstance(value, torch.Tensor):
        root = value.sqrt()
        return root if coef_dtype is None else root.to(coef_dtype)
    return math.sqrt(value)


# -- parameterisations: x0 / eps / v at one time t ------------------------------------------
def x0_from_eps(x_t, eps_hat, alpha_bar_t, *, coef_dtype=None, alpha_bar_floor: float | None = None):
    """x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t): DDIM's "predicted x0" (Song et al. 2021,
    eq. 12), the first-order Tweedie estimate (Ho et al. 2020, eq. 15).

    x_t, eps_hat: (B, ...). ``alpha_bar_floor`` raises ab_t to at least this value in the
    denominator only (a zero-terminal-SNR schedule has ab_T = 0; the numerator keeps the true ab_t).
    Returns x_t's shape in the promoted dtype of the inputs.
    """
    denominator = alpha_bar_t
    if alpha_bar_floor is not None:
        denominator = torch.as_tensor(alpha_bar_t, dtype=torch.float64).clamp(min=alpha_bar_floor)
    return (x_t - _root(1 - alpha_bar_t, coef_dtype) * eps_hat) / _root(denominator, coef_dtype)


def x0_from_eps_reciprocal(x_t, eps_hat, alpha_bar_t):
    """The same x0_hat written as x_t / sqrt(ab_t) - sqrt(1 / ab_t - 1) eps_hat (Ho et al. 2020,
    eq. 15, the form of the tabled sqrt(1/ab) and sqrt(1/ab - 1) coefficients). Kept as its own
    function because the two orders round differently, and released DDPM head samplers use this one."""
    return x_t / _root(alpha_bar_t) - _root(1 / alpha_bar_t - 1) * eps_hat


def eps_from_x0(x_t, x0_hat, alpha_bar_t, *, coef_dtype=None):
    """eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t), the inverse of `x0_from_eps`
    (x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, Ho et al. 2020, eq. 4). Shapes as `x0_from_eps`."""
    return (x_t - _root(alpha_bar_t, coef_dtype) * x0_hat) / _root(1 - alpha_bar_t, coef_dtype)


def x0_from_v(x_t, v_hat, alpha_bar_t, *, coef_dtype=None):
    """x0_hat = sqrt(ab_t) x_t - sqrt(1 - ab_t) v_hat, v = sqrt(ab) eps - sqrt(1 - ab) x0
    (Salimans & Ho 2022, sec. 4 and appendix D). x_t, v_hat: (B, ...); coef_dtype as `x0_from_eps`."""
    return _root(alpha_bar_t, coef_dtype) * x_t - _root(1 - alpha_bar_t, coef_dtype) * v_hat


def eps_from_v(x_t, v_hat, alpha_bar_t, *, coef_dtype=None):
    """eps_hat = sqrt(ab_t) v_hat + sqrt(1 - ab_t) x_t (Salimans & Ho 2022, sec. 4). x_t, v_hat: (B, ...)."""
    return _root(alpha_bar_t, coef_dtype) * v_hat + _root(1 - alpha_bar_t, coef_dtype) * x_t


def v_from_eps(x0_hat, eps_hat, alpha_bar_t):
    """v = sqrt(ab_t) eps_hat - sqrt(1 - ab_t) x0_hat, the velocity target (Salimans & Ho 2022, sec. 4)."""
    return _root(alpha_bar_t) * eps_hat - _root(1 - alpha_bar_t) * x0_hat


def q_sample(x0, noise, alpha_bar_t):
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, a draw of q(x_t | x0) (Ho et al. 2020, eq. 4);
    the schedulers' ``add_noise``. x0, noise: (B, ...)."""
    return _root(alpha_bar_t) * x0 + _root(1 - alpha_bar_t) * noise


# -- the DDIM step t -> s (Song et al. 2021, eqs. 12 and 16) --------------------------------
def ddim_sigma(alpha_bar_t, alpha_bar_s, eta: float, *, clamp: bool = False):
    """sigma_s(eta) = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s) (Song et al. 2021, eq. 16).

    eta = 1 gives the DDPM posterior standard deviation (Ho et al. 2020, eq. 7, beta-tilde);
    eta = 0 the deterministic DDIM step. Tensor alpha_bars give a tensor of their broadcast shape.
    A step from a clean time (ab_t = 1, e.g. a Time-Shift candidate at model time 0) has variance 0,
    not 0/0.
    """
    if not isinstance(alpha_bar_t, torch.Tensor) and not isinstance(alpha_bar_s, torch.Tensor) and alpha_bar_t == 1:
        return 0.0 * eta
    variance = ((1 - alpha_bar_s) / (1 - alpha_bar_t)) * (1 - alpha_bar_t / alpha_bar_s)
    if isinstance(variance, torch.Tensor):
        clean = torch.as_tensor(alpha_bar_t, device=variance.device) == 1
        if clean.any():
            variance = torch.where(clean, torch.zeros_like(variance), variance)
    if clamp:
        return eta * variance.clamp(min=0).sqrt()
    return eta * variance**0.5


def ddim_update(x0_hat, eps_hat, alpha_bar_s, sigma_s, noise=None, *, coef_dtype=None, clamp: bool = False):
    """x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma_s^2) eps_hat + sigma_s z (Song et al. 2021, eq. 12).

    x0_hat, eps_hat, noise: (B, ...); sigma_s from `ddim_sigma`; ``noise=None`` omits the last term
    (eta = 0). Returns x0_hat's shape.
    """
    direction = 1 - alpha_bar_s - sigma_s**2
    if clamp:
        direction = direction.clamp(min=0)
    x_s = _root(alpha_bar_s, coef_dtype) * x0_hat + _root(direction, coef_dtype) * eps_hat
    if noise is not None:
        x_s = x_s + (sigma_s if coef_dtype is None else sigma_s.to(coef_dtype)) * noise
    return x_s


def ddim_eps_coefficient(alpha_bar_t: float, alpha_bar_s: float, eta: float) -> float:
    """sqrt(1 - ab_s - sigma_s^2), the eps_hat coefficient of `ddim_update`, for Python floats, with
    sigma_s^2 = eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s) (Song et al. 2021, eqs. 12 and 16);
    floored at 0. Used where a sampler needs the step's scalar gain, not the step."""
    variance = eta**2 * (1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)
    return math.sqrt(max(1 - alpha_bar_s - variance, 0.0))


# -- the DDPM posterior q(x_s | x_t, x0) (Ho et al. 2020, eqs. 6-7) --------------------------
def ddpm_posterior(alpha_bar_t, alpha_bar_s):
    """Coefficients of q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, beta-tilde I) between two times of a
    (possibly respaced) chain, with beta_t = 1 - ab_t / ab_s (Ho et al. 2020, eq. 7):

        c_x0 = beta_t sqrt(ab_s) / (1 - ab_t),  c_xt = (1 - ab_s) sqrt(1 - beta_t) / (1 - ab_t),
        beta-tilde = beta_t (1 - ab_s) / (1 - ab_t).

    alpha_bar_t, alpha_bar_s: (S,) float64 tensors. Returns (beta_t, c_x0, c_xt, beta_tilde), each (S,).
    """
    beta_t = 1 - alpha_bar_t / alpha_bar_s
    beta_tilde = beta_t * (1 - alpha_bar_s) / (1 - alpha_bar_t)
    c_x0 = beta_t * alpha_bar_s.sqrt() / (1 - alpha_bar_t)
    c_xt = (1 - alpha_bar_s) * (1 - beta_t).sqrt() / (1 - alpha_bar_t)
    return beta_t, c_x0, c_xt, beta_tilde


def ddpm_posterior_mean(x0_hat, x_t, c_x0, c_xt):
    """mu-tilde(x_t, x0_hat) = c_x0 x0_hat + c_xt x_t (Ho et al. 2020, eq. 7). x0_hat, x_t: (B, ...)."""
    return c_x0 * x0_hat + c_xt * x_t


# -- the timestep grid ----------------------------------------------------------------------
def timestep_grid(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """(steps,) descending int64 training timesteps, the diffusers DDIM / DDPM spacing rules
    (Lin et al. 2024, arXiv 2305.08891, table 2):

    - leading: {j floor(T / N)} + steps_offset, j = N-1 .. 0 (ends at steps_offset);
    - trailing: round(T - j T / N) - 1, j = 0 .. N-1 (starts at T - 1);
    - linspace: round(linspace(0, T - 1, N)), reversed.
    """
    T = int(num_train_timesteps)
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "leading":
        ts = (np.arange(steps) * (T // steps)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    return torch.from_numpy(ts.copy())


def alpha_bar_pairs(alphas_cumprod: torch.Tensor, timesteps, final_alpha_bar: float = 1.0):
    """(alpha_bar at each grid time, alpha_bar at the next one; ``final_alpha_bar`` after the last),
    float64 (S,) each: the two ends of every step of an SMC loop on the grid."""
    ab = alphas_cumprod.double().cpu()
    ts = torch.as_tensor(timesteps).long().cpu()
    return ab[ts], torch.cat([ab[ts[1:]], torch.tensor([final_alpha_bar], dtype=torch.float64)])
