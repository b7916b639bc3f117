"""Baseline sampling through unmodified diffusers schedulers: ddpm, ddim, dpm, euler.

DDPM (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, eq. 12), DPM-Solver++ multistep
(Lu et al. 2022, Alg. 2; DPMSolverMultistepScheduler), Euler (Karras et al. 2022, Alg. 1 without
churn; EulerDiscreteScheduler). The scheduler is always built with prediction_type="epsilon":
the Denoiser converts any model parameterisation to eps first (one convention inside).
Flow-matching models (docs/flow_matching.md): ``euler`` is the model's own
FlowMatchEulerDiscreteScheduler fed the velocity (the stock SD3 / Flux loop, bit for bit); ``ddim``
and ``ddpm`` are DDIM(eta) / DDIM(1) on the model's VP twin (``FlowTwinDDIM``), whose eta = 0 step
is the flow Euler step; ``dpm`` is refused (DPMSolverMultistepScheduler has no flow grid here).
The `gensample run --sampler ddpm | ddim | dpm | euler` entries (their options, ddim's flaw and
Epsilon Scaling flags, the One More Step start) are in ``gensample.runs.baseline``.
"""

from __future__ import annotations

import inspect

import torch

from ..core.ddim import ddim_sigma, ddim_update
from ..core.denoiser import Denoiser, check_finite
from ..core.flow import eps_x0_from_velocity, is_flow_config, twin_alpha_bar, twin_ddim_update, twin_scale
from ..core.noise import normal_like
from ..core.schedule import FlowSchedule
from .registry import RunContext

SCHEDULERS = ("ddpm", "ddim", "dpm", "euler")


class FlowTwinDDIM:
    """DDIM(eta) (Song et al. 2021, eq. 12) on the VP twin of a flow model, stepped in flow space.

    The loop state x is x_sigma (flow space) and the step takes the velocity v_hat (the flow
    model's own output, as FlowMatchEulerDiscreteScheduler.step): eps_hat = x + (1 - sigma) v_hat,
    x0_hat = x - sigma v_hat (both finite at sigma = 1, where the twin's alpha_bar is 0), the DDIM
    update on the twin alpha_bars ``core.flow.twin_alpha_bar`` in float64, then x_s = c(sigma_s)
    x_VP,s. eta = 0 is the flow Euler step x + (sigma_s - sigma_t) v_hat; eta = 1 the DDPM
    posterior draw of the twin (a marginal-preserving SDE). The grid is the model's own
    (``FlowSchedule.sigmas``: shift, dynamic mu, ...). ``config`` is the flow scheduler config."""

    init_noise_sigma = 1.0
    order = 1
    takes_velocity = True  # the step takes the flow model's velocity at the flow state (FlowTwinEpsDDIM: eps)

    def __init__(self, config: dict, eta: float = 0.0):
        self.config = dict(config)
        self.eta = float(eta)
        self.timesteps = None
        self.sigmas = None

    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None, base_sigmas=None):
        sig, ts = FlowSchedule(self.config, mu, base_sigmas).sigmas(int(num_inference_steps))
        self.sigmas, self.timesteps = sig, ts.to(device) if device is not None else ts

    def scale_model_input(self, sample, timestep=None):
        return sample

    def _index(self, timestep) -> int:
        hits = (self.timesteps.cpu() == torch.as_tensor(timestep).cpu().float()).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"timestep {float(timestep)} is not on the grid; call set_timesteps first")
        return int(hits[0])

    def step(self, model_output, timestep, sample, eta: float | None = None, generator=None, return_dict: bool = True):
        from types import SimpleNamespace

        eta = self.eta if eta is None else float(eta)
        k = self._index(timestep)
        sigma_t, sigma_s = float(self.sigmas[k]), float(self.sigmas[k + 1])
        eps_hat, x0_hat = eps_x0_from_velocity(model_output, sample, sigma_t)  # float64
        # drawn in the sample's dtype (as DDIMScheduler and FKC's move draw theirs), used in float64
        noise = normal_like(sample, generator) if eta > 0 else None
        prev = (twin_ddim_update(x0_hat, eps_hat, sigma_t, sigma_s, eta, noise) * twin_scale(sigma_s)).to(sample.dtype)
        return SimpleNamespace(prev_sample=prev, pred_original_sample=x0_hat.to(sample.dtype)) if return_dict else (prev,)


class FlowTwinEpsDDIM(FlowTwinDDIM):
    """DDIM(eta) on the VP twin of a flow model for loops written on the twin (eps in, x_VP state), the
    face of DDIMScheduler.step that the inverse-problem loops use: x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab)
    (Song et al. 2021, eq. 12), or the caller's ``pred_original_sample``, which the first step of a flow
    needs (alpha_bar = 0 at sigma = 1: eps carries no information about x0 there; the loop passes the
    x0 of the velocity, ``Denoiser.eps_x0``). float64 math, the sample's dtype out."""

    takes_velocity = False

    def step(self, model_output, timestep, sample, eta: float | None = None, generator=None, return_dict: bool = True,
             pred_original_sample=None):
        from types import SimpleNamespace

        from ..core.ddim import x0_from_eps

        eta = self.eta if eta is None else float(eta)
        k = self._index(timestep)
        sigma_t, sigma_s = float(self.sigmas[k]), float(self.sigmas[k + 1])
        ab_t = torch.tensor(twin_alpha_bar(sigma_t), dtype=torch.float64)
        eps_hat = model_output.double()
        if pred_original_sample is not None:
            x0_hat = pred_original_sample.double()
        elif float(ab_t) > 0:
            x0_hat = x0_from_eps(sample.double(), eps_hat, ab_t.to(sample.device))
        else:
            raise ValueError("a step from alpha_bar = 0 (the flow's sigma = 1) needs pred_original_sample: x0 is not a "
                             "function of eps there (use Denoiser.eps_x0)")
        # drawn in the sample's dtype (as DDIMScheduler and FKC's move draw theirs), used in float64
        noise = normal_like(sample, generator) if eta > 0 else None
        prev = twin_ddim_update(x0_hat, eps_hat, sigma_t, sigma_s, eta, noise).to(sample.dtype)
        x0_out = x0_hat.to(sample.dtype)
        return SimpleNamespace(prev_sample=prev, pred_original_sample=x0_out) if return_dict else (prev, x0_out)


def next_alpha_bar(scheduler, timestep) -> float:
    """alpha_bar at the time a DDIM step from ``timestep`` lands on: DDIMScheduler's own rule (t - T // N, the
    final value below 0), else the next grid time of ``scheduler.alphas_cumprod`` (1 after the last)."""
    ts = [int(v) for v in torch.as_tensor(scheduler.timesteps).cpu().tolist()]
    table = scheduler.alphas_cumprod
    n_train = int(getattr(scheduler.config, "num_train_timesteps", len(table)))
    if type(scheduler).__name__ == "DDIMScheduler":
        prev = int(timestep) - n_train // int(scheduler.num_inference_steps)
    else:
        k = ts.index(int(timestep))
        prev = ts[k + 1] if k + 1 < len(ts) else -1
    if prev >= 0:
        return float(table[prev])
    final = getattr(scheduler, "final_alpha_cumprod", None)
    return float(final) if final is not None else 1.0


def ddim_step_from_x0(scheduler, eps_hat: torch.Tensor, timestep, sample: torch.Tensor, x0_hat: torch.Tensor,
                      eta: float = 0.0, generator=None):
    """One DDIM(eta) step (Song et al. 2021, eqs. 12 and 16) of a stock VP scheduler given x0_hat, for the step
    from alpha_bar = 0 (a zero-terminal-SNR schedule's first grid time), where x0 is not a function of eps and
    comes from the model's own output (``Denoiser.eps_x0``), as a flow's step from sigma = 1. float64 math; the
    noise is drawn as DDIMScheduler.step draws it (per-sample generators). Returns an object with
    ``prev_sample`` and ``pred_original_sample`` (the sample's dtype)."""
    from types import SimpleNamespace

    from diffusers.utils.torch_utils import randn_tensor

    ab_t = torch.tensor(float(scheduler.alphas_cumprod[int(timestep)]), dtype=torch.float64)
    ab_s = torch.tensor(next_alpha_bar(scheduler, timestep), dtype=torch.float64)
    std = ddim_sigma(ab_t, ab_s, float(eta), clamp=True)
    noise = None
    if eta > 0:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype).double()
    prev = ddim_update(x0_hat.double(), eps_hat.double(), ab_s, std, noise, clamp=True).to(sample.dtype)
    return SimpleNamespace(prev_sample=prev, pred_original_sample=x0_hat.to(sample.dtype))


def make_scheduler(name: str, train_config: dict, **overrides):
    """A stock diffusers scheduler on the model's training schedule, eps parameterisation. A flow
    model's config (``core.flow.is_flow_config``): euler -> its FlowMatchEulerDiscreteScheduler,
    ddim / ddpm -> ``FlowTwinDDIM`` with eta 0 / 1; dpm is refused."""
    if is_flow_config(train_config):
        return _make_flow_scheduler(name, train_config, **overrides)
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    cfg = {k: v for k, v in train_config.items() if not k.startswith("_")}
    cfg["prediction_type"] = "epsilon"
    cfg.update(overrides)
    cls = classes[name]
    return cls.from_config(cfg)


def _make_flow_scheduler(name: str, train_config: dict, **overrides):
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    cfg = {k: v for k, v in train_config.items() if not k.startswith("_")}
    cfg.update(overrides)
    if name == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(cfg)
    if name == "dpm":
        raise ValueError("sampler 'dpm' does not run on flow-matching models here; use euler (the model's own "
                         "FlowMatchEulerDiscreteScheduler), ddim or ddpm (DDIM on the VP twin)")
    return FlowTwinDDIM(cfg, eta=1.0 if name == "ddpm" else 0.0)


def set_grid(scheduler, steps: int, device, model=None) -> None:
    """``scheduler.set_timesteps(steps)`` on the model's own grid: a flow scheduler also gets the
    run resolution's dynamic-shift ``mu`` and the model's base sigmas (``core.schedule.model_schedule``)."""
    if not is_flow_config(getattr(scheduler, "config", None)) and not isinstance(scheduler, FlowTwinDDIM):
        scheduler.set_timesteps(steps, device=device)
        return
    from ..core.schedule import model_schedule

    sched = model_schedule(model) if model is not None else FlowSchedule(dict(scheduler.config))
    base = sched.base_sigmas(int(steps)) if callable(sched.base_sigmas) else None
    if isinstance(scheduler, FlowTwinDDIM):
        scheduler.set_timesteps(steps, device=device, mu=sched.mu, base_sigmas=sched.base_sigmas)
    else:
        scheduler.set_timesteps(steps if base is None else None, device=device, sigmas=base, mu=sched.mu)


def takes_velocity(scheduler) -> bool:
    """True for schedulers that step a flow model's own velocity in flow space: FlowMatch*, and the steppers
    whose ``takes_velocity`` says so (``FlowTwinDDIM``, ``FlowTimeShift``; not the twin's eps steppers)."""
    own = getattr(scheduler, "takes_velocity", None)
    return bool(own) if own is not None else is_flow_config(getattr(scheduler, "config", None))


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

    x_T: (B, ...) initial noise already multiplied by ``scheduler.init_noise_sigma`` (1 for flows).
    A flow scheduler (``takes_velocity``) gets the model's guided velocity at the flow state.
    eps_fn(eps, t, x) optionally rescales eps before the step (epsilon scaling uses it).
    """
    step_params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in step_params:
        kwargs["generator"] = generators
    if eta is not None and "eta" in step_params:
        kwargs["eta"] = eta
    x = x_T
    flow = takes_velocity(scheduler)
    if flow and eps_fn is not None:
        raise ValueError("Epsilon Scaling (--eps-scale, --eps-scale-slope) does not apply to flow-matching models")
    for i, t in enumerate(scheduler.timesteps):
        if flow:  # the flow model's own guided velocity at x_sigma (SD3 / Flux pipelines' loop)
            eps = denoiser.velocity(x, t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t, cond, guidance_scale)
        else:
            x_in = scheduler.scale_model_input(x, t)
            eps = denoiser.guided(x_in, t, cond, guidance_scale)
        check_finite(eps, ctx.sampler, i)
        if eps_fn is not None:
            eps = eps_fn(eps, t, x)
        x = scheduler.step(eps, t, x, return_dict=True, **kwargs).prev_sample
        ctx.step_done()
    return x
