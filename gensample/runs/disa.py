"""`gensample run --sampler disa | mar`: DiSA's and the MAR baseline's run options, batch function and registration.

The method (step-budget schedules ``StepBudgetSchedule``, the respaced head DDPM ``HeadDDPM``, the
head sampler, the MAR loop ``sample_mar`` with ``DiSAConfig``) lives in ``gensample.samplers.disa``,
its diffusers scheduler ``DiSAHeadScheduler`` in ``gensample.schedulers.disa``; this module turns
resolved run options into a schedule and a ``DiSAConfig``, checks the model's parts, draws one
batch of a ``mar`` model and registers the two specs (docs/disa.md).
"""

from __future__ import annotations

import torch

from ..samplers.disa import CFG_SCHEDULES, SCHEDULES, DiSAConfig, HeadDDPM, StepBudgetSchedule, sample_mar
from ..samplers.registry import Option, RunContext, SampleBatch, SamplerSpec, register
from ..zoo.mar import attach_vae


def schedule_from_opts(opts: dict, annealed: bool) -> StepBudgetSchedule:
    upper = opts.get("head_steps_max", 50)
    lower = opts.get("head_steps_min", 5)
    if not annealed:  # `mar`: no annealing, S = U at every iteration
        return StepBudgetSchedule("constant", upper, upper)
    return StepBudgetSchedule(opts.get("schedule") or "linear", upper, lower)


def _validate(opts: dict, model) -> None:
    if opts.get("steps") is not None:
        raise ValueError("--steps does not apply to samplers disa/mar; use --ar-steps K and "
                         "--head-steps-max U / --head-steps-min L")
    annealed = opts["sampler"] == "disa"
    sched = schedule_from_opts(opts, annealed)
    parts = model.extras
    for key in ("backbone", "head", "num_tokens", "token_dim", "detokenize"):
        if key not in parts:
            raise ValueError(f"model {model.name!r} lacks extras[{key!r}]; a 'mar' model needs backbone, head, "
                             f"num_tokens, token_dim and detokenize (see gensample.pipelines.ar_diffusion)")
    if opts["ar_steps"] > parts["num_tokens"]:
        raise ValueError(f"--ar-steps must be <= the model's {parts['num_tokens']} tokens, got {opts['ar_steps']}")
    if sched.upper > model.num_train_timesteps:
        raise ValueError(f"--head-steps-max must be <= the head's {model.num_train_timesteps} training timesteps, got {sched.upper}")
    clip = opts.get("timestep_clip")
    if clip is not None and clip >= model.num_train_timesteps:
        raise ValueError(f"--timestep-clip must be < {model.num_train_timesteps}, got {clip}")
    if opts.get("vae") is not None:  # decode the tokens with the KL-16 VAE (model.extras["vae"])
        attach_vae(model, opts["vae"])
    if opts.get("guidance_scale", 1.0) != 1.0 and (not model.num_classes or model.null_class is None):
        raise ValueError(f"--guidance-scale needs a class-conditional model with a null class; {model.name!r} has none")


def _labels_for(model, opts: dict, generators, device) -> torch.Tensor | None:
    """--class-label for all, else one label per sample drawn uniformly from its own generator."""
    if not model.num_classes:
        return None
    if opts.get("class_label") is not None:
        return torch.full((len(generators),), int(opts["class_label"]), dtype=torch.long, device=device)
    return torch.cat([torch.randint(model.num_classes, (1,), generator=g) for g in generators]).to(device)


def _sample_with(annealed: bool):
    def fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        parts = model.extras
        gens = ctx.generators(seeds)
        labels = _labels_for(model, opts, gens, ctx.device)
        cfg = DiSAConfig(ar_steps=opts["ar_steps"], schedule=schedule_from_opts(opts, annealed),
                         temperature=opts["temperature"], guidance_scale=opts.get("guidance_scale", 1.0),
                         cfg_schedule=opts["cfg_schedule"])
        ddpm = HeadDDPM(model.alphas_cumprod, opts.get("timestep_clip"), parts.get("variance_type", "auto"))
        tokens, stats = sample_mar(parts["backbone"], parts["head"], ddpm, cfg, gens, num_tokens=parts["num_tokens"],
                                   token_dim=parts["token_dim"], class_labels=labels, null_class=model.null_class,
                                   device=ctx.device, dtype=ctx.dtype, on_step=ctx.step_done, sampler=ctx.sampler)
        x = parts["detokenize"](tokens.float())
        extras = {} if labels is None else {"class_labels": labels.cpu()}
        return SampleBatch(x=x, extras=extras, stats=stats)

    return fn


_OPTIONS = (
    Option("ar-steps", int, 8, "MAR iterations K (cosine unmasking schedule)", min=1),
    Option("head-steps-max", int, 50, "diffusion-head steps U at the first AR iteration", min=1),
    Option("head-steps-min", int, 5, "diffusion-head steps L at the last AR iteration", min=1),
    Option("schedule", SCHEDULES, "linear", "DiSA step budget S(k): linear|cosine|two-stage|constant (constant = U)"),
    Option("temperature", float, 1.0, "head temperature tau (scales the per-step noise only)", min=0.0),
    Option("timestep-clip", int, None, "map respaced head timesteps t > C to C (reference DiSA code: 950); off by default", min=0),
    Option("cfg-schedule", CFG_SCHEDULES, "linear", "MAR CFG ramp over AR iterations: linear|constant"),
    Option("vae", str, None, "KL-16 VAE checkpoint (MAR's kl16.ckpt) decoding a released MAR's tokens "
                             "(--model mar:...) to images; without it the latents are written"),
)

register(SamplerSpec(
    name="disa",
    description="DiSA (Zhao et al. 2025): MAR generation, head steps annealed U -> L over AR iterations",
    fn=_sample_with(annealed=True),
    default_model="mar-digits",
    options=_OPTIONS,
    default_steps=None,
    model_kinds=("mar",),
    progress_total=lambda opts: opts["ar_steps"],
    validate=_validate,
))
register(SamplerSpec(
    name="mar",
    description="MAR baseline (Li et al. 2024): masked AR + diffusion head, constant U head steps",
    fn=_sample_with(annealed=False),
    default_model="mar-digits",
    options=tuple(o for o in _OPTIONS if o.key not in ("head_steps_min", "schedule")),
    default_steps=None,
    model_kinds=("mar",),
    progress_total=lambda opts: opts["ar_steps"],
    validate=_validate,
))
