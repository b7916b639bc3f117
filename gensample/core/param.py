"""Conversions between the parameterisations of a VP denoiser.

x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps              (DDPM eq. 4)
v   = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0              (Salimans & Ho 2022, sec. 4)
score = grad log q_t(x_t) = -eps / sqrt(1 - alpha_bar)          (Song et al. 2021, eq. 3 / Tweedie)

Every sampler in gensample works on ``eps_hat``; this module is the one place that converts a
diffusers ``prediction_type`` ("epsilon" | "sample" | "v_prediction") into it; the formulas
themselves live once in `core.ddim` (these wrappers add float64 math and the output dtype).
`alpha_bar` may be a scalar or a per-sample (B,) tensor; it is broadcast over x.
"""

from __future__ import annotations

import torch

from .ddim import eps_from_v, eps_from_x0, v_from_eps, x0_from_eps, x0_from_v
from .schedule import expand_to

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _ab(alpha_bar, x):
    ab = expand_to(torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device), x)
    return ab


def eps_to_x0(eps, x_t, alpha_bar):
    ab = _ab(alpha_bar, x_t)
    return x0_from_eps(x_t.double(), eps.double(), ab).to(x_t.dtype)


def x0_to_eps(x0, x_t, alpha_bar):
    ab = _ab(alpha_bar, x_t)
    return eps_from_x0(x_t.double(), x0.double(), ab).to(x_t.dtype)


def v_to_eps(v, x_t, alpha_bar):
    """eps = sqrt(ab) v + sqrt(1-ab) x_t."""
    ab = _ab(alpha_bar, x_t)
    return eps_from_v(x_t.double(), v.double(), ab).to(x_t.dtype)


def v_to_x0(v, x_t, alpha_bar):
    """x0 = sqrt(ab) x_t - sqrt(1-ab) v."""
    ab = _ab(alpha_bar, x_t)
    return x0_from_v(x_t.double(), v.double(), ab).to(x_t.dtype)


def eps_to_v(eps, x_t, alpha_bar):
    x0 = eps_to_x0(eps, x_t, alpha_bar)
    ab = _ab(alpha_bar, x_t)
    return v_from_eps(x0.double(), eps.double(), ab).to(x_t.dtype)


def eps_to_score(eps, alpha_bar):
    ab = _ab(alpha_bar, eps)
    return (-eps.double() / (1 - ab).sqrt()).to(eps.dtype)


def score_to_eps(score, alpha_bar):
    ab = _ab(alpha_bar, score)
    return (-score.double() * (1 - ab).sqrt()).to(score.dtype)


def to_eps(model_output, x_t, alpha_bar, prediction_type: str):
    """Convert a model output of the given diffusers prediction_type to eps_hat."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return x0_to_eps(model_output, x_t, alpha_bar)
    if prediction_type == "v_prediction":
        return v_to_eps(model_output, x_t, alpha_bar)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def from_eps(eps, x_t, alpha_bar, prediction_type: str):
    """Inverse of `to_eps`: express eps_hat in the given prediction_type."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return eps_to_x0(eps, x_t, alpha_bar)
    if prediction_type == "v_prediction":
        return eps_to_v(eps, x_t, alpha_bar)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def cfg_combine(eps_uncond, eps_cond, guidance_scale: float):
    """Classifier-free guidance, diffusers convention: eps_u + w (eps_c - eps_u) (Ho & Salimans 2022)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def rescale_cfg(guided, cond, guidance_rescale: float):
    """Rescaled classifier-free guidance (Lin et al. 2024, arXiv 2305.08891, sec. 3.4, eqs. 15-16).

    x_rescaled = guided * std(cond) / std(guided), std over every non-batch dimension; the result
    is phi x_rescaled + (1 - phi) guided with phi = ``guidance_rescale`` in [0, 1]. Applied to the
    model output in its own parameterisation (as diffusers' Stable Diffusion pipelines do), since
    the ratio of standard deviations is not invariant under the eps <-> v conversion.
    guided, cond: (B, ...) tensors; returns guided's shape and dtype.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if guidance_rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    g64, c64 = guided.double(), cond.double()
    std_c = c64.std(dim=dims, keepdim=True)
    std_g = g64.std(dim=dims, keepdim=True).clamp(min=1e-30)
    rescaled = g64 * (std_c / std_g)
    return (guidance_rescale * rescaled + (1 - guidance_rescale) * g64).to(guided.dtype)
