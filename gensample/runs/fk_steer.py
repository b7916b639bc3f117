"""`gensample run --sampler fk-steer`: FK steering's options, batch function and registration.

The method (potentials, the particle loop, ``FKSteerConfig``) lives in ``gensample.samplers.fk_steer``;
reward plug-ins in ``gensample.rewards``. This module resolves --reward, builds the model call of
each step from FKC's parts (``runs.fkc``: the expert function, the target of --fkc-target / --beta /
--experts / --guidance-scale, the proposal of --proposal / --time-shift, ``runs.oms``: the One More
Step start), binds each particle's prompt and the VAE decoding to the reward (latent models: the
reward sees decoded pixels), seeds particles and groups as FKC does, and writes the weights and
per-step rewards into samples.npz and the reward's cost into run.json (docs/fk_steering.md "CLI").
The grid and alpha_bars come from ``core.schedule.model_schedule``: on a flow-matching model (SD3,
Flux, ``--flow``) the loop runs on the VP twin with the flow SDE move (docs/fk_steering.md "Flow models").
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..core import smc
from ..core.schedule import model_schedule
from ..eval.images import band_plot_png
from ..io import atomic_write_bytes
from ..rewards import CallableReward, resolve_reward, reward_option
from ..samplers.fk_steer import DEFAULTS, FINALS, POTENTIALS, FKSteerConfig, sample_fk_steer
from ..samplers.registry import FLOW_MODEL_OPTIONS, SAMPLERS, Option, RunContext, SampleBatch, SamplerSpec, register
from .fkc import _expert_fn, check_move, make_proposal, particle_plan, resolve_target
from .oms import OMS_START_OPTIONS
from .time_shift import TIME_SHIFT_OPTION, TS_STEP_OPTIONS

NAME = "fk-steer"
_RESAMPLE_SEED_INDEX = 2**31 - 7  # per-group resampling stream, apart from the particles' own seeds
_PER_GROUP = ("best", "one_per_group")  # finals with one output sample per group of K particles
DEMO_REWARD = "digits-classifier:3"  # the bare demo: digits-ddpm steered to class 3
# FKC's own declarations of the options that define the base law and the move (one meaning, one help text)
_FKC_KEYS = ("fkc_target", "beta", "experts", "experts_prompts", "eta", "quadrature", "proposal")
_FKC_OPTIONS = tuple(o for o in SAMPLERS["fkc"].options if o.key in _FKC_KEYS)
DECODE_CHUNK = 8  # latent models: x0_hat is decoded by the VAE this many samples at a time before the reward


class RewardOption(Option):
    """--reward: a str for the CLI and the manifest (declared type ``str``); through the Python API it
    also takes a callable, kept as a ``CallableReward`` (whose str, ``callable:module.qualname``, is
    what run.json and the output-folder check see)."""

    def validate(self, value):
        if callable(value):
            return reward_option(value)
        return super().validate(value)


def config_from_options(opts: dict) -> FKSteerConfig:
    return FKSteerConfig(lam=float(opts["lambda"]), potential=opts["potential"], resample_every=int(opts["resample_every"]),
                         ess_threshold=float(opts["ess_threshold"]), scheme=opts["scheme"], final=opts["final"],
                         reward_every=int(opts.get("reward_every") or 1))


@lru_cache(maxsize=4)
def _resolve_named(spec: str):
    return resolve_reward(spec)  # a CLIP / aesthetic model is loaded once per process, not per batch


def _reward(opts: dict):
    spec = opts.get("reward")
    if spec in (None, ""):
        raise ValueError("--reward is required for fk-steer: digits-classifier:C, quadratic:c=C,s=S, clip[:MODEL], "
                         "aesthetic:head=FILE or module:function (docs/fk_steering.md \"Rewards\")")
    if callable(spec):
        return spec
    return _resolve_named(spec)


def _target(opts: dict, model):
    """(FKCConfig, experts) of the base law: FKC's ``resolve_target`` on the --fkc-target options;
    without --fkc-target the model's own law (one expert, beta = 1: no FKC weight)."""
    keys = ("fkc_target", "beta", "experts", "experts_prompts", "guidance_scale", "class_label", "eta", "quadrature")
    sub = {k: opts.get(k) for k in keys}
    if sub["guidance_scale"] is None:
        sub["guidance_scale"] = 1.0
    if sub["fkc_target"] is None:
        if sub["beta"] is not None:
            raise ValueError("--beta needs --fkc-target anneal or product (without --fkc-target fk-steer samples the model's own law)")
        sub.update(fkc_target="anneal", beta=1.0)
    return resolve_target(sub, model)


def _implied(opts: dict, given: set) -> None:
    """--guidance-scale without --fkc-target (and without --beta) means the CFG target, as for fkc;
    otherwise an unset --fkc-target stays unset: the model's own law (not fkc's anneal default)."""
    if opts.get("fkc_target") is None and "guidance_scale" in given and "beta" not in given:
        opts["fkc_target"] = "cfg"


def _bind_reward(reward, model, prompts: list | None):
    """reward(x0) as the loop calls it: latents decoded by the VAE (``DECODE_CHUNK`` at a time), each
    particle's prompt passed as ``prompts=`` (text-to-image models only)."""
    latent = bool(getattr(model, "is_latent", False))

    def fn(x0: torch.Tensor) -> torch.Tensor:
        images = model.decode(x0, chunk=DECODE_CHUNK) if latent else x0
        return reward(images) if prompts is None else reward(images, prompts=prompts)

    return fn


def _validate(opts: dict, model) -> None:
    config_from_options(opts)
    if model.kind != "diffusion":
        raise ValueError(f"sampler {NAME!r} needs a diffusion model, got kind {model.kind!r}")
    target, _ = _target(opts, model)
    eta = check_move(opts, model, target)  # the eta of the move that runs: the loop's own or the proposal's
    if eta <= 0:
        raise ValueError(f"--eta must be > 0 for {NAME!r}: its move must be stochastic (resampled copies of a deterministic "
                         f"move stay identical), got {eta}")
    reward = _reward(opts)
    prompts = [model.run_prompts[0]] if getattr(model, "text_conditional", False) else None
    try:  # the reward must take this model's samples: one probe row (decoded for latent models), before any sampling
        with torch.no_grad():
            r = _bind_reward(reward, model, prompts)(torch.zeros((1, *model.event_shape)))
    except Exception as err:  # a user's module may raise anything
        shape = tuple(model.extras.get("pixel_shape") or ()) if getattr(model, "is_latent", False) else tuple(model.event_shape)
        raise ValueError(f"--reward {opts.get('reward')!s} does not fit model {model.name!r} (samples of shape "
                         f"{shape}{', decoded pixels' if getattr(model, 'is_latent', False) else ''}): {err}") from None
    if not isinstance(r, torch.Tensor) or r.shape != (1,):
        raise ValueError(f"--reward {opts.get('reward')!s} must return a (N,) tensor, one reward per sample; got "
                         f"{type(r).__name__} {tuple(getattr(r, 'shape', ()))} for 1 sample")


def _group_hint(opts: dict, group: int) -> str:
    n = int(opts["num_samples"])
    groups = -(-n // group)
    return (f"-n counts particles, {group} per group (--particles {group}): pass -n {groups * group} for {groups} group(s), "
            f"or --final best to get {n} sample(s), the best of {group} particles each")


def _sample(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    cfg = config_from_options(opts)
    target, experts = _target(opts, model)
    reward = _reward(opts)
    K = int(opts["particles"])
    steps = int(opts["steps"])
    proposal = make_proposal(opts, model, steps, target, ctx.device)
    schedule = model_schedule(model)  # VP table or a flow model's twin: one loop (docs/flow_matching.md)
    timesteps = schedule.grid(steps) if proposal is None else proposal.timesteps.cpu()
    final_ab = schedule.final_alpha_bar()
    den = model.denoiser()
    per_group = cfg.final in _PER_GROUP
    plan = particle_plan(model, opts, seeds, K, per_group=per_group)  # groups, seeds, prompts, chunks as fkc
    xs, ws, rs, esss, n_res, calls, secs, oms_extras, oms_stats = [], [], [], [], 0, 0, 0.0, [], {}
    for chunk in plan.chunks:
        gens, rgens, x_T, o_extras, o_stats = plan.start(chunk, model, opts, ctx, proposal, steps, _RESAMPLE_SEED_INDEX)
        if o_extras is not None:
            oms_extras.append(o_extras)
            oms_stats = o_stats
        prompts = plan.prompts(chunk)
        row_prompts = [p for p in prompts for _ in range(K)] if prompts is not None else None
        model_fn = _expert_fn(den, model, experts, x_T.shape[0], ctx.device, prompts)  # (M, N, ...) eps and x0
        res = sample_fk_steer(model_fn, _bind_reward(reward, model, row_prompts), x_T, cfg, schedule, timesteps,
                              group_size=K, noise_generators=gens, resample_generators=rgens, final_alpha_bar=final_ab,
                              on_step=lambda k: ctx.step_done(1.0 / len(plan.chunks)), sampler=NAME, target=target,
                              proposal=proposal)
        xs.append(res.x)
        ws.append(res.weights)
        rs.append(res.rewards)
        esss.append(res.ess[res.group])  # (rows, S + 1): the group's trace on each row
        n_res += int(res.resampled.sum())
        calls += res.reward_calls
        secs += res.reward_seconds
    spec = opts.get("reward")
    info = {"lambda": cfg.lam, "potential": cfg.potential, "resample_every": cfg.resample_every,
            "ess_threshold": cfg.ess_threshold, "scheme": cfg.scheme, "final": cfg.final, "particles": K,
            "reward": str(spec) if isinstance(spec, (str, CallableReward)) else repr(reward), "exact": cfg.exact,
            "reward_every": cfg.reward_every, "target": opts.get("fkc_target") or "model",
            "betas": list(target.betas), "experts": experts, "eta": target.eta,
            "proposal": opts.get("proposal") or "fkc", "time_shift": bool(opts.get("time_shift"))}
    extras = {"weights": torch.cat(ws), "rewards": torch.cat(rs), "ess": torch.cat(esss)}
    if not per_group:  # per-particle OMS extras line up with the rows
        for key in (oms_extras[0] if oms_extras else {}):
            extras[key] = torch.cat([e[key] for e in oms_extras])
    return SampleBatch(x=torch.cat(xs), extras=extras,
                       stats={"nfe": den.calls, "model_rows": den.rows, "fk_steer_resample_events": n_res,
                              "reward_calls": calls, "reward_seconds": secs, "fk_steer": info, **oms_stats})


def write_reward_plot(out_dir, arrays: dict, model) -> None:
    """rewards.png: r(x0_hat) per step (median and range over the output rows' paths; ``band_plot_png``)."""
    if "rewards" not in arrays or np.asarray(arrays["rewards"]).size == 0:
        return
    png = band_plot_png(arrays["rewards"], xlabel="sampling step (noise -> data; last: r(x0))",  # (n, S + 1)
                        ylabel="reward of x0_hat", title="FK steering: reward along the kept paths",
                        band_label="range over samples", legend_loc="lower right")
    atomic_write_bytes(Path(out_dir) / "rewards.png", png)


register(
    SamplerSpec(
        name=NAME,
        description="Feynman-Kac steering (Singhal et al., ICML 2025): particles reweighted by a reward on x0_hat, "
                    "target p(x) exp(lambda r(x))",
        fn=_sample,
        default_model="digits-ddpm",
        default_steps=50,
        options=(
            RewardOption("reward", str, DEMO_REWARD, "reward: digits-classifier:C | quadratic:c=C,s=S | clip[:MODEL] | "
                   "aesthetic:head=FILE[,clip=MODEL] | module:function (importable; fn(x0_hat, prompts=None) -> (N,) "
                   "tensor; Python: any callable); the default steers the digits demo to 3"),
            Option("lambda", float, DEFAULTS["lam"], "tilt: target p(x) exp(lambda r(x))", min=0.0),
            Option("potential", POTENTIALS, DEFAULTS["potential"], "potential: diff (exact, telescoping) | max | sum | "
                   "instantaneous (not the tilted target; docs/fk_steering.md)"),
            Option("particles", int, 16, "particles K per group (--num-samples counts particles; with --final best / "
                   "one_per_group it counts groups)", min=1),
            Option("resample_every", int, DEFAULTS["resample_every"], "consider resampling every this many steps", min=1),
            Option("ess_threshold", float, DEFAULTS["ess_threshold"], "at a considered step, resample a group when "
                   "ESS < threshold*K (1: always, 0: never)", min=0.0, max=1.0),
            Option("scheme", smc.SCHEMES, DEFAULTS["scheme"], "resampling scheme"),
            Option("final", FINALS, DEFAULTS["final"], "output: resampled population | weighted particles (samples.npz "
                   "`weights`) | best final reward per group | one particle per group drawn by weight"),
            Option("reward_every", int, DEFAULTS["reward_every"], "score the reward every this many steps (and at the "
                   "clean end); in between the potential holds", min=1),
            *_FKC_OPTIONS,
            TIME_SHIFT_OPTION,
            *TS_STEP_OPTIONS,
            *OMS_START_OPTIONS,
            *FLOW_MODEL_OPTIONS,
        ),
        flow=True,
        group_size=lambda o: 1 if o.get("final") in _PER_GROUP else int(o["particles"]),
        group_hint=_group_hint,
        implied=_implied,
        validate=_validate,
        write_extra=write_reward_plot,
        prompt_of_sample=lambda o: ("prompts[i % len(prompts)] (one group of K particles per output sample)"
                                    if o.get("final") in _PER_GROUP else
                                    f"prompts[(i // {int(o['particles'])}) % len(prompts)] (group i // K, K = --particles)"),
    )
)
