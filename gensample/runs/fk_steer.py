"""`gensample run --sampler fk-steer`: FK steering's options, batch function and registration.

The method (potentials, the particle loop, ``FKSteerConfig``) lives in ``gensample.samplers.fk_steer``;
reward plug-ins in ``gensample.rewards``. This module resolves --reward, builds one model call per
step (the model's own eps and x0 through FKC's expert function with a single expert: the
unconditional / null class, or --class-label), seeds particles and groups as FKC does, and writes the
weights and per-step rewards into samples.npz (docs/fk_steering.md "CLI").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core import smc
from ..eval.images import band_plot_png
from ..io import atomic_write_bytes
from ..rewards import resolve_reward
from ..samplers.fk_steer import DEFAULTS, FINALS, POTENTIALS, FKSteerConfig, sample_fk_steer
from ..samplers.fkc import spaced_timesteps
from ..samplers.registry import Option, RunContext, SampleBatch, SamplerSpec, register, sample_seed
from .fkc import _expert_fn

NAME = "fk-steer"
_RESAMPLE_SEED_INDEX = 2**31 - 7  # per-group resampling stream, apart from the particles' own seeds
_PER_GROUP = ("best", "one_per_group")  # finals with one output sample per group of K particles
DEMO_REWARD = "digits-classifier:3"  # the bare demo: digits-ddpm steered to class 3


def config_from_options(opts: dict) -> FKSteerConfig:
    return FKSteerConfig(lam=float(opts["lambda"]), potential=opts["potential"], resample_every=int(opts["resample_every"]),
                         ess_threshold=float(opts["ess_threshold"]), scheme=opts["scheme"], final=opts["final"])


def _reward(opts: dict):
    spec = opts.get("reward")
    if spec in (None, ""):
        raise ValueError("--reward is required for fk-steer: digits-classifier:C, quadratic:c=C,s=S or module:function "
                         "(docs/fk_steering.md \"Rewards\")")
    return resolve_reward(spec)


def _validate(opts: dict, model) -> None:
    config_from_options(opts)
    if model.kind != "diffusion":
        raise ValueError(f"sampler {NAME!r} needs a diffusion model, got kind {model.kind!r}")
    if getattr(model, "text_conditional", False) or getattr(model, "is_latent", False):
        raise ValueError(f"sampler {NAME!r} runs on pixel and mixture models in this release; {model.name!r} is a "
                         "text-to-image or latent model (docs/fk_steering.md \"Not yet\")")
    if float(opts.get("guidance_scale", 1.0)) != 1.0:
        raise ValueError(f"--guidance-scale does not apply to {NAME!r} (its proposal is the model's own eps); got "
                         f"{opts['guidance_scale']}, allowed: 1")
    label = opts.get("class_label")
    if label is not None and not getattr(model, "num_classes", 0):
        raise ValueError(f"--class-label {label}: model {model.name!r} is unconditional")
    reward = _reward(opts)
    try:  # the reward must take this model's samples: one probe row of the event shape, before any sampling
        r = reward(torch.zeros((1, *model.event_shape)))
    except Exception as err:  # a user's module may raise anything
        raise ValueError(f"--reward {opts.get('reward')!r} does not fit model {model.name!r} (samples of shape "
                         f"{tuple(model.event_shape)}): {err}") from None
    if not isinstance(r, torch.Tensor) or r.shape != (1,):
        raise ValueError(f"--reward {opts.get('reward')!r} must return a (N,) tensor, one reward per sample; got "
                         f"{type(r).__name__} {tuple(getattr(r, 'shape', ()))} for 1 sample")


def _group_hint(opts: dict, group: int) -> str:
    n = int(opts["num_samples"])
    groups = -(-n // group)
    return (f"-n counts particles, {group} per group (--particles {group}): pass -n {groups * group} for {groups} group(s), "
            f"or --final best to get {n} sample(s), the best of {group} particles each")


def _sample(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    cfg = config_from_options(opts)
    reward = _reward(opts)
    K = int(opts["particles"])
    steps = int(opts["steps"])
    sc = model.scheduler_config
    timesteps = spaced_timesteps(model.num_train_timesteps, steps, sc.get("timestep_spacing", "leading"), int(sc.get("steps_offset", 0)))
    final_ab = 1.0 if sc.get("set_alpha_to_one", True) else float(model.alphas_cumprod[0])
    den = model.denoiser()
    if cfg.final in _PER_GROUP:  # one seed per output sample = one group of K particles
        group_seeds = list(seeds)
        particle_seeds = [[sample_seed(s, j) for j in range(K)] for s in group_seeds]
    else:
        group_seeds = [seeds[g * K] for g in range(len(seeds) // K)]
        particle_seeds = [seeds[g * K:(g + 1) * K] for g in range(len(group_seeds))]
    label = opts.get("class_label")
    per_chunk = max(1, int(opts.get("batch_size") or 256) // K)
    chunks = [list(range(i, min(i + per_chunk, len(group_seeds)))) for i in range(0, len(group_seeds), per_chunk)]
    xs, ws, rs, esss, n_res = [], [], [], [], 0
    for chunk in chunks:
        chunk_seeds = [s for g in chunk for s in particle_seeds[g]]
        gens = ctx.generators(chunk_seeds)
        rgens = [torch.Generator().manual_seed(sample_seed(group_seeds[g], _RESAMPLE_SEED_INDEX)) for g in chunk]
        x_T = ctx.randn(gens, model.event_shape)
        expert = _expert_fn(den, model, [None if label is None else int(label)], x_T.shape[0], ctx.device)

        def model_fn(x, t, expert=expert):
            eps, x0 = expert(x, t)  # (1, N, ...) each
            return eps[0], x0[0]

        res = sample_fk_steer(model_fn, reward, x_T, cfg, model.alphas_cumprod, timesteps, group_size=K,
                              noise_generators=gens, resample_generators=rgens, final_alpha_bar=final_ab,
                              on_step=lambda k: ctx.step_done(1.0 / len(chunks)), sampler=NAME)
        xs.append(res.x)
        ws.append(res.weights)
        rs.append(res.rewards)
        esss.append(res.ess[res.group])  # (rows, S + 1): the group's trace on each row
        n_res += int(res.resampled.sum())
    info = {"lambda": cfg.lam, "potential": cfg.potential, "resample_every": cfg.resample_every,
            "ess_threshold": cfg.ess_threshold, "scheme": cfg.scheme, "final": cfg.final, "particles": K,
            "reward": repr(reward) if not isinstance(opts.get("reward"), str) else opts["reward"], "exact": cfg.exact}
    extras = {"weights": torch.cat(ws), "rewards": torch.cat(rs), "ess": torch.cat(esss)}
    return SampleBatch(x=torch.cat(xs), extras=extras,
                       stats={"nfe": den.calls, "model_rows": den.rows, "fk_steer_resample_events": n_res, "fk_steer": info})


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
            Option("reward", str, DEMO_REWARD, "reward: digits-classifier:C | quadratic:c=C,s=S | module:function "
                   "(importable; fn(x0_hat, prompts=None) -> (N,) tensor); the default steers the digits demo to 3"),
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
        ),
        group_size=lambda o: 1 if o.get("final") in _PER_GROUP else int(o["particles"]),
        group_hint=_group_hint,
        validate=_validate,
        write_extra=write_reward_plot,
    )
)
