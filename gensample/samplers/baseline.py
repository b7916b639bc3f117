"""Baseline sampling through unmodified diffusers schedulers: ddpm, ddim, dpm, euler.

DDPM (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eq. 12), DPM-Solver++ multistep
(Lu et al. 2022, Alg. 2; DPMSolverMultistepScheduler), Euler (Karras et al. 2022, Alg. 1 without
churn; EulerDiscreteScheduler). The scheduler is always built with prediction_type="epsilon":
the Denoiser converts any model parameterisation to eps first (one convention inside).
"""

from __future__ import annotations

import inspect

import torch

from ..core.denoiser import Denoiser, check_finite
from . import schedule_flaws
from .registry import Option, RunContext, SampleBatch, SamplerSpec, register

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


def _sample_with(name: str):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        steps = opts["steps"]
        check_steps(steps, model.scheduler_config)
        if name == "ddim" and schedule_flaws.zero_snr_wanted(opts, model):  # --rescale-zero-snr (docs/oms.md)
            return schedule_flaws.sample_zero_snr_ddim(model, opts, seeds, ctx)
        sched = make_scheduler(name, model.scheduler_config)
        sched.set_timesteps(steps, device=ctx.device)
        den = model.denoiser()
        gens = ctx.generators(seeds)
        x = schedule_flaws.start_noise(ctx, gens, model.event_shape, opts.get("offset_noise") or 0.0) * sched.init_noise_sigma
        cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
        eta = opts.get("eta") if name == "ddim" else None
        eps_fn = _eps_scaling(opts) if name == "ddim" else None
        x = scheduler_loop(den, sched, x, cond, opts.get("guidance_scale", 1.0), gens, ctx, eta=eta, eps_fn=eps_fn)
        return SampleBatch(x=x, stats={"nfe": den.calls, "model_rows": den.rows})

    return fn


def _eps_scaling(opts: dict):
    """Epsilon Scaling (Ning et al. 2024, arXiv 2308.15321): eps / lambda_t, lambda_t = b + k t
    (``--eps-scale`` b, ``--eps-scale-slope`` k per training timestep); None when lambda == 1."""
    scale, slope = opts.get("eps_scale", 1.0), opts.get("eps_scale_slope", 0.0)
    if scale == 1.0 and slope == 0.0:
        return None
    return lambda eps, t, x: eps / epsilon_scale(int(t), scale, slope)


_DESCRIPTIONS = {
    "ddpm": "DDPM ancestral sampling (diffusers DDPMScheduler), baseline",
    "ddim": "DDIM (diffusers DDIMScheduler, eta=0 by default), baseline",
    "dpm": "DPM-Solver++ multistep (diffusers DPMSolverMultistepScheduler), baseline",
    "euler": "Euler (diffusers EulerDiscreteScheduler), baseline",
}
_STEPS = {"ddpm": 1000, "ddim": 50, "dpm": 25, "euler": 50}

for _name in SCHEDULERS:
    register(
        SamplerSpec(
            name=_name,
            description=_DESCRIPTIONS[_name],
            fn=_sample_with(_name),
            default_model="gmm2d",
            default_steps=_STEPS[_name],
            options=(Option("eta", float, 0.0, "DDIM eta (0 = deterministic DDIM, 1 = DDPM-like)", min=0.0),
                     Option("eps_scale", float, 1.0, "Epsilon Scaling lambda (b): the update uses eps / (b + k t)", min=1e-6),
                     Option("eps_scale_slope", float, 0.0, "Epsilon Scaling slope k per training timestep t"),
                     *schedule_flaws.DDIM_FLAW_OPTIONS)
            if _name == "ddim"
            else (),
        )
    )
