"""`gensample run --sampler ts-ddim | ts-ddpm`: the Time-Shift sampler's options and batch function.

The method (Algorithm 3 of Li et al. 2024, arXiv 2305.15583) and its loop live in
``gensample.samplers.time_shift``, its scheduler in ``gensample.schedulers.time_shift``; this
module only turns resolved run options into a scheduler, draws the start noise from the
per-sample generators and registers the two specs (docs/time_shift.md).
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch

from ..core.schedule import model_schedule
from ..samplers.baseline import check_steps
from ..samplers.registry import FLOW_MODEL_OPTIONS, Option, RunContext, SampleBatch, SamplerSpec, register
from ..samplers.time_shift import (DEFAULT_VARIANT, VARIANTS, FlowTimeShift, TwinFlowTimeShift, sample_time_shift,
                                   sample_variance)
from ..schedulers.time_shift import estimate_data_var, make_time_shift_scheduler
from .oms import OMS_START_OPTIONS, check_oms_start, oms_start

DATA_VAR_PILOT = {"n": 64, "steps": 50, "seed": 2**31 - 1}  # the once-per-run estimate of Var_data


def parse_data_var(value) -> float | str | None:
    """--data-var: None (paper statistic), "auto" (estimated once from the model) or a finite number
    >= 0 other than 1 (at Var_data = 1 the reference 1 - ab (1 - Var_data) is flat in t and locates
    no time; ``samplers.time_shift.check_params``)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    allowed = "'auto' or a finite number >= 0 other than 1"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--data-var must be {allowed}, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"--data-var must be {allowed}, got {value!r}")
    if v == 1.0:
        raise ValueError(f"--data-var must be {allowed}, got {value!r}: at Var_data = 1 the reference variance "
                         f"(1 - ab) + ab * Var_data is 1 at every t, so it cannot choose a shifted time "
                         f"(for plain DDIM pass --window 0 or use --sampler ddim)")
    return v


def ts_scheduler(model, opts: dict, steps: int, eta: float, device, sampler: str, warn: bool = True, twin: bool = False):
    """(TimeShiftScheduler set to ``steps``, the Var_data it uses) from --window / --cutoff / --variant /
    --data-var. --data-var auto runs the once-per-run pilot (``DATA_VAR_PILOT``, DDIM samples of the
    model, ``estimate_data_var``); on a latent model the paper's statistic draws a warning (``warn``:
    False when only validating, so a run warns once). On a flow model: ``FlowTimeShift`` (velocity in,
    flow state), or with ``twin`` its face for loops on the VP twin, ``TwinFlowTimeShift``."""
    data_var = parse_data_var(opts.get("data_var"))
    if getattr(model, "prediction_type", None) == "flow":  # the flow stepper on the model's own sigma grid
        sched = flow_ts_scheduler(model, opts, steps, eta, device, data_var, twin)
        data_var = sched.data_var  # "auto" resolved by the pilot
    else:
        if data_var == "auto":
            g = torch.Generator(device).manual_seed(DATA_VAR_PILOT["seed"])
            pilot = torch.randn((DATA_VAR_PILOT["n"], *model.event_shape), generator=g, device=device)
            data_var = estimate_data_var(model.denoiser(), pilot, model.scheduler_config, DATA_VAR_PILOT["steps"],
                                         cond=model.cond_for(None, DATA_VAR_PILOT["n"], device))
            parse_data_var(data_var)  # an estimate of exactly 1 (a flat reference) cannot be used: say so
        sched = make_time_shift_scheduler(model.scheduler_config, window_size=opts.get("window"), cutoff=opts.get("cutoff"),
                                          variant=opts.get("variant") or DEFAULT_VARIANT, eta=float(eta), data_var=data_var)
        sched.set_timesteps(int(steps), device=device)
    # (the flow statistic sigma^2 drops (1 - sigma)^2 Var(x0) as the VP one drops alpha_bar Var(x0))
    if warn and getattr(model, "is_latent", False) and data_var is None and sched.shifting:
        warnings.warn(f"{sampler} on the latent model {model.name!r}: the paper's statistic assumes the "
                      f"data term alpha_bar Var(x0) is negligible, which does not hold for latents (variance ~1), "
                      f"so it shifts to the noisiest window edge; pass --data-var auto (or a measured value)",
                      stacklevel=3)
    return sched, data_var


def flow_ts_scheduler(model, opts: dict, steps: int, eta: float, device, data_var, twin: bool = False):
    """``FlowTimeShift`` on a flow model's grid (shift, mu, base sigmas: ``core.schedule.model_schedule``);
    --data-var auto runs the pilot of ``flow_data_var``."""
    if data_var == "auto":
        data_var = flow_data_var(model, device)
        parse_data_var(data_var)
    cls = TwinFlowTimeShift if twin else FlowTimeShift
    sched = cls(model.scheduler_config, window_size=opts.get("window"), cutoff=opts.get("cutoff"), eta=float(eta),
                data_var=data_var, variant=opts.get("variant") or DEFAULT_VARIANT)
    schedule = model_schedule(model)
    sched.set_timesteps(int(steps), device=device, mu=schedule.mu, base_sigmas=schedule.base_sigmas)
    return sched


_FLOW_DATA_VAR: dict = {}


def flow_data_var(model, device) -> float:
    """Var_data = E[var_hat(x0)] of a flow model, once per model object (the entry goes with the object, so a
    later model at the same address never reads it): the mean var_hat of ``DATA_VAR_PILOT`` unshifted samples
    (the twin DDIM, ``FlowTimeShift(enabled=False)``), as ``estimate_data_var`` for VP."""
    key = id(model)
    if key not in _FLOW_DATA_VAR:
        g = torch.Generator(device).manual_seed(DATA_VAR_PILOT["seed"])
        pilot = torch.randn((DATA_VAR_PILOT["n"], *model.event_shape), generator=g, device=device)
        sched = FlowTimeShift(model.scheduler_config, enabled=False)
        schedule = model_schedule(model)
        sched.set_timesteps(DATA_VAR_PILOT["steps"], device=device, mu=schedule.mu, base_sigmas=schedule.base_sigmas)
        x, _ = sample_time_shift(model.denoiser(), pilot, sched, cond=model.cond_for(None, DATA_VAR_PILOT["n"], device),
                                 name="ts-data-var")
        _FLOW_DATA_VAR[key] = float(sample_variance(x).mean())
        weakref.finalize(model, _FLOW_DATA_VAR.pop, key, None)
    return _FLOW_DATA_VAR[key]


def _sample_ts(eta_fixed: float | None):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        steps = opts["steps"]
        check_steps(steps, model.scheduler_config)
        eta = eta_fixed if eta_fixed is not None else opts.get("eta", 0.0)
        den = model.denoiser()
        sched, data_var = ts_scheduler(model, opts, steps, eta, ctx.device, ctx.sampler)
        gens = ctx.generators(seeds)
        extras, oms_stats = {}, {}
        if opts.get("oms_module") is not None:  # One More Step start (docs/compose.md)
            x_T, extras, oms_stats = oms_start(model, opts, seeds, ctx, sched, gens)
        else:
            x_T = ctx.randn(gens, model.event_shape) * sched.init_noise_sigma
        cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
        x, trace = sample_time_shift(den, x_T, sched, cond=cond, guidance_scale=opts.get("guidance_scale", 1.0),
                                     generator=gens, name=ctx.sampler, on_step=ctx.step_done)
        # lists, so that run.json keeps one entry per batch (numbers would be summed over batches)
        stats = {"nfe": den.calls, "model_rows": den.rows,
                 "ts_window_cutoff": [sched.window_size_eff, sched.cutoff_eff], **trace}
        if data_var is not None:
            stats["ts_data_var"] = [float(data_var)]
        return SampleBatch(x=x, extras=extras, stats={**stats, **oms_stats})

    return fn


TS_STEP_OPTIONS = (  # the step rule alone: also on fkc, dps, psld, stsl with --time-shift
    Option("window", int, None, "TS window size w (h = w//2; < 2 disables); default per step count", min=0),
    Option("cutoff", int, None, "TS cutoff t_c: shift only while t > t_c; default 200 at <= 10 steps else 300", min=0),
    Option("variant", VARIANTS, DEFAULT_VARIANT, "TS selection rule: paper (Algorithm 3) or reference_pnm (published code)"),
    Option("data_var", str, None, "data-aware TS statistic: reference (1 - ab) + ab * Var_data with Var_data "
           "'auto' (estimated once from the model) or a number >= 0, != 1; default: the paper's 1 - ab",
           check=parse_data_var),
)
TIME_SHIFT_OPTION = Option("time_shift", bool, False, "use Time-Shift (Li et al. 2024, Algorithm 3) as the step rule: the model "
                           "is called at the shifted time chosen from x_t (--window, --cutoff, --variant, --data-var; "
                           "docs/compose.md)")


def time_shift_step(model, opts: dict, steps: int, eta: float, device, sampler: str = "time-shift step",
                    warn: bool = True):
    """The Time-Shift step rule of another sampler (``--time-shift``): ``ts_scheduler`` with ``eta``
    for its DDIM(eta) update (the host loop's eta); on a flow model the twin face (the host loops run on the VP twin)."""
    return ts_scheduler(model, opts, steps, eta, device, sampler, warn, twin=True)[0]


def check_time_shift_flags(opts: dict) -> None:
    """--window / --cutoff / --data-var without --time-shift on a host sampler: an error, not a silent no-op."""
    if not opts.get("time_shift"):
        for key in ("window", "cutoff", "data_var"):
            if opts.get(key) is not None:
                raise ValueError(f"--{key.replace('_', '-')} applies with --time-shift only")


def _validate(opts: dict, model) -> None:
    if opts.get("oms_module") is not None:
        check_oms_start(opts, model)
    if getattr(model, "prediction_type", None) == "flow" and (opts.get("variant") or DEFAULT_VARIANT) != "paper":
        raise ValueError(f"--variant {opts.get('variant')} does not apply to a flow-matching model: only 'paper' "
                         f"(the reference_pnm rule moves the step's target off the model's own sigma grid)")


_TS_OPTIONS = TS_STEP_OPTIONS + OMS_START_OPTIONS + FLOW_MODEL_OPTIONS

register(SamplerSpec(
    name="ts-ddim",
    description="Time-Shift DDIM (Li et al. 2024, arXiv 2305.15583): per-sample shifted model time",
    fn=_sample_ts(None),
    default_model="digits-ddpm",
    default_steps=10,
    validate=_validate,
    flow=True,
    options=_TS_OPTIONS + (Option("eta", float, 0.0, "DDIM eta (0 = deterministic DDIM, 1 = DDPM-like)", min=0.0),),
))
register(SamplerSpec(
    name="ts-ddpm",
    description="Time-Shift DDPM (DDIM with eta = 1; Li et al. 2024, arXiv 2305.15583)",
    fn=_sample_ts(1.0),
    default_model="digits-ddpm",
    default_steps=10,
    validate=_validate,
    flow=True,
    options=_TS_OPTIONS,
))
