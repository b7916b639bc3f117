"""`gensample run --sampler oms`: One More Step's run options, OMS start, batch function, outputs and registration.

The method (the OMS step ``oms_step`` / ``oms_initial_latents``, ``OMSConfig``, the base scheduler
``base_scheduler`` / ``run_base`` and the module loading ``load_oms``) lives in
``gensample.samplers.oms``; docs/oms.md. This module turns resolved run options into the OMS start
(``oms_start``: x_T for a base scheduler from the per-sample generators, configured by
``OMS_START_OPTIONS``, which another sampler can append to its options to start from OMS), draws
one batch with and without OMS (``sample_oms``), writes compare.png / brightness.json and registers
the spec. The ddim sampler's own flags (--eta, --rescale-zero-snr, --offset-noise, ...) are declared
where ddim is registered (``gensample.samplers.baseline``), not here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..core.ddim import SPACINGS
from ..eval.images import make_grid, png_bytes, to_uint8, with_titles
from ..io import atomic_write_bytes, atomic_write_json
from ..samplers.oms import (
    _Z_STREAM,
    BASES,
    OMSConfig,
    OMSParts,
    base_scheduler,
    first_alpha_bar,
    load_oms,
    oms_initial_latents,
    run_base,
    to_scheduler_scale,
)
from ..samplers.registry import FLOW_REFUSALS, Option, RunContext, SampleBatch, SamplerSpec, register


# -- conditioning of the OMS module from run options -----------------------------------------------
def _oms_classes(module, opts, seeds, gens_cls) -> torch.Tensor | None:
    """Per-sample OMS class: --oms-class, else --class-label, else uniform from each sample's own
    stream (drawn on that generator's device)."""
    n_cls = (module.config.num_class_embeds or 0) - 1
    if n_cls < 1:
        return None
    c = opts.get("oms_class")
    if c is None:
        c = opts.get("class_label")
    if c is not None:
        if not 0 <= c <= n_cls:
            raise ValueError(f"--oms-class must be in [0, {n_cls}] ({n_cls} = the null class), got {c}")
        return torch.full((len(seeds),), int(c), dtype=torch.long)
    return torch.stack([torch.randint(n_cls, (), generator=g, device=g.device).cpu() for g in gens_cls])


def _oms_condition(parts: OMSParts, opts: dict, model, seeds, z_gens, device):
    """(cond, uncond, extras) psi keyword dicts for this batch: class labels (null class as the
    OMS-CFG negative), or OMS text embeddings of --oms-prompt / the run's prompts ("" negative)."""
    n = len(seeds)
    if not parts.text_conditional:
        if opts.get("oms_prompt") is not None:
            raise ValueError("--oms-prompt needs a text-conditional OMS module; this one is class-conditional (--oms-class)")
        labels = _oms_classes(parts.module, opts, seeds, z_gens).to(device)
        null = torch.full_like(labels, parts.module.null_class)
        return {"class_labels": labels}, {"class_labels": null}, {"oms_class": labels.cpu()}
    if opts.get("oms_class") is not None:
        raise ValueError("--oms-class needs a class-conditional OMS module; this one is text-conditional (--oms-prompt)")
    if opts.get("oms_prompt") is not None:
        prompts = [opts["oms_prompt"]] * n
    elif getattr(model, "text_conditional", False):
        prompts = model._prompts_for(n)  # the base's prompts: sample i gets prompt i % P
    else:
        raise ValueError(f"a text-conditional OMS module needs --oms-prompt TEXT on model {model.name!r} "
                         f"(it takes no prompts of its own)")
    cond = {"encoder_hidden_states": parts.encode(prompts, device)}
    uncond = None
    if opts.get("oms_guidance", 1.0) != 1.0:
        uncond = {"encoder_hidden_states": parts.encode([""] * n, device)}  # the reference's OMS negative
    return cond, uncond, {}


# -- the OMS start: x_T for the base sampler -------------------------------------------------------
def oms_config(opts: dict) -> OMSConfig:
    """The OMS step's parameters from the run options (--oms-guidance, --oms-eta, --oms-legacy-variance)."""
    return OMSConfig(guidance_scale=opts.get("oms_guidance", 1.0), eta=opts.get("oms_eta", 1.0),
                     legacy_variance=bool(opts.get("oms_legacy_variance")))


def module_spec(opts: dict) -> str | None:
    """--oms-module as ``load_oms`` takes it: "default" (or unset) is the model's shipped module."""
    spec = opts.get("oms_module")
    return None if spec in (None, "", "default") else spec


def check_oms_flags(opts: dict) -> None:
    """The OMS start's flags on their own: exclusive conditioning flags and the step's parameters."""
    if opts.get("oms_prompt") is not None and opts.get("oms_class") is not None:
        raise ValueError("--oms-prompt and --oms-class exclude each other (a text or a class OMS module)")
    oms_config(opts)


def check_oms_start(opts: dict, model) -> None:
    """Errors of an OMS start before any sampling: model kind, the flags (``check_oms_flags``) and
    the module itself (loaded once here)."""
    if model.kind != "diffusion" or not model.is_image:
        raise ValueError(f"--oms-module needs an image diffusion model, got {model.name!r}")
    check_oms_flags(opts)
    if module_spec(opts) is None and model.extras.get("oms_module") is None:
        raise ValueError(no_module_message(model))
    parts = load_oms(module_spec(opts), model, opts.get("oms_variant"), text_override=opts.get("oms_text_encoder"))
    _check_channels(parts, model)


# The One More Step release's modules (docs/oms.md "Released checkpoints"); hub ids need the network once.
RELEASED_MODULES = "h1t/oms_b_openclip_15_21 (SD 1.5 / 2.1 latents), h1t/oms_b_openclip_xl (SDXL latents)"


def no_module_message(model) -> str:
    """The error for a model without a shipped OMS module: only what works (a released module, or
    a zoo model that ships one); training from a user's own model's data is not supported."""
    return (f"model {model.name!r} ships no OMS module; pass --oms-module with a released One More Step module "
            f"(a local copy of its folder, or a hub id: {RELEASED_MODULES}; docs/oms.md), "
            f"or try OMS on a zoo model that ships one: --model digits-flawed")


def _check_channels(parts, model) -> None:
    if parts.module.config.in_channels != model.event_shape[0]:
        raise ValueError(f"the OMS module has {parts.module.config.in_channels} input channels; model "
                         f"{model.name!r} samples {model.event_shape[0]}-channel latents: pass --oms-module with a "
                         f"module made for this model's latents ({RELEASED_MODULES}; docs/oms.md)")


def oms_start(model, opts: dict, seeds: list[int], ctx: RunContext, sched, gens,
              x_Tp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, dict]:
    """The OMS start of any base sampler: (x_T at ``sched``'s scale, extras, stats).

    Draws x_T' = ctx.randn(gens, model.event_shape) from the caller's per-sample generators (one
    draw, the bare sampler's x_T draw, so the generators then continue into the base loop exactly
    as without OMS), loads the module of --oms-module / --oms-variant / --oms-text-encoder
    (``load_oms``), conditions it (--oms-class / --class-label or --oms-prompt / the run's prompts),
    draws the OMS step's z from its own per-seed ``_Z_STREAM`` generators and returns
    ``to_scheduler_scale(oms_step(...))`` at alpha_bar of ``sched``'s first timestep (``set_timesteps``
    done). extras: per-sample arrays ("oms_class" for class modules); stats: "oms" (alpha_bar, t0,
    module, text_encoder) and "oms_calls". The options it reads are ``OMS_START_OPTIONS``.
    x_Tp: the unit-variance draw when the caller makes it itself (smc-post draws a system's K
    particles as one block); then ``gens`` is not used."""
    cfg = oms_config(opts)
    if x_Tp is None:
        x_Tp = ctx.randn(gens, model.event_shape)  # the bare sampler's x_T draw (unit variance)
    parts = load_oms(module_spec(opts), model, opts.get("oms_variant"), ctx.device, ctx.dtype,
                     opts.get("oms_text_encoder"))
    _check_channels(parts, model)
    z_gens = [torch.Generator("cpu").manual_seed(int(s) ^ _Z_STREAM) for s in seeds]
    o_cond, o_uncond, extras = _oms_condition(parts, opts, model, seeds, z_gens, ctx.device)
    a = first_alpha_bar(sched)
    x_T = oms_initial_latents(parts.module, x_Tp, o_cond, o_uncond, a, cfg, z_gens)
    stats = {"oms": {"alpha_bar": a, "t0": float(sched.timesteps[0]), "module": parts.source,
                     "text_encoder": parts.text_source},
             "oms_calls": 1 if cfg.guidance_scale == 1.0 else 2}
    return to_scheduler_scale(x_T, sched, a), extras, stats


# -- the `oms` sampler ----------------------------------------------------------------------
def sample_oms(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    """OMS in front of a base sampler (default DDIM); optionally also the bare base (compare)."""
    oms_config(opts)  # the OMS step's parameters are checked even with --skip-oms
    base = opts.get("oms_base") or "ddim"
    steps = opts["steps"]
    cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
    extras, stats = {}, {}

    def draw(with_oms: bool):
        gens = ctx.generators(seeds)
        sched, direct = base_scheduler(model, base, steps, opts, ctx.device)
        den = model.denoiser()
        if not with_oms:
            x_Tp = ctx.randn(gens, model.event_shape)
            return run_base(sched, direct, x_Tp * sched.init_noise_sigma, cond, opts, gens, ctx, den), den
        x_T, o_extras, o_stats = oms_start(model, opts, seeds, ctx, sched, gens)
        extras.update(o_extras)
        stats.update(o_stats)
        return run_base(sched, direct, x_T, cond, opts, gens, ctx, den), den

    x, den = draw(with_oms=not opts.get("skip_oms"))
    stats.update({"nfe": den.calls, "model_rows": den.rows})
    if model.is_image and not opts.get("skip_oms") and not opts.get("skip_compare"):
        x_bare, _ = draw(with_oms=False)
        extras["x_no_oms"] = x_bare
        if getattr(model, "is_latent", False):
            extras["images_no_oms"] = model.decode(x_bare)  # the decoded pixels beside the latents
    stats.setdefault("oms_calls", 0)
    return SampleBatch(x=x, extras=extras, stats=stats)


def _progress(opts: dict) -> int:
    both = not opts.get("skip_oms") and not opts.get("skip_compare")
    return opts["steps"] * (2 if both else 1)


# -- outputs: compare.png and brightness.json -----------------------------------------------
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights


def mean_luminance(images: np.ndarray, value_range=(-1.0, 1.0)) -> np.ndarray:
    """(n,) mean luminance Y in [0, 255] of images (n, C, H, W) in ``value_range``: BT.601 luma
    for 3 channels, the pixel value for 1 channel."""
    lo, hi = value_range
    x = (np.clip(np.asarray(images, dtype=np.float64), lo, hi) - lo) / (hi - lo) * 255.0
    if x.shape[1] == 3:
        x = np.tensordot(np.asarray(LUMA), x, axes=([0], [1]))  # (n, H, W)
    else:
        x = x.mean(axis=1)
    return x.reshape(len(x), -1).mean(axis=1)


def brightness_summary(arrays: dict, model) -> dict | None:
    """Mean luminance per group (the prompt of sample i % P for text models, the OMS class for
    class modules) with and without OMS: mean, its standard error (sd / sqrt(n)) and n."""
    with_px = arrays.get("images", arrays.get("x"))
    if with_px is None or np.ndim(with_px) != 4:
        return None
    vr = getattr(model, "value_range", (-1.0, 1.0))
    arms = {"with_oms": mean_luminance(with_px, vr)}
    without = arrays.get("images_no_oms", arrays.get("x_no_oms"))
    if without is not None and np.shape(without) == np.shape(with_px):
        arms["without_oms"] = mean_luminance(without, vr)
    n = len(arms["with_oms"])
    if getattr(model, "text_conditional", False):
        prompts = model.run_prompts
        keys = [prompts[i % len(prompts)] for i in range(n)]
    elif "oms_class" in arrays:
        keys = [f"class {int(c)}" for c in np.asarray(arrays["oms_class"]).reshape(-1)]
    else:
        keys = ["all"] * n
    groups: dict = {}
    for g in dict.fromkeys(keys):
        idx = np.array([k == g for k in keys])
        row = {"n": int(idx.sum())}
        for arm, y in arms.items():
            v = y[idx]
            row[arm] = float(v.mean())
            row[arm + "_se"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
        groups[g] = row
    return {"metric": "mean luminance Y in [0, 255] (BT.601), per image, averaged per group", "groups": groups}


def write_outputs(out_dir, arrays: dict, model) -> None:
    """compare.png (the same seeds without OMS, left, and with OMS, right) and brightness.json."""
    summary = brightness_summary(arrays, model)
    if summary is not None:
        atomic_write_json(Path(out_dir) / "brightness.json", summary)
    with_px = arrays.get("images", arrays.get("x"))
    without = arrays.get("images_no_oms", arrays.get("x_no_oms"))
    if without is None or np.ndim(with_px) != 4 or np.shape(without) != np.shape(with_px):
        return
    n = min(len(with_px), 64)
    vr = getattr(model, "value_range", (-1.0, 1.0))
    left, right = make_grid(to_uint8(without[:n], vr)), make_grid(to_uint8(with_px[:n], vr))
    gap = np.full((left.shape[0], 4, left.shape[2]), 255, dtype=np.uint8)
    both = np.concatenate([left, gap, right], axis=1)
    scale = max(1, 512 // both.shape[1])
    both = both.repeat(scale, 0).repeat(scale, 1)
    atomic_write_bytes(Path(out_dir) / "compare.png", png_bytes(with_titles(both, ["without OMS", "with OMS"])))


def _validate_oms(opts: dict, model) -> None:
    if model.kind != "diffusion" or not model.is_image:
        raise ValueError(f"the oms sampler needs an image diffusion model, got {model.name!r}")
    if opts.get("oms_base") not in (None, "ddim") and opts.get("eta"):
        raise ValueError("--eta applies to --oms-base ddim only")
    if opts.get("skip_oms"):
        check_oms_flags(opts)  # flags are checked even when the step is skipped
        return
    check_oms_start(opts, model)  # loading errors before any sampling


# --oms-module and the flags of the OMS start only (``oms_start``): a sampler that starts from OMS
# appends these to its options.
OMS_START_OPTIONS = (
    Option("oms-module", str, None, "OMS module: a released folder (oms_module/ ...), a module folder, a hub id, "
                                    "a zoo name or 'default' (the model's shipped module; the oms sampler's default). "
                                    "On other samplers it turns the One More Step start on"),
    Option("oms-variant", str, None, "weights variant of the OMS module (fp16: the released files)"),
    Option("oms-text-encoder", str, None, "text encoder of a text OMS module: 'base' (the base model's), or a pipeline "
                                          "folder / hub id with text_encoder/ + tokenizer/ (default: the release's own)"),
    Option("oms-prompt", str, None, "prompt for the OMS step only (text OMS modules; default: the run's --prompt)"),
    Option("oms-guidance", float, 1.0, "OMS-CFG scale w on the module output (1 = conditional only)"),
    Option("oms-class", int, None, "class fed to the OMS module (default: --class-label, else uniform per sample)", min=0),
    Option("oms-eta", float, 1.0, "eta of the OMS step (1 = DDPM posterior, the reference code)", min=0.0, max=1.0),
    Option("oms-legacy-variance", bool, False, "reproduce the reference code's variance-as-std bug"),
)

OMS_OPTIONS = OMS_START_OPTIONS + (
    Option("oms-base", BASES, "ddim", "base sampler after the OMS step"),
    Option("oms-spacing", SPACINGS, None, "override the base scheduler's timestep_spacing"),
    Option("skip-oms", bool, False, "run the bare base sampler with the same seeds (no OMS step)"),
    Option("skip-compare", bool, False, "do not also draw the no-OMS samples for compare.png"),
    Option("eta", float, 0.0, "DDIM eta (0 = deterministic DDIM, 1 = DDPM-like)", min=0.0),
)

# The bare demo (`gensample run --sampler oms`) runs 20 DDIM steps: the flaw and the fix show as
# clearly as at 50 (t0 = 951 instead of 981) at 2/5 of the cost; configs/oms.yaml holds the
# 50-step, 64-sample setting of docs/oms.md.
DEMO_STEPS = 20

register(SamplerSpec(
    name="oms",
    description="One More Step (Hu et al. 2024): a learned x_T for non-zero terminal SNR models",
    fn=sample_oms,
    default_model="digits-flawed",
    options=OMS_OPTIONS,
    default_steps=DEMO_STEPS,
    progress_total=_progress,
    validate=_validate_oms,
    write_extra=write_outputs,
    flow_refusal=FLOW_REFUSALS["oms"],
))
