"""`gensample run --sampler smc-post`: the SMC posterior sampler's options, batch function and registration.

The method (the twisted particle system ``sample_smc_posterior``, ``SMCPosteriorConfig`` and the
Python entry point ``posterior_samples``) lives in ``gensample.samplers.smc_posterior``. This module
parses the resolved run options into an ``SMCPosteriorConfig``, builds the measurement with the
set-up shared with dps / psld / stsl (``gensample.runs.stsl``: ``build_operator``,
``measurement_for``, ``write_extra``, and the measurement options of the ``dps`` spec), draws the
batch in chunks of whole particle systems and registers the spec (docs/smc_posterior.md).
"""

from __future__ import annotations

import torch

from ..core import smc
from ..eval.restoration import psnr, ssim
from ..samplers.baseline import make_scheduler
from ..samplers.fkc import TARGETS
from ..samplers.registry import FLOW_MODEL_OPTIONS, SAMPLERS, Option, RunContext, SampleBatch, SamplerSpec, register, sample_seed
from ..samplers.smc_posterior import DEFAULTS, FINALS, NAME, SMCPosteriorConfig, posterior_samples
from .fkc import _expert_fn, resolve_target
from .oms import OMS_START_OPTIONS, check_oms_start, oms_start
from .stsl import build_operator, measurement_for, write_extra


def _dps_spec() -> SamplerSpec:
    return SAMPLERS["dps"]  # registered by the import of .stsl above (gensample.runs.stsl)


_MEASUREMENT_KEYS = ("task", "measurement", "noise_std", "from_sample", "from_digit", "from_image", "task_seed", "missing",
                     "box_size", "sr_factor", "blur_sigma", "blur_size", "prior_var")


def _target(opts: dict, model) -> tuple[tuple, list]:
    """(betas, experts) of --fkc-target (FKC's resolution, ``gensample.runs.fkc.resolve_target``);
    ((1.0,), [None]) without it: the model's own prior."""
    if not opts.get("fkc_target"):
        for key in ("beta", "experts"):
            if opts.get(key) not in (None, ""):
                raise ValueError(f"--{key} applies with --fkc-target only (smc-post's prior is the model itself without it)")
        if float(opts.get("guidance_scale", 1.0)) != 1.0:
            raise ValueError("--guidance-scale applies to smc-post with --fkc-target cfg (CFG as a geometric target)")
        return (1.0,), [None]
    if getattr(model, "text_conditional", False):
        raise ValueError(f"--fkc-target on smc-post needs a class-conditional or unconditional model; {model.name!r} is text-to-image")
    fkc_opts = {k: v for k, v in opts.items() if k in ("fkc_target", "beta", "experts", "guidance_scale", "class_label")}
    cfg, experts = resolve_target(fkc_opts, model)
    return cfg.betas, experts


def _config(opts: dict, betas: tuple = (1.0,)) -> SMCPosteriorConfig:
    ns = opts.get("noise_std")
    return SMCPosteriorConfig(particles=int(opts["particles"]), steps=int(opts["steps"]),
                              noise_std=DEFAULTS["noise_std"] if ns is None else float(ns),
                              prior_var=opts.get("prior_var"), ess_threshold=float(opts["ess_threshold"]), scheme=opts["scheme"],
                              final=opts["final"], guidance_weight=float(opts["guidance_weight"]), betas=betas,
                              quadrature=opts.get("quadrature") or DEFAULTS["quadrature"])


def _validate(opts: dict, model) -> None:
    betas, _ = _target(opts, model)
    _config(opts, betas)
    _dps_spec().validate(opts, model)  # operator / ground-truth checks shared with dps / psld / stsl
    build_operator(opts, model)
    if opts.get("oms_module") is not None:
        check_oms_start(opts, model)


def _oms_start(model, opts: dict, seeds: list[int], cfg: SMCPosteriorConfig, ctx: RunContext):
    """x_Tp -> the One More Step start of this chunk's rows (z streams from per-row seeds), at the first grid time."""
    sched = make_scheduler("ddim", model.scheduler_config)
    sched.set_timesteps(cfg.steps, device=ctx.device)
    K = cfg.particles
    row_seeds = list(seeds) if cfg.final == "weighted" else [sample_seed(s, j) for s in seeds for j in range(K)]
    return lambda x_Tp: oms_start(model, opts, row_seeds, ctx, sched, None, x_Tp=x_Tp)[0]


def _sample(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    betas, experts = _target(opts, model)
    cfg = _config(opts, betas)
    op, y1, x_true, _ = measurement_for(opts, model, ctx)
    K = cfg.particles
    per_chunk = max(1, int(opts.get("batch_size") or 256) // K)
    unit = K if cfg.final == "weighted" else 1
    step = per_chunk * unit
    xs, lats, ws, esss, stats = [], [], [], [], {"nfe": 0, "model_rows": 0, "resample_events": 0}
    starts = range(0, len(seeds), step)
    for start in starts:  # progress: one batch = `steps` units, spread over its chunks
        chunk = seeds[start:start + step]
        rows = len(chunk) if cfg.final == "weighted" else len(chunk) * K
        fn = _expert_fn(model.denoiser(), model, experts, rows, ctx.device) if cfg.tempered else None
        begin = _oms_start(model, opts, chunk, cfg, ctx) if opts.get("oms_module") is not None else None
        res = posterior_samples(model, op, y1, chunk, cfg, ctx=ctx, on_step=lambda k: ctx.step_done(k / len(starts)),
                                experts=fn, start=begin)
        xs.append(res.x)
        if res.latents is not None:
            lats.append(res.latents.float().cpu())
        ws.append(res.weights)
        esss.append(res.ess.repeat_interleave(unit, 0))
        for k in stats:
            stats[k] += int(res.stats[k])
        stats["prior_var"] = res.stats["prior_var"]
    x = torch.cat(xs).float()
    n = x.shape[0]
    extras = {"weights": torch.cat(ws), "ess": torch.cat(esss), "y": y1.float().cpu().expand(n, *op.out_shape)}
    if lats:  # latent models: samples.npz keeps the latents beside the decoded pixels ("x")
        extras["latents"] = torch.cat(lats)
    if x_true is not None:
        xt = x_true.float().expand(n, *x_true.shape[1:])
        extras["x_true"] = xt
        if x.ndim == 4:
            extras["psnr"] = psnr(x.cpu(), xt).float()
            extras["ssim"] = ssim(x.cpu(), xt).float()
    stats.update(particles=K, final=cfg.final, steps=cfg.steps)
    if cfg.tempered:
        stats["fkc_target"] = {"target": opts["fkc_target"], "betas": list(cfg.betas), "experts": experts,
                               "quadrature": cfg.quadrature}
    return SampleBatch(x=x, extras=extras, stats=stats)


def _options() -> tuple:
    shared = tuple(o for o in _dps_spec().options if o.key in _MEASUREMENT_KEYS)
    return shared + (
        Option("particles", int, DEFAULTS["particles"], "particles K per independent system (each output sample is one system's draw; "
               "with --final weighted --num-samples counts particles)", min=1),
        Option("ess_threshold", float, DEFAULTS["ess_threshold"], "resample a system when its ESS < threshold * K (1: every step, 0: never)",
               min=0.0, max=1.0),
        Option("scheme", smc.SCHEMES, DEFAULTS["scheme"], "resampling scheme"),
        Option("final", FINALS, DEFAULTS["final"], "output: one particle per system drawn from its weights | every particle "
               "with its weight (samples.npz `weights`)"),
        Option("guidance_weight", float, DEFAULTS["guidance_weight"], "multiplier of the proposal's likelihood shift (0: unguided DDPM proposal, "
               "pure reweighting)", min=0.0),
        Option("fkc_target", TARGETS, None, "prior target as in fkc (docs/compose.md): anneal p^beta | product | cfg "
               "p(x|c)^w p(x)^(1-w); the posterior is target x likelihood [default: the model's prior]"),
        Option("beta", float, None, "with --fkc-target anneal / product: the exponent (fkc's defaults)"),
        Option("experts", str, None, "with --fkc-target: comma-separated class labels, e.g. 3,5"),
        Option("quadrature", ("euler", "logsnr"), DEFAULTS["quadrature"], "with --fkc-target: FKC's weight rule of each step"),
        *OMS_START_OPTIONS,
        *FLOW_MODEL_OPTIONS,
    )


register(SamplerSpec(
    name=NAME, description="SMC posterior sampler for linear inverse problems, twisted by the PiGDM likelihood "
    "(Twisted Diffusion Sampler, Wu et al. 2023): exact as --particles grows",
    fn=_sample, default_model="gmm2d", default_steps=50, validate=_validate, write_extra=write_extra, options=_options(),
    group_size=lambda o: int(o["particles"]) if o.get("final") == "weighted" else 1,
    flow=True,
))
