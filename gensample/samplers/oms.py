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

This module holds the method: ``OMSConfig``, the pure step (``oms_step``, ``oms_initial_latents``),
the base scheduler and loop, and the OMS module resolution (``load_oms``) used by the Python API and
``gensample.pipelines.oms``. The run glue of `gensample run --sampler oms` (the options, the OMS
start ``oms_start`` with its options ``OMS_START_OPTIONS``, the batch function ``sample_oms``,
compare.png / brightness.json and the registration) lives in ``gensample.runs.oms``; nothing here
imports it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.denoiser import Denoiser, check_finite, concat_cond
from ..models.oms import OMSModule, load_oms_release
from ..models.text import encode_prompts
from . import baseline, schedule_flaws
from .registry import RunContext

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
    # the base model's family text conditioning (SDXL: both encoders' penultimate states), used
    # when the module attends to exactly that context (an OMS-L-style module on SDXL)
    prompt_encoder: Any = None
    _embeds: dict = field(default_factory=dict, repr=False)

    @property
    def text_conditional(self) -> bool:
        return self.module.null_class is None

    def encode(self, prompts: list[str], device) -> torch.Tensor:
        """(len(prompts), L, D) OMS context: the text encoder's last hidden state per prompt
        (padded to the tokenizer's max length), or the base family's ``encoder_hidden_states``
        (``prompt_encoder``, SDXL's two encoders), each distinct prompt encoded once."""
        for p in dict.fromkeys(prompts):
            if p not in self._embeds:
                if self.prompt_encoder is not None:
                    self._embeds[p] = self.prompt_encoder.encode([p])["encoder_hidden_states"][0]
                else:
                    enc_dev = next(self.text_encoder.parameters()).device
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
    family_pe = model.extras.get("prompt_encoder")  # a family's text conditioning (SDXL)
    family_rows = None
    if parts.text_conditional and parts.text_encoder is None and family_pe is not None:
        family_rows = family_pe.encode([""])
    if family_rows is not None and "encoder_hidden_states" in family_rows:
        # the base's own context (SDXL: [CLIP-L, bigG] penultimate states, 768 + 1280 = 2048), as
        # OMS-L conditions on it; the pooled embedding and size numbers are not used by psi
        dim = int(family_rows["encoder_hidden_states"].shape[-1])
        want = int(parts.module.config.cross_attention_dim)
        if dim != want:
            raise ValueError(f"--oms-module {spec}: the module attends to {want}-dim text embeddings but the base model "
                             f"{model.name!r}'s text encoders (fallback: the folder has no oms_text_encoder/) give "
                             f"{dim}-dim ones; use a release with its own text encoder (h1t/oms_b_openclip_xl)")
        parts.prompt_encoder, parts.text_source = family_pe, "base"
        return parts
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
            raise ValueError(f"model {model.name!r} has no default OMS module; pass --oms-module with a released "
                             f"One More Step module (h1t/oms_b_openclip_15_21, h1t/oms_b_openclip_xl; docs/oms.md)")
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
