"""`gensample run --sampler ddpm | ddim | dpm | euler`: the baseline samplers' options and batch function.

The loop (``scheduler_loop``) and the scheduler factory live in ``gensample.samplers.baseline``;
ddim's flaw options (--rescale-zero-snr, --offset-noise) in ``gensample.samplers.schedule_flaws``.
ddim and ddpm can start from One More Step (``--oms-module``, docs/compose.md): the OMS draw replaces
x_T and the loop is unchanged.
"""

from __future__ import annotations

from ..samplers import schedule_flaws
from ..samplers.baseline import SCHEDULERS, check_steps, epsilon_scale, make_scheduler, scheduler_loop, set_grid
from ..samplers.registry import FLOW_MODEL_OPTIONS, Option, RunContext, SampleBatch, SamplerSpec, register
from .oms import OMS_START_OPTIONS, check_oms_start, oms_start


def _validate_oms_start(opts: dict, model) -> None:
    if opts.get("oms_module") is None:
        return
    for key in ("offset_noise", "rescale_zero_snr"):
        if opts.get(key):
            raise ValueError(f"--oms-module replaces x_T; it excludes --{key.replace('_', '-')}")
    check_oms_start(opts, model)


def _validate(opts: dict, model) -> None:
    _validate_oms_start(opts, model)
    if getattr(model, "prediction_type", None) == "flow":
        for key in ("offset_noise", "rescale_zero_snr"):
            if opts.get(key):
                raise ValueError(f"--{key.replace('_', '-')} does not apply to a flow-matching model: a flow's grid "
                                 f"starts at sigma = 1 (pure noise, the twin's zero terminal SNR)")
        if opts.get("eps_scale", 1.0) != 1.0 or opts.get("eps_scale_slope", 0.0) != 0.0:
            raise ValueError("Epsilon Scaling (--eps-scale, --eps-scale-slope) does not apply to flow-matching models")


def _sample_with(name: str):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        steps = opts["steps"]
        check_steps(steps, model.scheduler_config)
        if name == "ddim" and schedule_flaws.zero_snr_wanted(opts, model):  # --rescale-zero-snr (docs/oms.md)
            return schedule_flaws.sample_zero_snr_ddim(model, opts, seeds, ctx)
        if name != "ddim" and model_is_zero_snr(model):  # alpha_bar_T = 0: the stock scheduler takes the raw v / x0
            return _sample_zero_snr(name, model, opts, seeds, ctx)
        sched = make_scheduler(name, model.scheduler_config)
        set_grid(sched, steps, ctx.device, model)  # a flow model's own sigma grid (shift, mu)
        den = model.denoiser()
        gens = ctx.generators(seeds)
        extras, stats = {}, {}
        if opts.get("oms_module") is not None:  # One More Step start (docs/compose.md)
            x, extras, stats = oms_start(model, opts, seeds, ctx, sched, gens)
        else:
            x = schedule_flaws.start_noise(ctx, gens, model.event_shape, opts.get("offset_noise") or 0.0) * getattr(sched, "init_noise_sigma", 1.0)
        cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
        eta = opts.get("eta") if name == "ddim" else None
        eps_fn = _eps_scaling(opts) if name == "ddim" else None
        x = scheduler_loop(den, sched, x, cond, opts.get("guidance_scale", 1.0), gens, ctx, eta=eta, eps_fn=eps_fn)
        return SampleBatch(x=x, extras=extras, stats={"nfe": den.calls, "model_rows": den.rows, **stats})

    return fn


def model_is_zero_snr(model) -> bool:
    """A VP model whose own schedule has alpha_bar_T = 0 (``rescale_betas_zero_snr``; Lin et al. 2023, Alg. 1)."""
    return getattr(model, "prediction_type", None) != "flow" and bool(model.scheduler_config.get("rescale_betas_zero_snr"))


def _sample_zero_snr(name: str, model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    """ddpm / dpm / euler on a zero-terminal-SNR model: at alpha_bar_T = 0 eps carries no information on x0
    (x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) is 0 / 0), so, as for a flow at sigma = 1, the step takes x0 from the
    model's own output: the stock scheduler is built with the model's prediction_type and fed the raw guided
    output, which is what the stock diffusers pipeline does (its Euler / DPM tables keep their own
    alpha_bar_T = 2**-24 floor). Epsilon models are refused (eps is singular there)."""
    if model.prediction_type == "epsilon":
        raise ValueError(f"model {model.name!r} predicts epsilon on a zero-terminal-SNR schedule (rescale_betas_zero_snr): "
                         f"at alpha_bar_T = 0 eps carries no information on x0; such models must predict v or x0 "
                         f"(Lin et al. 2023, sec. 3.2)")
    if opts.get("oms_module") is not None:
        raise ValueError("--oms-module does not apply to a zero-terminal-SNR model: x_T is already pure noise")
    sched = make_scheduler(name, model.scheduler_config, prediction_type=model.prediction_type)
    sched.set_timesteps(opts["steps"], device=ctx.device)
    loop_opts = {k: opts.get(k) for k in ("offset_noise", "class_label", "guidance_rescale")}  # no eta: these take none
    return schedule_flaws.sample_direct(model, {**loop_opts, "guidance_scale": opts.get("guidance_scale", 1.0)}, seeds,
                                        ctx, sched)


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
                     *schedule_flaws.DDIM_FLAW_OPTIONS, *OMS_START_OPTIONS, *FLOW_MODEL_OPTIONS)
            if _name == "ddim"
            else (*OMS_START_OPTIONS, *FLOW_MODEL_OPTIONS) if _name == "ddpm"
            else FLOW_MODEL_OPTIONS if _name == "euler" else (),
            validate=_validate if _name in ("ddim", "ddpm") else None,
            flow=_name != "dpm",
            flow_refusal="DPMSolverMultistepScheduler has no flow-matching grid here; use euler (the model's own "
                         "FlowMatchEulerDiscreteScheduler), ddim or ddpm (DDIM on the VP twin)" if _name == "dpm" else None,
        )
    )
