"""One More Step (OMS; Hu et al., "One More Step: A Versatile Plug-and-Play Module for Rectifying
Diffusion Schedule Flaws and Enhancing Low-Frequency Controls", CVPR 2024, arXiv 2311.15744;
docs/oms.md). The schedule-flaw baselines (zero terminal SNR, offset noise) are ``ddim`` options
declared in ``baseline.py`` and implemented in ``schedule_flaws.py``.

OMS adds one step in front of a frozen base sampler: the module psi maps pure noise x_T'
(virtual time T', alpha_bar_T' = 0) to v_hat = -x0_hat, and x_T is a DDIM step from T' to the
base scheduler's first timestep t0 (docs/oms.md "The step"):

    x_T = sqrt(a) x0_hat + sqrt(1 - a - sigma^2) x_T' + sigma z,   sigma^2 = eta^2 (1 - a)

| code name          | paper symbol                                        |
|--------------------|-----------------------------------------------------|
| ``x_Tp``           | x_T', pure N(0, I) noise fed to psi                 |
| ``v_c``, ``v_u``   | psi(x_T', c), psi(x_T', null) (OMS-CFG)             |
| ``w``              | oms_guidance_scale                                  |
| ``alpha_bar``      | a = alpha_bar at the base scheduler's first step t0 |
| ``eta``            | DDIM eta of the OMS step (1 = the reference code)   |
| ``x_T``            | the base sampler's initial latent (VP scale)        |

Not reproduced from the reference code (docs/oms.md "Not reproduced from the reference code"):
the noise is scaled by the std sqrt(1 - a), not the variance (``legacy_variance=True``
reproduces the bug); psi's input is unit-variance noise, never multiplied by
``init_noise_sigma``; w == 1 skips the unconditional branch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.ddim import SPACINGS
from ..core.denoiser import Denoiser, check_finite, concat_cond
from ..eval.images import make_grid, png_bytes, to_uint8, with_titles
from ..io import atomic_write_bytes, atomic_write_json
from ..models.oms import OMSModule, load_oms_release
from ..models.text import encode_prompts
from . import baseline, schedule_flaws
from .registry import Option, RunContext, SampleBatch, SamplerSpec, register

logger = logging.getLogger(__name__)

BASES = ("ddim", "ddpm", "dpm", "euler")
# z of the OMS step comes from its own per-sample stream, so the base loop's noise is the same
# with and without OMS (the reference shares one generator, so its seeds differ from the bare run).
_Z_STREAM = 0x0A5_5EED


@dataclass(frozen=True)
class OMSConfig:
    """Parameters of the OMS step (docs/oms.md "The step")."""

    guidance_scale: float = 1.0
    eta: float = 1.0
    legacy_variance: bool = False

    def __post_init__(self):
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale (oms_guidance) must be finite, got {self.guidance_scale}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta (oms_eta) must be in [0, 1], got {self.eta}")


# -- pure step functions ------------------------------------------------------------------
def oms_v(v_c: torch.Tensor, v_u: torch.Tensor | None, w: float) -> torch.Tensor:
    """OMS-CFG on the module output: v_u + w (v_c - v_u); v_c alone when w == 1 or v_u is None."""
    if v_u is None or w == 1.0:
        return v_c
    return v_u + w * (v_c - v_u)


def _gen_device(generator, fallback) -> torch.device:
    """Where a draw from ``generator`` happens: the generator's own device (None: ``fallback``)."""
    return torch.device(generator.device) if generator is not None else torch.device(fallback)


def _normal_like(x: torch.Tensor, generator) -> torch.Tensor:
    """N(0, I) float64 shaped like x (B, ...) on x's device: row b from generator[b] if a list.

    Every draw is made on its generator's device (a CUDA generator draws on CUDA, a CPU one on
    the CPU, as diffusers' ``randn_tensor`` does) and then moved to x's device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"generator list has {len(generator)} entries for a batch of {x.shape[0]}")
        rows = [torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float64, device=_gen_device(g, x.device))
                for g in generator]
        return torch.stack([r.to(x.device) for r in rows])
    return torch.randn(tuple(x.shape), generator=generator, dtype=torch.float64,
                       device=_gen_device(generator, x.device)).to(x.device)


def oms_step(v_c: torch.Tensor, v_u: torch.Tensor | None, x_Tp: torch.Tensor, alpha_bar: float, w: float = 1.0,
             eta: float = 1.0, generator=None, legacy_variance: bool = False) -> torch.Tensor:
    """x_T from the OMS prediction: a DDIM step (Song et al. 2021, eq. 12) from alpha_bar = 0 to
    ``alpha_bar`` (Hu et al. 2024, the OMS step; docs/oms.md "The step").

    v_c, v_u: (B, C, H, W) psi outputs (v at zero SNR, x0_hat = -v); v_u may be None if w == 1.
    x_Tp: (B, C, H, W) the unit-variance noise psi saw. alpha_bar: float in [0, 1).
    generator: one torch.Generator, a list of B (one per sample), or None; unused when eta == 0.
    legacy_variance: multiply z by sigma^2 instead of sigma (the reference code's bug, docs/oms.md
    "Not reproduced from the reference code").
    Returns x_T in VP scale, dtype of x_Tp; the arithmetic runs in float64.
    """
    if not 0.0 <= float(alpha_bar) < 1.0:
        raise ValueError(f"alpha_bar must be in [0, 1), got {alpha_bar}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if v_u is None and w != 1.0:
        raise ValueError("oms guidance scale w != 1 needs the unconditional output v_u")
    if v_c.shape != x_Tp.shape or (v_u is not None and v_u.shape != x_Tp.shape):
        raise ValueError(f"v_c / v_u must have the shape of x_Tp {tuple(x_Tp.shape)}")
    a = torch.tensor(float(alpha_bar), dtype=torch.float64)
    x0_hat = -oms_v(v_c.double(), None if v_u is None else v_u.double(), w)  # sign: v_T' = -x0
    var = eta**2 * (1 - a)  # sigma^2
    dir_coef = (1 - a - var).clamp(min=0).sqrt()  # 0 exactly when eta = 1
    x_T = a.sqrt() * x0_hat + dir_coef * x_Tp.double()
    if eta > 0:
        noise_coef = var if legacy_variance else var.sqrt()
        x_T = x_T + noise_coef * _normal_like(x_Tp, generator)
    return x_T.to(x_Tp.dtype)


def first_alpha_bar(scheduler) -> float:
    """alpha_bar at the base scheduler's first timestep, after set_timesteps (docs/oms.md "The step").

    Sigma-space schedulers (Euler, DPM-Solver; any with ``sigmas``): 1 / (1 + sigma_0^2), no
    truncation of a fractional t0. VP schedulers: alphas_cumprod[int(timesteps[0])]. float64.
    """
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(...) before first_alpha_bar")
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 0:
        s0 = sigmas[0].double().cpu()
        return float(1.0 / (1.0 + s0**2))
    t0 = int(scheduler.timesteps[0])
    return float(scheduler.alphas_cumprod[t0].double())


def to_scheduler_scale(x_T: torch.Tensor, scheduler, alpha_bar: float) -> torch.Tensor:
    """VP-scale x_T -> what the scheduler's loop starts from: x_T itself for VP schedulers
    (init_noise_sigma == 1), x_T / sqrt(a) = x0 + sigma_0 eps for sigma-space ones (Euler)."""
    if float(scheduler.init_noise_sigma) == 1.0:
        return x_T
    return (x_T.double() / math.sqrt(alpha_bar)).to(x_T.dtype)


@torch.no_grad()
def oms_initial_latents(module, x_Tp: torch.Tensor, cond: dict, uncond: dict | None, alpha_bar: float,
                        cfg: OMSConfig, generator=None) -> torch.Tensor:
    """Run psi (with OMS-CFG in one batched call when w != 1) and take the OMS step.

    cond / uncond: psi keyword dicts ({"class_labels": (B,)} or {"encoder_hidden_states": (B, L, D)}).
    """
    n = x_Tp.shape[0]
    x_in = x_Tp.to(module.dtype)
    if cfg.guidance_scale == 1.0:
        v_c, v_u = module(x_in, **cond).sample, None
    else:
        if uncond is None:
            raise ValueError("oms guidance scale != 1 needs an unconditional OMS input (null class or empty prompt)")
        v = module(torch.cat([x_in, x_in]), **concat_cond(cond, uncond, n, n)).sample
        v_c, v_u = v[:n], v[n:]
    check_finite(v_c if v_u is None else torch.cat([v_c, v_u]), "oms", -1)
    return oms_step(v_c.to(x_Tp.dtype), None if v_u is None else v_u.to(x_Tp.dtype), x_Tp, alpha_bar,
                    cfg.guidance_scale, cfg.eta, generator, cfg.legacy_variance)


# -- base loops -----------------------------------------------------------------------------
def base_scheduler(model, base: str, steps: int, opts: dict, device):
    """The base sampler's diffusers scheduler on the model's training schedule.

    Zero terminal SNR (``--rescale-zero-snr`` or the model's own config; ddim only): the
    schedule_flaws scheduler, fed the raw model output. Returns (scheduler, direct) where direct
    means the raw output is fed (``schedule_flaws.direct_loop``).
    """
    baseline.check_steps(steps, model.scheduler_config)
    if schedule_flaws.zero_snr_wanted(opts, model):
        if base != "ddim":
            raise ValueError(f"the zero-terminal-SNR path runs on ddim only, got base sampler {base!r}")
        return schedule_flaws.zero_snr_scheduler(model, steps, device, spacing=opts.get("oms_spacing")), True
    overrides = {"timestep_spacing": opts["oms_spacing"]} if opts.get("oms_spacing") else {}
    sched = baseline.make_scheduler(base, model.scheduler_config, **overrides)
    sched.set_timesteps(steps, device=device)
    return sched, False


def run_base(sched, direct: bool, x_T, cond, opts: dict, gens, ctx: RunContext, den: Denoiser):
    """The frozen base sampler from x_T (already at the scheduler's scale)."""
    if direct:
        return schedule_flaws.direct_loop(sched, x_T, cond, opts, gens, ctx, den)
    eta = opts.get("eta") if type(sched).__name__ == "DDIMScheduler" else None
    return baseline.scheduler_loop(den, sched, x_T, cond, opts.get("guidance_scale", 1.0), gens, ctx, eta=eta)


# -- OMS module resolution ------------------------------------------------------------------
@dataclass
class OMSParts:
    """A loaded OMS module with what conditions it: class embeddings, or a text encoder (its own,
    or the base model's when its folder ships none, as the reference pipeline does)."""

    module: OMSModule
    text_encoder: Any = None
    tokenizer: Any = None
    text_source: str | None = None  # "oms" | "base" | None (class-conditional)
    source: str = ""
    _embeds: dict = field(default_factory=dict, repr=False)

    @property
    def text_conditional(self) -> bool:
        return self.module.null_class is None

    def encode(self, prompts: list[str], device) -> torch.Tensor:
        """(len(prompts), L, D) OMS context: the text encoder's last hidden state per prompt
        (padded to the tokenizer's max length), each distinct prompt encoded once."""
        enc_dev = next(self.text_encoder.parameters()).device
        for p in dict.fromkeys(prompts):
            if p not in self._embeds:
                self._embeds[p] = encode_prompts(self.tokenizer, self.text_encoder, [p], enc_dev)[0]
        return torch.stack([self._embeds[p] for p in prompts]).to(device)


def _text_override(where: str, variant: str | None):
    """(text_encoder, tokenizer) from a pipeline folder or hub id with text_encoder/ + tokenizer/."""
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        try:
            enc = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", variant=variant, torch_dtype=torch.float32)
        except (OSError, ValueError):
            if variant is None:
                raise
            enc = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=torch.float32)
        return enc.eval(), CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
    except (OSError, ValueError) as err:
        raise ValueError(f"--oms-text-encoder {where}: cannot load text_encoder/ and tokenizer/ from it "
                         f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _load_parts(spec: str, model, variant: str | None, text_override: str | None = None) -> OMSParts:
    from .. import zoo
    from ..models.loading import _ensure_registered

    if not Path(spec).exists():
        _ensure_registered()
        if spec in zoo.ZOO:
            loaded = zoo.ZOO[spec].loader()
            if loaded.kind != "oms":
                raise ValueError(f"--oms-module {spec!r} is a {loaded.kind!r} model, not an OMS module")
            return OMSParts(module=loaded.unet, source=spec)
    rel = load_oms_release(spec, variant, text=text_override is None)
    parts = OMSParts(module=rel.module, text_encoder=rel.text_encoder, tokenizer=rel.tokenizer,
                     text_source="oms" if rel.text_encoder is not None else None, source=rel.sources.get("module", spec))
    if text_override not in (None, "base"):
        parts.text_encoder, parts.tokenizer = _text_override(text_override, variant)
        parts.text_source = "oms"
    if parts.text_conditional and parts.text_encoder is None:
        enc, tok = model.extras.get("text_encoder"), model.extras.get("tokenizer")
        if enc is None or tok is None:
            raise ValueError(f"--oms-module {spec}: a text-conditional OMS module needs a text encoder; its folder has "
                             f"no oms_text_encoder/ and model {model.name!r} has none to fall back to")
        parts.text_encoder, parts.tokenizer, parts.text_source = enc, tok, "base"
    if parts.text_conditional:
        dim = int(getattr(parts.text_encoder.config, "hidden_size", -1))
        want = int(parts.module.config.cross_attention_dim)
        if dim != want:
            where = "its own oms_text_encoder" if parts.text_source == "oms" else f"the base model {model.name!r}'s text encoder (fallback)"
            raise ValueError(f"--oms-module {spec}: the module attends to {want}-dim text embeddings but {where} "
                             f"gives {dim}-dim ones")
    return parts


def load_oms(spec: str | None, model, variant: str | None = None, device=None, dtype=None,
             text_override: str | None = None) -> OMSParts:
    """The OMS parts for a run: ``spec`` (folder, release folder, hub id or zoo OMS name; None:
    the model's shipped module), cached on the model so that every batch reuses one load.
    text_override: "base" (the base model's text encoder) or a pipeline folder / hub id whose
    text_encoder/ and tokenizer/ replace the release's own (``--oms-text-encoder``)."""
    if spec is None:
        default = model.extras.get("oms_module")
        if default is None:
            raise ValueError(f"model {model.name!r} has no default OMS module; pass --oms-module PATH "
                             f"(a released OMS folder, or one from `gensample train oms --base {model.name}`)")
        spec = str(default)
    cache = model.extras.setdefault("_oms_cache", {})
    key = (str(spec), variant, text_override)
    if key not in cache:
        cache[key] = _load_parts(str(spec), model, variant, text_override)
    parts = cache[key]
    if device is not None:
        if dtype in (None, torch.float32):
            parts.module.to(device)
        else:
            parts.module.to(device=device, dtype=dtype)
        if parts.text_source == "oms":
            parts.text_encoder.to(device)
    return parts


def load_oms_module(spec: str | None, model, variant: str | None = None) -> OMSModule:
    """The OMSModule alone (see ``load_oms``)."""
    return load_oms(spec, model, variant).module


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


# -- the `oms` sampler ----------------------------------------------------------------------
def sample_oms(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
    """OMS in front of a base sampler (default DDIM); optionally also the bare base (compare)."""
    cfg = OMSConfig(guidance_scale=opts.get("oms_guidance", 1.0), eta=opts.get("oms_eta", 1.0),
                    legacy_variance=bool(opts.get("oms_legacy_variance")))
    base = opts.get("oms_base") or "ddim"
    steps = opts["steps"]
    cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
    extras, stats = {}, {}

    def draw(with_oms: bool):
        gens = ctx.generators(seeds)
        sched, direct = base_scheduler(model, base, steps, opts, ctx.device)
        den = model.denoiser()
        x_Tp = ctx.randn(gens, model.event_shape)  # the bare sampler's x_T draw (unit variance)
        if not with_oms:
            return run_base(sched, direct, x_Tp * sched.init_noise_sigma, cond, opts, gens, ctx, den), den
        parts = load_oms(opts.get("oms_module"), model, opts.get("oms_variant"), ctx.device, ctx.dtype,
                         opts.get("oms_text_encoder"))
        if parts.module.config.in_channels != model.event_shape[0]:
            raise ValueError(f"the OMS module has {parts.module.config.in_channels} input channels; model "
                             f"{model.name!r} samples {model.event_shape[0]}-channel latents")
        z_gens = [torch.Generator("cpu").manual_seed(int(s) ^ _Z_STREAM) for s in seeds]
        o_cond, o_uncond, o_extras = _oms_condition(parts, opts, model, seeds, z_gens, ctx.device)
        a = first_alpha_bar(sched)
        x_T = oms_initial_latents(parts.module, x_Tp, o_cond, o_uncond, a, cfg, z_gens)
        extras.update(o_extras)
        stats["oms"] = {"alpha_bar": a, "t0": float(sched.timesteps[0]), "module": parts.source,
                        "text_encoder": parts.text_source}
        stats["oms_calls"] = 1 if cfg.guidance_scale == 1.0 else 2
        return run_base(sched, direct, to_scheduler_scale(x_T, sched, a), cond, opts, gens, ctx, den), den

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
    if opts.get("oms_prompt") is not None and opts.get("oms_class") is not None:
        raise ValueError("--oms-prompt and --oms-class exclude each other (a text or a class OMS module)")
    if opts.get("skip_oms"):
        return
    load_oms(opts.get("oms_module"), model, opts.get("oms_variant"),
             text_override=opts.get("oms_text_encoder"))  # loading errors before any sampling


OMS_OPTIONS = (
    Option("oms-module", str, None, "OMS module: a released folder (oms_module/ ...), a module folder, a hub id "
                                    "or a zoo name (default: the model's shipped module)"),
    Option("oms-variant", str, None, "weights variant of the OMS module (fp16: the released files)"),
    Option("oms-text-encoder", str, None, "text encoder of a text OMS module: 'base' (the base model's), or a pipeline "
                                          "folder / hub id with text_encoder/ + tokenizer/ (default: the release's own)"),
    Option("oms-prompt", str, None, "prompt for the OMS step only (text OMS modules; default: the run's --prompt)"),
    Option("oms-guidance", float, 1.0, "OMS-CFG scale w on the module output (1 = conditional only)"),
    Option("oms-class", int, None, "class fed to the OMS module (default: --class-label, else uniform per sample)", min=0),
    Option("oms-eta", float, 1.0, "eta of the OMS step (1 = DDPM posterior, the reference code)", min=0.0, max=1.0),
    Option("oms-legacy-variance", bool, False, "reproduce the reference code's variance-as-std bug"),
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
))
