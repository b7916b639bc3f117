"""`gensample run --sampler fkc`: FKC's run options, target resolution, batch function, ESS plot.

The method (Skreta et al. 2025, arXiv 2503.02819: targets, FK weights, the move step, the SMC loop)
lives in ``gensample.samplers.fkc``, its diffusers scheduler in ``gensample.schedulers.fkc``; this
module turns resolved run options into an ``FKCConfig`` and expert list, calls ``sample_fkc`` with
per-sample generators and registers the spec (docs/fkc.md "CLI").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import smc
from ..core.schedule import model_schedule
from ..eval.images import band_plot_png
from ..io import atomic_write_bytes
from ..samplers.fkc import (
    DEFAULTS,
    FINALS,
    POLICIES,
    PROPOSALS,
    QUADRATURES,
    TARGET_BETA,
    TARGETS,
    FKCConfig,
    check_proposal,
    eps_and_x0,
    proposal_eta,
    sample_fkc,
)
from ..samplers.baseline import FlowTwinEpsDDIM, make_scheduler, set_grid
from ..samplers.registry import FLOW_MODEL_OPTIONS, Option, RunContext, SampleBatch, SamplerSpec, register, sample_seed
from .oms import OMS_START_OPTIONS, check_oms_start, oms_start
from .time_shift import TIME_SHIFT_OPTION, TS_STEP_OPTIONS, check_time_shift_flags, time_shift_step

_RESAMPLE_SEED_INDEX = 2**40  # sample_seed(first seed of a group, this) seeds the group's resampler
PROMPT = "<prompt>"  # text-model expert: the group's run prompt (--prompt; group g gets prompts[g % P])
NEGATIVE = "<negative prompt>"  # text-model expert: --negative-prompt, else the empty prompt


def parse_expert_prompts(text) -> list[str]:
    """'a cat|a dog' -> ['a cat', 'a dog'] (prompts as experts for text-to-image models)."""
    if text is None or text == "":
        return []
    parts = list(text) if isinstance(text, (list, tuple)) else str(text).split("|")
    parts = [str(p).strip() for p in parts]
    if any(not p for p in parts):
        raise ValueError(f"--experts-prompts must be non-empty prompts separated by '|', e.g. 'a cat|a dog', got {text!r}")
    return parts


def parse_experts(text) -> list[int]:
    """'3,5' -> [3, 5] (class labels; prompts: --experts-prompts, ``parse_expert_prompts``)."""
    if text is None or text == "":
        return []
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p.strip() for p in str(text).split(",")]
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"--experts must be comma-separated integer class labels such as 3,5, got {text!r} "
                         "(text prompts as experts on a text-to-image model: --experts-prompts 'a cat|a dog')") from None


def _config(betas: tuple, opts: dict) -> FKCConfig:
    """FKCConfig from the run options; an option left unset takes the FKCConfig field default."""
    def opt(key, default):
        return default if opts.get(key) is None else opts[key]

    D = DEFAULTS
    return FKCConfig(
        betas=betas, eta=opt("eta", D["eta"]), resample=opt("resample", D["resample"]),
        ess_threshold=opt("ess_threshold", D["ess_threshold"]),
        window=(opt("resample_from", D["window"][0]), opt("resample_until", D["window"][1])),
        scheme=opt("scheme", D["scheme"]), final=opt("final", D["final"]),
        quadrature=opt("quadrature", D["quadrature"]), max_log_increment=opts.get("max_log_increment"),
    )


def resolve_target(opts: dict, model) -> tuple[FKCConfig, list]:
    """(FKCConfig, experts) from the run options. Experts: class labels (None = unconditional /
    null class); on a text-to-image model prompts (PROMPT = the group's --prompt, NEGATIVE = the
    negative or empty prompt, or a literal prompt from --experts-prompts).

    anneal: p^beta, one expert (--experts C or --class-label C, else unconditional; text: --prompt),
        beta default 2.
    product: prod_i p(x|c_i)^beta over --experts C1,C2[,...] (text: --experts-prompts 'P1|P2'),
        beta default 1.
    cfg: p(x|c)^w p(x)^(1-w), w = --guidance-scale, c from --experts C or --class-label C (text:
        p(x|prompt)^w p(x|negative prompt)^(1-w)).
    """
    target = opts.get("fkc_target") or "anneal"
    text = bool(getattr(model, "text_conditional", False))
    prompts = parse_expert_prompts(opts.get("experts_prompts"))
    if prompts and not text:
        raise ValueError(f"--experts-prompts needs a text-to-image model; {model.name!r} is not one (use --experts C1,C2 for class labels)")
    if text and opts.get("experts") not in (None, ""):
        raise ValueError(f"--experts takes class labels; {model.name!r} is a text-to-image model: use --experts-prompts 'a cat|a dog'")
    labels = [] if text else parse_experts(opts.get("experts"))
    beta = opts.get("beta")
    w = float(opts.get("guidance_scale", 1.0))
    if target != "cfg" and w != 1.0:
        raise ValueError(f"--guidance-scale applies to --fkc-target cfg only (got target {target!r}, scale {w}); "
                         "use --beta for annealing")
    if beta is not None and beta <= 0 and target in ("anneal", "product"):
        raise ValueError(f"--beta must be > 0 for --fkc-target {target} (the target is p^beta), got {beta}")
    if text:
        if prompts and target != "product":
            raise ValueError(f"--experts-prompts applies to --fkc-target product, got --fkc-target {target}; "
                             "anneal and cfg use --prompt (and --negative-prompt)")
        if target == "anneal":
            return _config((TARGET_BETA["anneal"] if beta is None else beta,), opts), [PROMPT]
        if target == "product":
            if len(prompts) < 2:
                raise ValueError(f"--fkc-target product on a text model needs --experts-prompts 'P1|P2' (two or more prompts), got {prompts}")
            b = TARGET_BETA["product"] if beta is None else beta
            return _config(tuple([b] * len(prompts)), opts), prompts
        if target == "cfg":
            if beta is not None:
                raise ValueError("--beta does not apply to --fkc-target cfg; the CFG exponents are (w, 1 - w) with w = --guidance-scale")
            return _config((w, 1.0 - w), opts), [PROMPT, NEGATIVE]
        raise ValueError(f"--fkc-target must be one of {list(TARGETS)}, got {target!r}")
    if labels and opts.get("class_label") is not None:
        raise ValueError("give the condition either by --experts or by --class-label, not both")
    if opts.get("class_label") is not None:
        labels = [int(opts["class_label"])]
    n_cls = int(getattr(model, "num_classes", 0) or 0)
    for c in labels:
        if not 0 <= c < max(n_cls, 1) or not n_cls:
            raise ValueError(f"--experts class labels must be in [0, {n_cls - 1}] for model {model.name!r}, got {c}"
                             if n_cls else f"model {model.name!r} is unconditional: --experts needs a class-conditional model")
    if target == "anneal":
        if len(labels) > 1:
            raise ValueError(f"--fkc-target anneal takes at most one expert, got {labels}")
        betas = (TARGET_BETA["anneal"] if beta is None else beta,)
        experts = labels or [None]
    elif target == "product":
        if len(labels) < 2:
            raise ValueError(f"--fkc-target product needs --experts C1,C2 (two or more class labels), got {labels}")
        b = TARGET_BETA["product"] if beta is None else beta
        betas, experts = tuple([b] * len(labels)), labels
    elif target == "cfg":
        if beta is not None:
            raise ValueError("--beta does not apply to --fkc-target cfg; the CFG exponents are (w, 1 - w) with w = --guidance-scale")
        if len(labels) != 1:
            raise ValueError(f"--fkc-target cfg needs exactly one class (--experts C or --class-label C), got {labels}")
        if not n_cls or getattr(model, "null_class", None) is None:
            raise ValueError(f"--fkc-target cfg needs a class-conditional model with a null class; {model.name!r} has none")
        betas, experts = (w, 1.0 - w), [labels[0], None]
    else:
        raise ValueError(f"--fkc-target must be one of {list(TARGETS)}, got {target!r}")
    cfg = _config(betas, opts)
    return cfg, experts


def _implied_target(opts: dict, given: set) -> None:
    """--fkc-target left unset: ``cfg`` when --guidance-scale is given (without --beta), as every
    diffusers pipeline reads a guidance scale; else ``anneal``. run.json's config records the
    target used (docs/fkc.md)."""
    if opts.get("fkc_target") is not None:
        return
    if "guidance_scale" in given and "beta" not in given:
        opts["fkc_target"] = "cfg"
    else:
        opts["fkc_target"] = "anneal"


def _group_hint(opts: dict, group: int) -> str:
    """The whole fix for -n not a multiple of the particle group (one message, every way out)."""
    n = int(opts["num_samples"])
    groups = -(-n // group)
    return (f"-n counts particles, {group} per group (--particles {group}): pass -n {groups * group} for {groups} group(s), "
            f"or --particles {n} for one group of {n}, or --final one_per_group to get {n} sample(s), one per group "
            f"of {group} particles")


def _validate(opts: dict, model) -> None:
    cfg, _ = resolve_target(opts, model)
    if model.kind != "diffusion":
        raise ValueError(f"sampler 'fkc' needs a diffusion model, got kind {model.kind!r}")
    check_move(opts, model, cfg)


def check_move(opts: dict, model, cfg: FKCConfig) -> float:
    """The move's checks before sampling, shared by fkc and fk-steer: the Time-Shift flags, the proposal's
    own checks (window / stride, Time-Shift's target and quadrature rules) and the One More Step start.
    Returns the eta of the move that runs (the loop's own, or the proposal's: 1 for ddpm)."""
    check_time_shift_flags(opts)
    proposal = make_proposal({**opts, "data_var": None}, model, int(opts["steps"]), cfg, "cpu", warn=False)
    eta = cfg.eta
    if proposal is not None:
        eta = proposal_eta(proposal, check_proposal(proposal, proposal.timesteps, cfg))
    if opts.get("oms_module") is not None:
        check_oms_start(opts, model)
    return eta


def _stack_conds(conds: list) -> dict:
    """Concatenate M conditioning dicts (each for n rows) along the batch: expert-major rows."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def _expert_fn(den, model, experts: list, n: int, device, group_prompts: list | None = None):
    """expert_eps(x, t) -> (eps, x0), each (M, n, ...): one batched model call over all experts,
    eps and x0 formed from the raw model output (``eps_and_x0``: finite at alpha_bar = 0 for v- and
    x0-prediction models). Text models: group g (K = n / len(group_prompts) rows) is conditioned on
    group_prompts[g] (expert PROMPT), the negative / empty prompt (NEGATIVE) or a literal prompt."""
    M = len(experts)
    schedule = model_schedule(model)  # VP table or a flow model's twin (core.schedule)
    if model.text_conditional:
        K = n // len(group_prompts)
        rows = [p for p in group_prompts for _ in range(K)]
        neg = model.negative_prompt or ""
        texts = [rows if e == PROMPT else [neg] * n if e == NEGATIVE else [e] * n for e in experts]
        conds = [model.encode_prompt(tx, device) for tx in texts]
    else:
        conds = [model.cond_for(c, n, device) for c in experts]
    if all(c is None for c in conds):
        if M != 1:
            raise ValueError("several experts need a conditional model")
        cond = None
    else:
        cond = _stack_conds(conds)

    def expert_eps(x, t):
        """t: the step's grid time (scalar) or one model time per particle ((n,), Time-Shift)."""
        xs = x.repeat(M, *([1] * (x.ndim - 1)))  # (M * n, ...)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t_in, ab_t = t, schedule.alpha_bar(t.cpu()).to(x.device)
        else:
            t_in = (t if schedule.kind == "flow" else t.long()).repeat(M)  # (M * n,)
            ab_t = schedule.alpha_bar(t_in.cpu()).double().to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        out = den.raw_twin(xs, t_in, cond).to(x.dtype)  # flows: the velocity at c(sigma) x (core.flow)
        eps, x0 = eps_and_x0(out, xs, ab_t, den.prediction_type)
        return eps.to(x.dtype).reshape(M, *x.shape), x0.to(x.dtype).reshape(M, *x.shape)

    return expert_eps


def make_proposal(opts: dict, model, steps: int, cfg: FKCConfig, device, warn: bool = True):
    """The move of `sample_fkc` from --proposal / --time-shift (docs/compose.md): None for FKC's own
    float64 DDIM(eta) move, else a set diffusers scheduler (DDIMScheduler with --eta, DDPMScheduler,
    or with --time-shift a TimeShiftScheduler whose DDIM update uses eta = 1 for ddpm, --eta otherwise).
    On a flow model the same moves on its VP twin and sigma grid: ``FlowTwinEpsDDIM`` (eta --eta, or 1 for
    ddpm) and ``TwinFlowTimeShift`` (docs/flow_matching.md "Compositions on flows")."""
    kind = opts.get("proposal") or "fkc"
    if kind not in PROPOSALS:
        raise ValueError(f"--proposal must be one of {list(PROPOSALS)}, got {kind!r}")
    if opts.get("time_shift"):
        return time_shift_step(model, opts, steps, 1.0 if kind == "ddpm" else cfg.eta, device, "fkc", warn)
    if kind == "fkc":
        return None
    if model.prediction_type == "flow":  # DDIM(eta) on the VP twin, eps in (the ddim / ddpm samplers' step on flows)
        sched = FlowTwinEpsDDIM(model.scheduler_config, eta=1.0 if kind == "ddpm" else cfg.eta)
        set_grid(sched, steps, device, model)
        return sched
    sched = make_scheduler(kind, model.scheduler_config)
    sched.set_timesteps(steps, device=device)
    return sched


@dataclass
class ParticlePlan:
    """How a batch of an SMC run (fkc, fk-steer) is laid out: groups of K particles, their seeds, their
    prompts and the chunks of groups drawn together.

    per_group: one seed per output sample = one group (its K particle seeds derived with
    ``sample_seed``); else the seeds are the particles, K consecutive ones per group. A text model's
    group g (all its K particles) gets prompt g % P (run-wide indices, so shards agree)."""

    group_seeds: list
    particle_seeds: list
    group_prompts: list | None
    chunks: list

    def prompts(self, chunk) -> list | None:
        return [self.group_prompts[g] for g in chunk] if self.group_prompts is not None else None

    def start(self, chunk, model, opts: dict, ctx: RunContext, proposal, steps: int, resample_index: int):
        """(particle generators, per-group resampling generators, x_T, OMS extras or None, OMS stats) of a
        chunk: Gaussian x_T, or One More Step's start at the first grid time (docs/compose.md)."""
        chunk_seeds = [s for g in chunk for s in self.particle_seeds[g]]
        gens = ctx.generators(chunk_seeds)
        rgens = [torch.Generator().manual_seed(sample_seed(self.group_seeds[g], resample_index)) for g in chunk]
        if opts.get("oms_module") is not None:
            x_T, extras, stats = oms_start(model, opts, chunk_seeds, ctx, _first_step(proposal, model, steps, ctx), gens)
            return gens, rgens, x_T, extras, stats
        return gens, rgens, ctx.randn(gens, model.event_shape), None, {}


def particle_plan(model, opts: dict, seeds: list[int], K: int, *, per_group: bool) -> ParticlePlan:
    if per_group:
        group_seeds = list(seeds)
        particle_seeds = [[sample_seed(s, j) for j in range(K)] for s in group_seeds]
    else:
        group_seeds = [seeds[g * K] for g in range(len(seeds) // K)]
        particle_seeds = [seeds[g * K:(g + 1) * K] for g in range(len(group_seeds))]
    group_prompts = None
    if model.text_conditional:
        rows = model.batch_indices(len(seeds))  # run-wide sample indices of this batch (shards)
        groups = rows if per_group else [rows[g * K] // K for g in range(len(group_seeds))]
        group_prompts = model.prompts_at(groups)
    per_chunk = max(1, int(opts.get("batch_size") or 256) // K)
    n = len(group_seeds)
    chunks = [list(range(i, min(i + per_chunk, n))) for i in range(0, n, per_chunk)]
    return ParticlePlan(group_seeds, particle_seeds, group_prompts, chunks)


def _sample(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    cfg, experts = resolve_target(opts, model)
    K = int(opts["particles"])
    steps = int(opts["steps"])
    proposal = make_proposal(opts, model, steps, cfg, ctx.device)
    schedule = model_schedule(model)  # VP table or a flow model's twin: one loop (docs/flow_matching.md)
    timesteps = schedule.grid(steps)
    if proposal is not None:
        timesteps = proposal.timesteps.cpu()
    final_ab = schedule.final_alpha_bar()
    den = model.denoiser()
    plan = particle_plan(model, opts, seeds, K, per_group=cfg.final == "one_per_group")
    xs, ws, esss, n_res, oms_extras, oms_stats = [], [], [], 0, [], {}
    for chunk in plan.chunks:
        gens, rgens, x_T, o_extras, o_stats = plan.start(chunk, model, opts, ctx, proposal, steps, _RESAMPLE_SEED_INDEX)
        if o_extras is not None:
            oms_extras.append(o_extras)
            oms_stats = o_stats
        prompts = plan.prompts(chunk)
        fn = _expert_fn(den, model, experts, x_T.shape[0], ctx.device, prompts)
        res = sample_fkc(fn, x_T, cfg, schedule, timesteps, group_size=K, noise_generators=gens,
                         resample_generators=rgens, final_alpha_bar=final_ab,
                         on_step=lambda k, x, lw: ctx.step_done(1.0 / len(plan.chunks)), sampler="fkc", proposal=proposal)
        xs.append(res.x)
        ws.append(res.weights)
        esss.append(res.ess[res.group])  # (rows, S): the group's trace on each row
        n_res += int(res.resampled.sum())
    fkc_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    fkc_cfg.update(target=opts.get("fkc_target") or "anneal", experts=experts, particles=K,
                   proposal=opts.get("proposal") or "fkc", time_shift=bool(opts.get("time_shift")))
    if opts.get("time_shift"):
        fkc_cfg.update(ts_window_cutoff=[proposal.window_size_eff, proposal.cutoff_eff])
    extras = {"weights": torch.cat(ws), "ess": torch.cat(esss)}
    if cfg.final != "one_per_group":  # per-particle OMS extras (oms_class) line up with the rows
        for key in (oms_extras[0] if oms_extras else {}):
            extras[key] = torch.cat([e[key] for e in oms_extras])
    return SampleBatch(
        x=torch.cat(xs), extras=extras,
        stats={"nfe": den.calls, "model_rows": den.rows, "fkc_resample_events": n_res, "fkc": fkc_cfg, **oms_stats},
    )


def _first_step(proposal, model, steps: int, ctx: RunContext):
    """The scheduler whose first timestep the OMS start targets: the proposal, else the DDIM grid of FKC's own move."""
    if proposal is not None:
        return proposal
    sched = make_scheduler("ddim", model.scheduler_config)
    sched.set_timesteps(steps, device=ctx.device)
    return sched


def write_ess_plot(out_dir, arrays: dict, model) -> None:
    """ess.png: ESS over the sampling steps (median and range over groups; ``band_plot_png``)."""
    if "ess" not in arrays or arrays["ess"].size == 0:
        return
    ess = np.asarray(arrays["ess"], dtype=np.float64)  # (n, S), rows of a group repeat its trace
    uniq = np.unique(ess, axis=0)
    k_max = max(float(uniq.max()), 1.0)
    png = band_plot_png(uniq, xlabel="sampling step (noise -> data)", ylabel="ESS (before resampling)",
                        title=f"FKC effective sample size, {uniq.shape[0]} group(s)", band_label="range over groups",
                        ylim=(0, k_max * 1.05))
    atomic_write_bytes(Path(out_dir) / "ess.png", png)


register(
    SamplerSpec(
        name="fkc",
        description="Feynman-Kac correctors + SMC (arXiv 2503.02819): annealing p^beta, product of experts, CFG",
        fn=_sample,
        default_model="gmm2d",
        default_steps=100,
        options=(
            Option("fkc_target", TARGETS, None, "target: anneal (p^beta) | product (prod p(x|c_i)^beta) | cfg (p(x|c)^w p(x)^(1-w)) "
                   "[fkc: default cfg when --guidance-scale is given (as in diffusers pipelines), else anneal]"),
            Option("beta", float, None, f"exponent: anneal default {TARGET_BETA['anneal']:g}, product default {TARGET_BETA['product']:g} (each expert)"),
            Option("experts", str, None, "comma-separated class labels, e.g. 3,5"),
            Option("experts_prompts", str, None, "text-to-image models, --fkc-target product: prompts as experts separated by '|', e.g. 'a cat|a dog'"),
            Option("particles", int, 16, "particles K per group (--num-samples counts particles; with --final one_per_group it counts groups)", min=1),
            Option("resample", POLICIES, DEFAULTS["resample"], "resampling policy: every step | when ESS < threshold*K | never"),
            Option("ess_threshold", float, DEFAULTS["ess_threshold"], "ESS fraction of K below which --resample ess resamples", min=0.0, max=1.0),
            Option("resample_from", float, DEFAULTS["window"][0], "resample only while t/T <= this (1 = noise end)", min=0.0, max=1.0),
            Option("resample_until", float, DEFAULTS["window"][1], "resample only while t/T >= this", min=0.0, max=1.0),
            Option("scheme", smc.SCHEMES, DEFAULTS["scheme"], "resampling scheme"),
            Option("final", FINALS, DEFAULTS["final"], "output: resampled population | weighted particles (samples.npz `weights`; metrics use them) | one particle per group"),
            Option("eta", float, DEFAULTS["eta"], "DDIM eta of the move step (1 = DDPM / target score)", min=0.0),
            Option("quadrature", QUADRATURES, DEFAULTS["quadrature"], "log-weight rule over each step (docs/fkc.md, Discretisation bias)"),
            Option("max_log_increment", float, None, "opt-in clamp of centred log-weight increments (biased)", min=0.0),
            Option("proposal", PROPOSALS, "fkc", "move step: fkc (own float64 DDIM(eta), zero-SNR safe) | ddim (diffusers "
                   "DDIMScheduler, --eta) | ddpm (diffusers DDPMScheduler); docs/compose.md"),
            TIME_SHIFT_OPTION,
            *TS_STEP_OPTIONS,
            *OMS_START_OPTIONS,
            *FLOW_MODEL_OPTIONS,
        ),
        flow=True,
        group_size=lambda o: 1 if o.get("final") == "one_per_group" else o["particles"],
        group_hint=_group_hint,
        implied=_implied_target,
        validate=_validate,
        write_extra=write_ess_plot,
        prompt_of_sample=lambda o: ("prompts[i % len(prompts)] (one group of K particles per output sample)"
                                    if o.get("final") == "one_per_group" else
                                    f"prompts[(i // {int(o['particles'])}) % len(prompts)] (group i // K, K = --particles)"),
    )
)
