"""One More Step (OMS; Hu et al., CVPR 2024, arXiv 2311.15744; specs/oms.md) and the
schedule-flaw baselines on ``ddim`` (zero terminal SNR, Lin et al. 2023, arXiv 2305.08891;
offset noise, crosslabs 2023; specs/oms.md sec. 8).

OMS adds one step in front of a frozen base sampler: the module psi maps pure noise x_T'
(virtual time T', alpha_bar_T' = 0) to v_hat = -x0_hat, and x_T is a DDIM step from T' to the
base scheduler's first timestep t0 (spec sec. 2.3):

    x_T = sqrt(a) x0_hat + sqrt(1 - a - sigma^2) x_T' + sigma z,   sigma^2 = eta^2 (1 - a)

| code name          | paper / spec symbol                               |
|--------------------|---------------------------------------------------|
| ``x_Tp``           | x_T', pure N(0, I) noise fed to psi               |
| ``v_c``, ``v_u``   | psi(x_T', c), psi(x_T', null) (OMS-CFG, sec. 2.3)  |
| ``w``              | oms_guidance_scale                                |
| ``alpha_bar``      | a = alpha_bar at the base scheduler's first step t0 |
| ``eta``            | DDIM eta of the OMS step (1 = the reference code) |
| ``x_T``            | the base sampler's initial latent (VP scale)      |

Not reproduced from the reference code (spec sec. 2.4, 7): the noise is scaled by the std
sqrt(1 - a), not the variance (``legacy_variance=True`` reproduces the bug); psi's input is
unit-variance noise, never multiplied by ``init_noise_sigma``; w == 1 skips the unconditional
branch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..core.denoiser import Denoiser, check_finite, concat_cond
from . import baseline
from .registry import SAMPLERS, Option, RunContext, SampleBatch, SamplerSpec, register

logger = logging.getLogger(__name__)

SPACINGS = ("leading", "trailing", "linspace")
BASES = ("ddim", "ddpm", "dpm", "euler")
# z of the OMS step comes from its own per-sample stream, so the base loop's noise is the same
# with and without OMS (spec sec. 7, shared-generator pitfall).
_Z_STREAM = 0x0A5_5EED


@dataclass(frozen=True)
class OMSConfig:
    """Parameters of the OMS step (spec sec. 2.3)."""

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


def _normal_like(x: torch.Tensor, generator) -> torch.Tensor:
    """N(0, I) shaped like x (B, ...): row b from generator[b] if a list, drawn on CPU, float64."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"generator list has {len(generator)} entries for a batch of {x.shape[0]}")
        rows = [torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float64) for g in generator]
        return torch.stack(rows).to(x.device)
    return torch.randn(tuple(x.shape), generator=generator, dtype=torch.float64).to(x.device)


def oms_step(v_c: torch.Tensor, v_u: torch.Tensor | None, x_Tp: torch.Tensor, alpha_bar: float, w: float = 1.0,
             eta: float = 1.0, generator=None, legacy_variance: bool = False) -> torch.Tensor:
    """x_T from the OMS prediction: a DDIM step from alpha_bar = 0 to ``alpha_bar`` (spec sec. 2.3).

    v_c, v_u: (B, C, H, W) psi outputs (v at zero SNR, x0_hat = -v); v_u may be None if w == 1.
    x_Tp: (B, C, H, W) the unit-variance noise psi saw. alpha_bar: float in [0, 1).
    generator: one torch.Generator, a list of B (one per sample), or None; unused when eta == 0.
    legacy_variance: multiply z by sigma^2 instead of sigma (the reference code's bug, sec. 2.4a).
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
    """alpha_bar at the base scheduler's first timestep, after set_timesteps (spec sec. 2.3, 4).

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
def _raw_guided(den: Denoiser, x, t, cond, uncond, w: float, guidance_rescale: float):
    """Model output in its own parameterisation, CFG'd (and diffusers' rescale_noise_cfg'd)."""
    if w == 1.0 or cond is None:
        return den._raw(x, torch.as_tensor(t, device=x.device), cond)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    n = x.shape[0]
    out = den._raw(torch.cat([x, x]), torch.as_tensor(t, device=x.device), concat_cond(cond, uncond, n, n))
    out_c, out_u = out[:n], out[n:]
    guided = out_u + w * (out_c - out_u)
    if guidance_rescale > 0:
        guided = rescale_noise_cfg(guided, out_c, guidance_rescale=guidance_rescale)
    return guided


def direct_loop(model, scheduler, x_T, cond, opts: dict, gens, ctx: RunContext, den: Denoiser) -> torch.Tensor:
    """The pipeline loop feeding the raw model output to a scheduler built with the model's own
    prediction_type (needed at alpha_bar_T = 0, where the eps convention is singular)."""
    import inspect

    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": gens} if "generator" in params else {}
    if "eta" in params and opts.get("eta") is not None:
        kwargs["eta"] = opts["eta"]
    w = opts.get("guidance_scale", 1.0)
    uncond = den.null_cond
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        out = _raw_guided(den, scheduler.scale_model_input(x, t), t, cond, uncond, w, opts.get("guidance_rescale") or 0.0)
        check_finite(out, ctx.sampler, i)
        x = scheduler.step(out.to(x.dtype), t, x, **kwargs).prev_sample
        ctx.step_done()
    return x


def base_scheduler(model, base: str, steps: int, opts: dict, device):
    """The base sampler's diffusers scheduler on the model's training schedule.

    zero SNR (flag or the model's own config): DDIM with rescale_betas_zero_snr=True, trailing
    spacing and the model's prediction_type (diffusers' rescale_zero_terminal_snr). Returns
    (scheduler, direct) where direct means the raw output is fed (see ``direct_loop``).
    """
    baseline.check_steps(steps, model.scheduler_config)
    overrides = {}
    if opts.get("oms_spacing"):
        overrides["timestep_spacing"] = opts["oms_spacing"]
    zsnr = bool(opts.get("rescale_zero_snr")) or bool(model.scheduler_config.get("rescale_betas_zero_snr"))
    direct = zsnr or bool(opts.get("guidance_rescale"))
    if zsnr:
        if model.prediction_type == "epsilon":
            raise ValueError(f"--rescale-zero-snr needs a v_prediction or sample model (eps is singular at "
                             f"alpha_bar_T = 0, Lin et al. 2023 sec. 3.2); {model.name!r} predicts epsilon. "
                             f"Try --model digits-flawed-zsnr")
        if not model.scheduler_config.get("rescale_betas_zero_snr"):
            logger.warning("%s was not trained on the zero-terminal-SNR schedule; Lin et al. fine-tune first", model.name)
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing=overrides.get("timestep_spacing", "trailing"))
    if direct:
        if base != "ddim" and zsnr:
            raise ValueError(f"the zero-terminal-SNR path runs on ddim only, got base sampler {base!r}")
        overrides["prediction_type"] = model.prediction_type
    sched = baseline.make_scheduler(base, model.scheduler_config, **overrides)
    sched.set_timesteps(steps, device=device)
    return sched, direct


def run_base(model, sched, direct: bool, x_T, cond, opts: dict, gens, ctx: RunContext, den: Denoiser):
    if direct:
        return direct_loop(model, sched, x_T, cond, opts, gens, ctx, den)
    eta = opts.get("eta") if isinstance(sched, _ddim_class()) else None
    return baseline.scheduler_loop(den, sched, x_T, cond, opts.get("guidance_scale", 1.0), gens, ctx, eta=eta)


def _ddim_class():
    from diffusers import DDIMScheduler

    return DDIMScheduler


def offset_noise(gens: Sequence[torch.Generator], shape: Sequence[int], delta: float, ctx: RunContext) -> torch.Tensor:
    """eps + delta n, n ~ N(0, 1) of shape (B, C, 1, 1) (offset noise, spec sec. 8); delta = 0: eps."""
    eps = ctx.randn(gens, shape)
    if delta == 0:
        return eps
    n = ctx.randn(gens, (shape[0],) + (1,) * (len(shape) - 1))
    return eps + delta * n


# -- OMS module resolution ------------------------------------------------------------------
def load_oms_module(spec: str | None, model):
    """An OMSModule from a folder path, a zoo name of kind "oms", or the base model's default."""
    from ..models.oms import OMSModule

    if spec is None:
        default = model.extras.get("oms_module")
        if default is None:
            raise ValueError(f"model {model.name!r} has no default OMS module; pass --oms-module PATH "
                             f"(a folder from `gensample train oms --base {model.name}`)")
        spec = str(default)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        return OMSModule.from_pretrained(path).eval()
    from .. import zoo
    from ..models.loading import _ensure_registered

    _ensure_registered()
    if spec in zoo.ZOO:
        loaded = zoo.ZOO[spec].loader()
        if loaded.kind != "oms":
            raise ValueError(f"--oms-module {spec!r} is a {loaded.kind!r} model, not an OMS module")
        return loaded.unet
    raise ValueError(f"--oms-module must be an OMS module folder (config.json + safetensors) or a zoo OMS name, got {spec!r}")


def _oms_classes(module, opts, seeds, gens_cls, model) -> torch.Tensor | None:
    """Per-sample OMS class: --oms-class, else --class-label, else uniform from each sample's seed."""
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
    return torch.stack([torch.randint(n_cls, (), generator=g) for g in gens_cls])


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
        x_Tp = offset_noise(gens, model.event_shape, 0.0, ctx)  # the bare sampler's x_T draw
        if not with_oms:
            x0 = run_base(model, sched, direct, x_Tp * sched.init_noise_sigma, cond, opts, gens, ctx, den)
            return x0, den
        module = load_oms_module(opts.get("oms_module"), model).to(ctx.device)
        z_gens = [torch.Generator("cpu").manual_seed(int(s) ^ _Z_STREAM) for s in seeds]
        labels = _oms_classes(module, opts, seeds, z_gens, model)
        if labels is None:
            raise ValueError("this OMS module is not class-conditional; use gensample.pipelines.oms.OMSPipeline "
                             "with prompt embeddings for text-conditioned modules")
        labels = labels.to(ctx.device)
        a = first_alpha_bar(sched)
        x_T = oms_initial_latents(module, x_Tp, {"class_labels": labels},
                                  {"class_labels": torch.full_like(labels, module.null_class)}, a, cfg, z_gens)
        extras["oms_class"] = labels.cpu()
        stats["oms_alpha_bar"] = a
        stats["oms_calls"] = 1 if cfg.guidance_scale == 1.0 else 2
        x0 = run_base(model, sched, direct, to_scheduler_scale(x_T, sched, a), cond, opts, gens, ctx, den)
        return x0, den

    x, den = draw(with_oms=not opts.get("skip_oms"))
    stats.update({"nfe": den.calls, "model_rows": den.rows})
    if model.is_image and not opts.get("skip_oms") and not opts.get("skip_compare"):
        x_bare, _ = draw(with_oms=False)
        extras["x_no_oms"] = x_bare
    stats.setdefault("oms_calls", 0)
    return SampleBatch(x=x, extras=extras, stats=stats)


def _progress(opts: dict) -> int:
    both = not opts.get("skip_oms") and not opts.get("skip_compare")
    return opts["steps"] * (2 if both else 1)


def write_compare(out_dir, arrays: dict, model) -> None:
    """compare.png: the same seeds without OMS (left) and with OMS (right)."""
    if "x_no_oms" not in arrays or arrays["x"].ndim != 4:
        return
    import numpy as np

    from ..api import atomic_write_bytes
    from ..eval.images import make_grid, png_bytes, to_uint8

    n = min(len(arrays["x"]), 64)
    vr = getattr(model, "value_range", (-1.0, 1.0))
    left = make_grid(to_uint8(arrays["x_no_oms"][:n], vr))
    right = make_grid(to_uint8(arrays["x"][:n], vr))
    gap = np.full((left.shape[0], 4, left.shape[2]), 255, dtype=np.uint8)
    both = np.concatenate([left, gap, right], axis=1)
    scale = max(1, 512 // both.shape[1])
    both = both.repeat(scale, 0).repeat(scale, 1)
    atomic_write_bytes(Path(out_dir) / "compare.png", png_bytes(both))


def _validate_oms(opts: dict, model) -> None:
    if model.kind != "diffusion" or not model.is_image:
        raise ValueError(f"the oms sampler needs an image diffusion model, got {model.name!r}")
    if opts.get("oms_base") not in (None, "ddim") and opts.get("eta"):
        raise ValueError("--eta applies to --oms-base ddim only")


OMS_OPTIONS = (
    Option("oms-module", str, None, "OMS module folder or zoo name (default: the model's shipped module)"),
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

register(SamplerSpec(
    name="oms",
    description="One More Step (Hu et al. 2024): a learned x_T for non-zero terminal SNR models",
    fn=sample_oms,
    default_model="digits-flawed",
    options=OMS_OPTIONS,
    default_steps=50,
    progress_total=_progress,
    validate=_validate_oms,
    write_extra=write_compare,
))


# -- ddim: --rescale-zero-snr / --offset-noise / --guidance-rescale ---------------------------
DDIM_FLAW_OPTIONS = (
    Option("rescale-zero-snr", bool, False, "diffusers rescale_betas_zero_snr + trailing spacing (v-pred models, Lin et al.)"),
    Option("offset-noise", float, 0.0, "delta: start from eps + delta n, n ~ N(0,1) per channel (offset-noise models)", min=0.0),
    Option("guidance-rescale", float, 0.0, "rescaled CFG phi (diffusers rescale_noise_cfg), needs --rescale-zero-snr", min=0.0, max=1.0),
)


def _extend_ddim() -> None:
    spec = SAMPLERS["ddim"]
    plain_fn = spec.fn
    own = {o.key for o in DDIM_FLAW_OPTIONS}
    known = {o.key: o for o in spec.options}

    def ddim_fn(model, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch:
        zsnr = bool(opts.get("rescale_zero_snr")) or bool(model.scheduler_config.get("rescale_betas_zero_snr"))
        delta = opts.get("offset_noise") or 0.0
        rescale = opts.get("guidance_rescale") or 0.0
        if rescale and not zsnr:
            raise ValueError("--guidance-rescale is the zero-terminal-SNR companion; use it with --rescale-zero-snr")
        if not zsnr and not delta:
            return plain_fn(model, opts, seeds, ctx)
        others = [o.flag for k, o in known.items() if k not in own and k != "eta" and opts.get(k) not in (None, o.default)]
        if others:
            raise ValueError(f"{', '.join(others)} cannot be combined with --rescale-zero-snr / --offset-noise")
        sched, direct = base_scheduler(model, "ddim", opts["steps"], opts, ctx.device)
        gens = ctx.generators(seeds)
        den = model.denoiser()
        x_T = offset_noise(gens, model.event_shape, delta, ctx) * sched.init_noise_sigma
        cond = model.cond_for(opts.get("class_label"), len(seeds), ctx.device)
        x = run_base(model, sched, direct, x_T, cond, opts, gens, ctx, den)
        return SampleBatch(x=x, stats={"nfe": den.calls, "model_rows": den.rows})

    register(dataclasses.replace(spec, fn=ddim_fn, options=tuple(spec.options) + DDIM_FLAW_OPTIONS))


_extend_ddim()
