"""Baseline sampling through unmodified diffusers schedulers: ddpm, ddim, dpm, euler.

DDPM (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eq. 12), DPM-Solver++ multistep
(Lu et al. 2022, Alg. 2; DPMSolverMultistepScheduler), Euler (Karras et al. 2022, Alg. 1 without
churn; EulerDiscreteScheduler). The scheduler is always built with prediction_type="epsilon":
the Denoiser converts any model parameterisation to eps first (one convention inside).
The `gensample run --sampler ddpm | ddim | dpm | euler` entries (their options, ddim's flaw and
Epsilon Scaling flags, the One More Step start) are in ``gensample.runs.baseline``.
"""

from __future__ import annotations

import inspect

import torch

from ..core.denoiser import Denoiser, check_finite
from .registry import RunContext

SCHEDULERS = ("ddpm", "ddim", "dpm", "euler")


def make_scheduler(name: str, train_config: dict, **overrides):
    """A stock diffusers scheduler on the model's training schedule, eps parameterisation."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    cfg = {k: v for k, v in train_config.items() if not k.startswith("_")}
    cfg["prediction_type"] = "epsilon"
    cfg.update(overrides)
    cls = classes[name]
    return cls.from_config(cfg)


def check_steps(steps: int, train_config: dict) -> None:
    """--steps must lie in [1, T] for the model's training schedule of T timesteps."""
    T = int(train_config.get("num_train_timesteps", 1000))
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if steps > T:
        raise ValueError(f"--steps must be <= the training schedule's {T} timesteps, got {steps}")


def epsilon_scale(timestep, scale: float = 1.0, slope: float = 0.0) -> float:
    """Epsilon Scaling factor lambda_t = k t + b (Ning et al., ICLR 2024, arXiv 2308.15321, sec. 4;
    docs/time_shift.md "Epsilon Scaling"), with b = ``scale`` and k = ``slope`` per training
    timestep t; the update uses eps_hat / lambda_t."""
    lam = float(scale) + float(slope) * float(timestep)
    if not lam > 0:
        raise ValueError(f"epsilon scale lambda_t = eps_scale + eps_scale_slope * t must be > 0, got {lam} at t={timestep}")
    return lam


def scheduler_loop(
    denoiser: Denoiser,
    scheduler,
    x_T: torch.Tensor,
    cond,
    guidance_scale: float,
    generators: list[torch.Generator] | None,
    ctx: RunContext,
    eta: float | None = None,
    eps_fn=None,
) -> torch.Tensor:
    """The generic pipeline loop (diffusers DDPMPipeline/DDIMPipeline order).

    x_T: (B, ...) initial noise already multiplied by ``scheduler.init_noise_sigma``.
    eps_fn(eps, t, x) optionally rescales eps before the step (epsilon scaling uses it).
    """
    step_params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in step_params:
        kwargs["generator"] = generators
    if eta is not None and "eta" in step_params:
        kwargs["eta"] = eta
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        eps = denoiser.guided(x_in, t, cond, guidance_scale)
        check_finite(eps, ctx.sampler, i)
        if eps_fn is not None:
            eps = eps_fn(eps, t, x)
        x = scheduler.step(eps, t, x, return_dict=True, **kwargs).prev_sample
        ctx.step_done()
    return x
