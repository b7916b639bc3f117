"""`gensample run --sampler ts-ddim | ts-ddpm`: the Time-Shift sampler's options and batch function.

The method (Algorithm 3 of Li et al. 2024, arXiv 2305.15583), its loop and its scheduler live in
``gensample.samplers.time_shift``; this module only turns resolved run options into a scheduler,
draws the start noise from the per-sample generators and registers the two specs
(docs/time_shift.md).
"""

from __future__ import annotations

import warnings

import torch

from ..samplers.baseline import check_steps
from ..samplers.registry import Option, RunContext, SampleBatch, SamplerSpec, register
from ..samplers.time_shift import DEFAULT_VARIANT, VARIANTS, estimate_data_var, make_time_shift_scheduler, sample_time_shift

DATA_VAR_PILOT = {"n": 64, "steps": 50, "seed": 2**31 - 1}  # the once-per-run estimate of Var_data


def parse_data_var(value) -> float | str | None:
    """--data-var: None (paper statistic), "auto" (estimated once from the model) or a number in [0, 1)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--data-var must be 'auto' or a number in [0, 1), got {value!r}") from None
    if not 0.0 <= v < 1.0:
        raise ValueError(f"--data-var must be 'auto' or a number in [0, 1), got {value!r}")
    return v


def _sample_ts(eta_fixed: float | None):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        steps = opts["steps"]
        check_steps(steps, model.scheduler_config)
        eta = eta_fixed if eta_fixed is not None else opts.get("eta", 0.0)
        den = model.denoiser()
        data_var = parse_data_var(opts.get("data_var"))
        if data_var == "auto":
            g = torch.Generator(ctx.device).manual_seed(DATA_VAR_PILOT["seed"])
            pilot = torch.randn((DATA_VAR_PILOT["n"], *model.event_shape), generator=g, device=ctx.device)
            data_var = estimate_data_var(den, pilot, model.scheduler_config, DATA_VAR_PILOT["steps"],
                                         cond=model.cond_for(None, DATA_VAR_PILOT["n"], ctx.device))
            parse_data_var(data_var)  # an estimate >= 1 cannot be used: say so
        sched = make_time_shift_scheduler(model.scheduler_config, window_size=opts.get("window"),
                                          cutoff=opts.get("cutoff"), variant=opts["variant"], eta=float(eta),
                                          data_var=data_var)
        sched.set_timesteps(steps, device=ctx.device)
        if model.is_latent and data_var is None and sched.shifting:
            warnings.warn(f"{ctx.sampler} on the latent model {model.name!r}: the paper's statistic assumes the "
                          f"data term alpha_bar Var(x0) is negligible, which does not hold for latents (variance ~1), "
                          f"so it shifts to the noisiest window edge; pass --data-var auto (or a measured value)",
                          stacklevel=2)
        gens = ctx.generators(seeds)
        x_T = ctx.randn(gens, model.event_shape) * sched.init_noise_sigma
        cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
        n_pilot = den.calls
        x, trace = sample_time_shift(den, x_T, sched, cond=cond, guidance_scale=opts.get("guidance_scale", 1.0),
                                     generator=gens, name=ctx.sampler, on_step=ctx.step_done)
        # lists, so that run.json keeps one entry per batch (numbers would be summed over batches)
        stats = {"nfe": den.calls - n_pilot, "model_rows": den.rows,
                 "ts_window_cutoff": [sched.window_size_eff, sched.cutoff_eff], **trace}
        if data_var is not None:
            stats["ts_data_var"] = [float(data_var)]
        return SampleBatch(x=x, stats=stats)

    return fn


_TS_OPTIONS = (
    Option("window", int, None, "TS window size w (h = w//2; < 2 disables); default per step count", min=0),
    Option("cutoff", int, None, "TS cutoff t_c: shift only while t > t_c; default 200 at <= 10 steps else 300", min=0),
    Option("variant", VARIANTS, DEFAULT_VARIANT, "TS selection rule: paper (Algorithm 3) or reference_pnm (published code)"),
    Option("data_var", str, None, "data-aware TS statistic: reference (1 - ab) + ab * Var_data with Var_data "
           "'auto' (estimated once from the model) or a number in [0, 1); default: the paper's 1 - ab",
           check=parse_data_var),
)

register(SamplerSpec(
    name="ts-ddim",
    description="Time-Shift DDIM (Li et al. 2024, arXiv 2305.15583): per-sample shifted model time",
    fn=_sample_ts(None),
    default_model="digits-ddpm",
    default_steps=10,
    options=_TS_OPTIONS + (Option("eta", float, 0.0, "DDIM eta (0 = deterministic DDIM, 1 = DDPM-like)", min=0.0),),
))
register(SamplerSpec(
    name="ts-ddpm",
    description="Time-Shift DDPM (DDIM with eta = 1; Li et al. 2024, arXiv 2305.15583)",
    fn=_sample_ts(1.0),
    default_model="digits-ddpm",
    default_steps=10,
    options=_TS_OPTIONS,
))
