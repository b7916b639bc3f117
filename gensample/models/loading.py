"""Resolve a model spec (zoo name, ``prefix:FILE``, diffusers folder or hub id) to a LoadedModel.

Extension points (so each method adds models without editing this file):
- zoo entries: ``gensample.zoo.register(name, description)`` on a loader function;
- prefixes: ``register_prefix("markov", loader)`` makes ``--model markov:FILE.json`` work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.denoiser import Denoiser
from ..core.schedule import alphas_cumprod_from_config

# Training schedule used by every analytic model: DDPM linear betas (Ho et al. 2020, sec. 4).
DEFAULT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "leading",
    "steps_offset": 0,
}


@dataclass
class LoadedModel:
    """Everything a sampler needs about a model.

    kind: "diffusion" (eps/x0/v model on a VP schedule), or a method-specific kind
        ("mar", "masked_lm", ...) for non-diffusion models.
    unet: module with the diffusers UNet call signature (diffusion kinds).
    scheduler_config: the training schedule (a diffusers scheduler config dict).
    event_shape: shape of one sample, e.g. (2,) or (1, 8, 8); the latent shape of a latent model.
    num_classes: 0 if unconditional; else class labels are 0..num_classes-1 and
        ``null_class`` (usually num_classes) is the unconditional label for CFG.
    extras: method-specific parts: the exact mixture as "mixture"; a latent model's "vae" and
        "pixel_shape"; a text-to-image model's "text_encoder", "tokenizer" and
        ``"text_conditional": True`` (see docs/text_to_image.md).

    Text-to-image models: ``configure_run`` takes the run's prompts (sample i gets prompt
    i % len(prompts), set per batch by ``prepare_batch``), the negative prompt (the CFG
    unconditional branch, default "") and ``guidance_rescale``; ``cond_for`` and ``denoiser``
    then supply ``encoder_hidden_states``. Latent models: ``decode`` maps latents to pixels.
    """

    name: str
    kind: str = "diffusion"
    unet: Any = None
    scheduler_config: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER_CONFIG))
    event_shape: tuple = ()
    num_classes: int = 0
    null_class: int | None = None
    prediction_type: str = "epsilon"
    is_image: bool = False
    value_range: tuple = (-1.0, 1.0)
    extras: dict = field(default_factory=dict)
    # run state of text-to-image models (configure_run / prepare_batch)
    prompts: list | None = None
    negative_prompt: str | None = None
    guidance_rescale: float = 0.0
    _batch_indices: list | None = field(default=None, repr=False)
    _prompt_cache: dict = field(default_factory=dict, repr=False)
    # an in-memory object the user passed (``from_object``): what run.json records about it; its
    # modules are used as they are (device, dtype, adapters), never cast or moved by the run
    origin: dict | None = None

    @property
    def borrowed(self) -> bool:
        """True when the modules belong to the caller (``from_object``): the run must not change them."""
        return self.origin is not None

    @contextlib.contextmanager
    def frozen(self):
        """Weights with ``requires_grad`` off while sampling, as a loaded folder's are; the
        caller's flags come back afterwards. Samplers never need weight gradients, and some CPU
        kernels take another path (not bit-equal) for weights that require grad."""
        thawed = []
        for part in [self.unet, *self.extras.values()]:
            if isinstance(part, torch.nn.Module):
                for param in part.parameters():
                    if param.requires_grad:
                        param.requires_grad_(False)
                        thawed.append(param)
        try:
            yield self
        finally:
            for param in thawed:
                param.requires_grad_(True)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod_from_config(self.scheduler_config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def text_conditional(self) -> bool:
        return bool(self.extras.get("text_conditional"))

    @property
    def is_latent(self) -> bool:
        """True when samples live in a VAE's latent space (``decode`` gives pixels)."""
        return self.extras.get("vae") is not None

    # -- text conditioning ---------------------------------------------------------------------
    def _text_device(self) -> torch.device:
        return self.prompt_encoder().device if self.text_conditional else torch.device("cpu")

    def prompt_encoder(self):
        """The text conditioning of this model: ``extras["prompt_encoder"]`` (a family loader's, e.g.
        SDXL's two encoders), else a ``ClipPromptEncoder`` on ``extras["text_encoder"]`` /
        ``extras["tokenizer"]`` (Stable Diffusion 1.x / 2.x). See ``models.text.PromptEncoder``."""
        from .text import ClipPromptEncoder

        if not self.text_conditional:
            raise ValueError(f"model {self.name!r} is not a text-to-image model; prompts are not allowed")
        pe = self.extras.get("prompt_encoder")
        if pe is not None:
            return pe
        enc, tok = self.extras.get("text_encoder"), self.extras.get("tokenizer")
        if enc is None or tok is None:
            raise ValueError(f"model {self.name!r} has no text encoder / tokenizer to encode prompts")
        return ClipPromptEncoder(tok, enc)

    def _encoded(self, key: tuple, make) -> dict:
        if key not in self._prompt_cache:
            self._prompt_cache[key] = make()
        return self._prompt_cache[key]

    def encode_prompt(self, prompts, device) -> dict:
        """The UNet's text keyword arguments for ``prompts`` on ``device``, one row per prompt: for
        Stable Diffusion ``{"encoder_hidden_states": (P, L, D)}``, the CLIP text encoder's last
        hidden state; other families add their own keys (``PromptEncoder``). Each distinct prompt is
        encoded once per encoder state (``PromptEncoder.cache_key``) and cached."""
        from .text import normalize_prompts

        prompts = normalize_prompts(prompts)
        pe = self.prompt_encoder()
        state = pe.cache_key()
        rows = [self._encoded(("p", p, state), lambda p=p: pe.encode([p])) for p in prompts]
        # one prompt per call: a sample's embedding never depends on the other prompts
        return {k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]}

    def negative_cond(self, device) -> dict:
        """CFG's unconditional branch (batch 1): the negative prompt, default "" (a family may
        define it otherwise, e.g. SDXL's zero embeddings for an empty negative prompt)."""
        pe = self.prompt_encoder()
        neg = self.negative_prompt
        row = self._encoded(("n", neg, pe.cache_key()), lambda: pe.encode_negative(neg))
        return {k: v.to(device) for k, v in row.items()}

    def configure_run(self, cfg: dict) -> None:
        """Take the run options that concern the model: prompt / negative_prompt (text models
        only), guidance_rescale, height / width (latent models only), max_sequence_length (models whose
        prompt encoder has a T5 length: ``set_max_sequence_length``, SD3 / Flux). ValueError on misuse."""
        from .text import normalize_prompts

        msl = cfg.get("max_sequence_length")
        if msl is not None and not hasattr(self.extras.get("prompt_encoder"), "set_max_sequence_length"):
            raise ValueError(f"--max-sequence-length {msl!r} (the T5 prompt length) applies to SD3 / Flux pipelines, whose "
                             f"prompts go through a T5 encoder; model {self.name!r} has no T5 prompt encoder")

        prompts = normalize_prompts(cfg.get("prompt"))
        neg = cfg.get("negative_prompt")
        if neg is not None and not isinstance(neg, str):
            raise ValueError(f"--negative-prompt must be a string, got {neg!r}")
        if self.text_conditional:
            self.prompts = prompts
            self.negative_prompt = neg
        elif prompts is not None or neg is not None:
            what = "class-conditional" if self.num_classes else "unconditional"
            raise ValueError(f"--prompt / --negative-prompt need a text-to-image model; {self.name!r} is {what}"
                             + (" (use --class-label)" if self.num_classes else ""))
        gr = cfg.get("guidance_rescale")
        self.guidance_rescale = 0.0 if gr is None else float(gr)
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"--guidance-rescale must be in [0, 1], got {gr}")
        if cfg.get("height") is not None or cfg.get("width") is not None:
            self.set_resolution(cfg.get("height"), cfg.get("width"))

    @property
    def run_prompts(self) -> list:
        """The prompts of this run: the given ones, or [""] (the empty prompt)."""
        return list(self.prompts) if self.prompts else [""]

    def text_record(self) -> dict:
        """What run.json says about the text conditioning of this run."""
        from .text import EMPTY_PROMPT_NOTE

        rec = {"prompts": self.run_prompts, "prompt_given": bool(self.prompts),
               "negative_prompt": self.negative_prompt or "", "guidance_rescale": self.guidance_rescale,
               "prompt_of_sample": "prompts[i % len(prompts)]"}
        if not self.prompts:
            rec["note"] = EMPTY_PROMPT_NOTE
        if self.text_conditional:  # what the text encoder(s) saw of each prompt
            pe = self.prompt_encoder()
            rec["tokens"] = pe.token_usage(self.run_prompts)
            rec.update(getattr(pe, "run_record", dict)())  # a family's own conditioning (SDXL sizes)
        return rec

    def prepare_batch(self, indices) -> None:
        """The sample indices of the batch about to be drawn (text models: prompt i % P)."""
        self._batch_indices = [int(i) for i in indices]

    def batch_indices(self, n: int) -> list:
        """The run-wide sample indices of the n rows about to be drawn (``prepare_batch``), else 0..n-1."""
        if self._batch_indices is not None and len(self._batch_indices) == n:
            return list(self._batch_indices)
        return list(range(n))

    def prompts_at(self, indices) -> list:
        """Prompt of each index: prompts[i % P] (samples, or FKC's particle groups)."""
        ps = self.run_prompts
        return [ps[i % len(ps)] for i in indices]

    def _prompts_for(self, n: int) -> list:
        return self.prompts_at(self.batch_indices(n))

    def denoiser(self) -> Denoiser:
        if self.unet is None:
            raise ValueError(f"model {self.name!r} ({self.kind}) has no diffusion network")
        null = default = None
        if self.text_conditional:
            dev = self._text_device()
            null = self.negative_cond(dev)  # CFG's unconditional branch
            default = self.encode_prompt([""], dev)  # cond=None: the empty prompt
        elif self.num_classes and self.null_class is not None:
            null = {"class_labels": torch.tensor([self.null_class])}
        return Denoiser(self.unet, self.alphas_cumprod, self.prediction_type, plain_callable=False, null_cond=null,
                        default_cond=default, guidance_rescale=self.guidance_rescale, name=self.name)

    def cond_for(self, class_label: int | None, n: int, device, prompt=None) -> dict | None:
        """Conditioning dict for n samples: one class (None: unconditional / null class), or for
        a text model the prompt(s): ``prompt`` (a str for all n, or n strings), else the run's
        prompts, sample i of the current batch getting prompt i % len(prompts)."""
        if self.text_conditional:
            if class_label is not None:
                raise ValueError(f"model {self.name!r} is text-conditional; use --prompt instead of --class-label")
            if prompt is None:
                prompts = self._prompts_for(n)
            else:
                from .text import normalize_prompts

                prompts = normalize_prompts(prompt)
                if len(prompts) == 1:
                    prompts = prompts * n
                if len(prompts) != n:
                    raise ValueError(f"cond_for: got {len(prompts)} prompts for {n} samples (give 1 or {n})")
            return self.encode_prompt(prompts, device)
        if prompt is not None:
            raise ValueError(f"model {self.name!r} is not a text-to-image model; prompts are not allowed")
        if class_label is None:
            if self.num_classes and self.null_class is not None:
                return {"class_labels": torch.full((n,), self.null_class, dtype=torch.long, device=device)}
            return None
        if not self.num_classes:
            raise ValueError(f"model {self.name!r} is unconditional; --class-label is not allowed")
        if not 0 <= class_label < self.num_classes:
            raise ValueError(f"class label must be in [0, {self.num_classes - 1}] for model {self.name!r}, got {class_label}")
        return {"class_labels": torch.full((n,), int(class_label), dtype=torch.long, device=device)}

    # -- latent models -----------------------------------------------------------------------
    def vae_scale_factor(self) -> int:
        vae = self.extras.get("vae")
        if vae is None:
            raise ValueError(f"model {self.name!r} has no VAE")
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def set_resolution(self, height: int | None, width: int | None) -> None:
        """Pixel size of a latent model's samples; the latent event shape follows (H/f, W/f)."""
        if not self.is_latent:
            raise ValueError(f"--height / --width apply to latent (VAE) models; {self.name!r} draws pixels of "
                             f"shape {tuple(self.event_shape)} directly")
        f = self.vae_scale_factor()
        pix = tuple(self.extras.get("pixel_shape") or (self.extras["vae"].config.out_channels,
                                                       self.event_shape[-2] * f, self.event_shape[-1] * f))
        h = pix[-2] if height is None else height
        w = pix[-1] if width is None else width
        for flag, v in (("--height", h), ("--width", w)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f or v % f:
                raise ValueError(f"{flag} must be a positive multiple of the VAE scale factor {f} for model {self.name!r}, got {v!r}")
        self.event_shape = (self.event_shape[0], h // f, w // f)
        self.extras["pixel_shape"] = (pix[0], h, w)

    def decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Pixels in [-1, 1], float32: D(z / scaling_factor (+ shift_factor)) (Rombach et al.
        2022, sec. 3; the Stable Diffusion scaling). A float16 VAE whose config sets
        ``force_upcast`` is moved to float32 first (the SD VAE overflows in fp16). Decodes in
        chunks of ``chunk`` samples on the VAE's device; returns on the input's device."""
        vae = self.extras.get("vae")
        if vae is None:
            raise ValueError(f"model {self.name!r} has no VAE to decode latents")
        cfg = vae.config
        sf = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        p = next(vae.parameters())
        own_dtype = p.dtype
        if p.dtype == torch.float16 and getattr(cfg, "force_upcast", True):
            vae.to(torch.float32)
            p = next(vae.parameters())
        z = torch.as_tensor(latents)
        out = []
        try:
            for i in range(0, z.shape[0], chunk):
                zi = (z[i:i + chunk].to(device=p.device, dtype=torch.float32) / sf + shift).to(p.dtype)
                out.append(vae.decode(zi).sample.float().clamp(-1.0, 1.0).to(z.device))
        finally:
            if self.borrowed and p.dtype != own_dtype:  # the caller's VAE goes back to its own dtype
                vae.to(own_dtype)
        return torch.cat(out)

    def add_decoded(self, arrays: dict) -> dict:
        """arrays["x"] of a latent model's generation sampler holds latents (event_shape): add
        arrays["images"], the decoded pixels (n, C, H, W) float32 in [-1, 1]. Samplers that already
        return pixels (a different shape, e.g. the latent inverse-problem solvers) are left as is."""
        import numpy as np

        x = arrays.get("x")
        if not self.is_latent or x is None or "images" in arrays or tuple(x.shape[1:]) != tuple(self.event_shape):
            return arrays
        with torch.no_grad():
            imgs = self.decode(torch.from_numpy(np.asarray(x, dtype=np.float32)))
        return {**arrays, "images": imgs.cpu().numpy().astype(np.float32)}

    def to(self, device=None, dtype=None) -> "LoadedModel":
        for part in [self.unet, *self.extras.values()]:
            if isinstance(part, torch.nn.Module):
                part.to(device=device) if dtype is None else part.to(device=device, dtype=dtype)
        return self


PrefixLoader = Callable[[str], LoadedModel]
_PREFIXES: dict[str, tuple[PrefixLoader, str]] = {}


def register_prefix(prefix: str, loader: PrefixLoader, description: str = "") -> None:
    _PREFIXES[prefix] = (loader, description)


def prefixes() -> dict[str, str]:
    _ensure_registered()
    return {k: v[1] for k, v in _PREFIXES.items()}


def gmm_model(name: str, mixture, scheduler_config: dict | None = None) -> LoadedModel:
    from .gmm import GMMUNet

    cfg = dict(DEFAULT_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
    unet = GMMUNet(mixture, alphas_cumprod_from_config(cfg))
    return LoadedModel(
        name=name,
        kind="diffusion",
        unet=unet,
        scheduler_config=cfg,
        event_shape=mixture.event_shape,
        num_classes=mixture.num_classes,
        null_class=mixture.num_classes if mixture.num_classes else None,
        is_image=len(mixture.event_shape) == 3,
        extras={"mixture": mixture},
    )


def _load_gmm_file(path: str) -> LoadedModel:
    from .gmm import GaussianMixture

    return gmm_model(f"gmm:{path}", GaussianMixture.from_json(path))


def _ensure_registered() -> None:
    if "gmm" not in _PREFIXES:
        register_prefix("gmm", _load_gmm_file, "a Gaussian mixture from a JSON file (weights, means, stds, labels?)")
    from .. import zoo  # noqa: F401  (zoo modules register prefixes and names on import)

    zoo.discover()


# -- model families ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A pipeline family with its own loader module (SDXL, SD3, Flux, ...).

    detect(class_name, comps) -> bool: claims a pipeline (``model_index.json``'s ``_class_name`` or
        the object's class, and component name -> [library, class]); checked before the generic
        refusals of ``check_pipeline_kind``, so a claimed pipeline is never refused by name.
    load_folder(folder, index, comps, name, spec, variant) -> LoadedModel: a local diffusers folder.
    from_pipeline(pipe, parts, comps, spec) -> (LoadedModel, used components): an in-memory
        pipeline (``from_object``), used as it is; may be None (then in-memory use is refused).
    """

    name: str
    detect: Callable[[str, dict], bool]
    load_folder: Callable[..., "LoadedModel"]
    from_pipeline: Callable[..., tuple] | None = None


_FAMILIES: dict[str, Family] = {}
# family loader modules, imported when a folder or pipeline is resolved (no import cost otherwise)
FAMILY_MODULES = ("gensample.models.sdxl", "gensample.models.sd3", "gensample.models.flux", "gensample.models.llada",
                  "gensample.models.dream", "gensample.models.diffusion_gemma")


def register_family(family: Family) -> None:
    _FAMILIES[family.name] = family


def family_of(class_name, comps: dict) -> Family | None:
    """The registered family that claims this pipeline, or None (SD 1.x / 2.x and DDPM-style UNets
    are the generic path of this module)."""
    import importlib

    for mod in FAMILY_MODULES:
        importlib.import_module(mod)
    for fam in _FAMILIES.values():
        if fam.detect(str(class_name or ""), comps):
            return fam
    return None


# -- diffusers folders and hub ids ------------------------------------------------------------
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
VAE_CLASSES = ("AutoencoderKL",)
TEXT_ENCODER_CLASSES = ("CLIPTextModel",)
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def _layout_error(spec: str, folder: Path, extra: str = "") -> ValueError:
    return ValueError(
        f"--model {spec}: {folder} is not a diffusers model folder{extra}. Looked for: "
        f"model_index.json with unet/config.json, scheduler/scheduler_config.json (nested pipeline, e.g. "
        f"Stable Diffusion: + vae/, text_encoder/, tokenizer/); model_index.json with config.json and "
        f"scheduler_config.json at the root (flat, as google/ddpm-*); or config.json alone (a bare UNet)")


def _read_json(path: Path, spec: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--model {spec}: cannot read {path} ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--model {spec}: {path} must hold a JSON object")
    return data


FLOW_MATCHING_NOTE = ("the flow-matching pipelines gensample samples are StableDiffusion3Pipeline (SD3 / SD3.5) and "
                      "FluxPipeline (Flux-dev / schnell) text-to-image folders or objects (docs/flow_matching.md)")
# flow-matching pipeline classes that take an image (img2img, inpainting, fill, control, reference)
FLOW_IMAGE_TAGS = ("Img2Img", "Inpaint", "Fill", "Kontext", "Redux", "Control", "Prior")


def check_pipeline_kind(class_name, comps: dict, spec: str) -> None:
    """Refuse the pipelines gensample cannot sample yet, naming the real reason.

    class_name: the pipeline class (``model_index.json``'s ``_class_name``, or the object's class);
    comps: component name -> [library, class] of the present components. Order of the checks:
    a flow-matching scheduler or an SD3/Flux class (flow-matching transformer), another
    transformer denoiser, SDXL refiners / img2img / inpainting (by name), other SDXL-style pipelines
    (a second text encoder) that the SDXL family (``models/sdxl.py``, checked before this) does not
    claim, inpainting pipelines (image + mask inputs), then the UNet that every sampler needs."""
    cls = str(class_name or "this pipeline")
    sched = (comps.get("scheduler") or [None, ""])[1] or ""
    if sched.startswith("FlowMatch") or cls.startswith(("StableDiffusion3", "Flux")):
        # the supported ones (families "sd3", "flux": models/sd3.py, flux.py) never reach here
        tag = next((t for t in FLOW_IMAGE_TAGS if t in cls), None)
        why = (f"it conditions on a given image ({tag}), and gensample's samplers draw from noise given a prompt"
               if tag else "this pipeline family has no gensample loader")
        raise ValueError(f"--model {spec}: {cls} (scheduler {sched or 'unknown'}) is a flow-matching transformer "
                         f"pipeline that is not supported yet: {why}; {FLOW_MATCHING_NOTE}")
    if "transformer" in comps and "unet" not in comps:
        raise ValueError(f"--model {spec}: {cls} has a transformer denoiser ({comps['transformer'][1]}) instead of a "
                         f"UNet; transformer-based pipelines are not supported yet (gensample samples UNet-based "
                         f"diffusion pipelines: Stable Diffusion 1.x / 2.x, DDPM-style UNets)")
    is_xl = cls.startswith("StableDiffusionXL") or "text_encoder_2" in comps
    if is_xl and any(tag in cls for tag in ("Img2Img", "Inpaint", "Refiner", "InstructPix2Pix")):
        raise ValueError(f"--model {spec}: {cls} is an SDXL refiner / image-to-image pipeline (it denoises a given "
                         f"image{', inside a mask' if 'Inpaint' in cls else ''}); these are not supported yet: gensample's "
                         f"samplers start from noise (use the SDXL base pipeline, StableDiffusionXLPipeline)")
    if is_xl:  # not claimed by the SDXL family (gensample.models.sdxl): e.g. ControlNet / adapter pipelines
        raise ValueError(f"--model {spec}: {cls} is an SDXL-style pipeline (a second text encoder) that gensample's SDXL "
                         f"loader does not take: it samples StableDiffusionXLPipeline folders (a UNet2DConditionModel "
                         f"with two CLIP text encoders); {cls} is not supported yet")
    if "Inpaint" in cls:
        raise ValueError(f"--model {spec}: {cls} is an inpainting pipeline (its UNet takes the image and mask as "
                         f"extra input channels); gensample's samplers need a text-to-image or unconditional UNet")
    if "unet" not in comps:
        raise ValueError(f"--model {spec}: {cls} has no 'unet' component "
                         f"(components: {sorted(comps)}); gensample samples UNet-based diffusion pipelines")


def _check_class(name: str, cls: str, allowed: tuple, spec: str) -> None:
    if cls not in allowed:
        raise ValueError(f"--model {spec}: component {name!r} is a {cls}; supported: {', '.join(allowed)}")


def _component_dir(folder: Path, name: str, cls: str, spec: str) -> tuple[Path, str | None]:
    """(folder, subfolder) of pipeline component ``name``: ``name/`` (nested layout) or the root
    (flat layout: the root config.json names the class)."""
    if (folder / name / "config.json").exists() or (name == "tokenizer" and (folder / name).is_dir()):
        return folder, name
    root_cfg = folder / "config.json"
    if name != "tokenizer" and root_cfg.exists() and _read_json(root_cfg, spec).get("_class_name") == cls:
        return folder, None
    raise ValueError(f"--model {spec}: component {name!r} ({cls}) of model_index.json not found; looked for "
                     f"{folder / name / 'config.json'} (nested layout) and {root_cfg} with \"_class_name\": \"{cls}\" (flat layout)")


def _load_component(folder: Path, name: str, lib_cls: list, allowed: tuple, spec: str, variant: str | None):
    import importlib

    lib, cls = lib_cls
    _check_class(name, cls, allowed, spec)
    root, sub = _component_dir(folder, name, cls, spec)
    klass = getattr(importlib.import_module(lib), cls)
    # the component's own folder, not subfolder=: diffusers prefers a root weights file over the
    # subfolder's (which, in the flat layout, is the UNet's)
    where = root if sub is None else root / sub
    kwargs: dict = {}
    if name != "tokenizer":
        kwargs["torch_dtype"] = torch.float32  # weights of any variant upcast; the run casts to --dtype
        if variant:
            kwargs["variant"] = variant
    try:
        part = klass.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--model {spec}: could not load {name} ({cls}) from {where}"
                         f"{f' with --weights-variant {variant}' if variant else ''}: {err.__class__.__name__}: {err}") from None
    if isinstance(part, torch.nn.Module):
        part.eval()
        part.requires_grad_(False)
    return part


def _scheduler_config(folder: Path, spec: str) -> dict:
    for f in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if f.exists():
            return _read_json(f, spec)
    raise ValueError(f"--model {spec}: no scheduler config; looked for {folder / 'scheduler' / 'scheduler_config.json'} "
                     f"(nested layout) and {folder / 'scheduler_config.json'} (flat layout)")


def hub_allow_patterns(files: list[str], variant: str | None = None) -> list[str]:
    """Which files of a hub repository to download: every config / tokenizer file (.json, .txt)
    at the root or one folder deep, and per folder the diffusers/transformers weight files of the
    requested variant (safetensors preferred over .bin; sharded files kept together). Other
    root weights (single-file checkpoints such as v1-5-pruned.ckpt) are never fetched."""
    keep = [f for f in files if f.count("/") <= 1 and f.rsplit(".", 1)[-1] in ("json", "txt")]
    by_dir: dict[str, list[str]] = {}
    for f in files:
        if f.count("/") > 1 or not f.endswith((".safetensors", ".bin")):
            continue
        d, base = f.rsplit("/", 1) if "/" in f else ("", f)
        stem = base.split(".", 1)[0].split("-0", 1)[0]
        if stem in WEIGHT_STEMS:
            by_dir.setdefault(d, []).append(base)
    for d, names in by_dir.items():
        def parts(n):
            core = n.rsplit(".", 1)[0]  # drop the extension
            return core.split(".")[1].split("-0", 1)[0] if "." in core else None  # variant tag (shards: tag-0000k-of-n)

        chosen = [n for n in names if parts(n) == variant] if variant else []
        if not chosen:
            chosen = [n for n in names if parts(n) is None]
        safe = [n for n in chosen if n.endswith(".safetensors")]
        chosen = safe or chosen
        keep += [f"{d}/{n}" if d else n for n in chosen]
    return sorted(set(keep))


HUB_PROBE_S = 3.0  # how long the hub's host name may take to resolve before we call the machine offline


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None if it may be: HF_HUB_OFFLINE /
    TRANSFORMERS_OFFLINE set, or the hub's host name not resolving within HUB_PROBE_S seconds
    (an offline machine otherwise spends ~25 s in huggingface_hub's retries before failing)."""
    import socket
    import threading
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={os.environ[var]} is set"
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    result: dict = {}

    def probe():
        try:
            socket.getaddrinfo(host, 443)
            result["ok"] = True
        except OSError as err:
            result["err"] = err

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_PROBE_S)
    if result.get("ok"):
        return None
    if "err" in result:
        return f"the hub's host {host} does not resolve ({result['err']})"
    return f"the hub's host {host} did not resolve within {HUB_PROBE_S:g} s"


def _hub_snapshot(repo_id: str, variant: str | None) -> Path:
    """Download the files a LoadedModel needs from a hub repository (any layout); local path.

    Offline (``hub_offline_reason``): the local Hugging Face cache only, and a refusal at once,
    saying how to get the model, when the repository is not there."""
    offline = hub_offline_reason()
    if offline is not None:
        from huggingface_hub import constants, snapshot_download

        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - not in the cache (or a malformed id): one message
            raise ValueError(
                f"could not load model {repo_id!r}: not a zoo name, prefix or local folder; it is a hub id, but the "
                f"machine is offline ({offline}) and the model is not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}; {err.__class__.__name__}). Get it where there is network with "
                f"`hf download {repo_id}` (huggingface_hub's CLI, into the same cache) and run again, or pass the "
                f"downloaded folder as --model") from None
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=hub_allow_patterns(files, variant)))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated repo: one message
        raise ValueError(f"could not load model {repo_id!r}: not a zoo name, prefix or local folder, and the hub id "
                         f"could not be fetched ({err.__class__.__name__}: {err})") from None


def load_diffusers(spec: str, name: str | None = None, variant: str | None = None) -> LoadedModel:
    """A diffusers model from a folder or hub id, loaded whole.

    Layouts: a pipeline folder (model_index.json + unet/ scheduler/ [vae/ text_encoder/
    tokenizer/]), the flat layout (model_index.json, config.json, scheduler_config.json at the
    root, as google/ddpm-* are; other components may still sit in subfolders), or a bare UNet
    folder (config.json [+ scheduler_config.json]). A Stable Diffusion-class pipeline
    (UNet2DConditionModel + AutoencoderKL + CLIPTextModel + CLIPTokenizer, SD 1.x epsilon or
    2.x v-prediction) becomes a text-to-image latent LoadedModel (see ``load_pipeline_folder``).
    Hub ids are fetched with huggingface_hub (network access) and then read like a folder.
    """
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {spec}: a model path must be a folder (diffusers layout), got a file")
        folder = path
    else:
        folder = _hub_snapshot(spec, variant)
    return load_pipeline_folder(folder, name=name or spec, spec=spec, variant=variant)


def load_pipeline_folder(folder: Path, name: str, spec: str | None = None, variant: str | None = None) -> LoadedModel:
    """LoadedModel of a local diffusers folder (the layouts of ``load_diffusers``)."""
    spec = spec or str(folder)
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if index_file.exists():
        index = _read_json(index_file, spec)
        comps = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1]}
        fam = family_of(index.get("_class_name"), comps)
        if fam is not None:
            return fam.load_folder(folder, index, comps, name, spec, variant)
        check_pipeline_kind(index.get("_class_name"), comps, spec)
        _check_text_pair(comps, spec)
        unet = _load_component(folder, "unet", comps["unet"], UNET_CLASSES, spec, variant)
        sched = _scheduler_config(folder, spec)
        vae = _load_component(folder, "vae", comps["vae"], VAE_CLASSES, spec, variant) if "vae" in comps else None
        enc = tok = None
        if "text_encoder" in comps:
            enc = _load_component(folder, "text_encoder", comps["text_encoder"], TEXT_ENCODER_CLASSES, spec, variant)
            tok = _load_component(folder, "tokenizer", comps["tokenizer"], TOKENIZER_CLASSES, spec, variant)
    elif (folder / "config.json").exists():
        cfg = _read_json(folder / "config.json", spec)
        cls = cfg.get("_class_name")
        archs = cfg.get("architectures") or []
        fam = family_of(archs[0], {}) if cls is None and archs else None  # a bare transformers model (LLaDA, ...)
        if fam is not None:
            return fam.load_folder(folder, cfg, {}, name, spec, variant)
        if cls not in UNET_CLASSES:
            raise _layout_error(spec, folder, f" (its config.json describes a {cls!r}, not a UNet)")
        unet = _load_component(folder, "unet", ["diffusers", cls], UNET_CLASSES, spec, variant)
        sched_file = folder / "scheduler_config.json"
        sched = _read_json(sched_file, spec) if sched_file.exists() else dict(DEFAULT_SCHEDULER_CONFIG)
        vae = enc = tok = None
    else:
        raise _layout_error(spec, folder)
    return _assemble(name, unet, sched, vae, enc, tok, spec)


def _check_text_pair(comps: dict, spec: str) -> None:
    if ("text_encoder" in comps) != ("tokenizer" in comps):
        have, needed = ("text_encoder", "tokenizer") if "text_encoder" in comps else ("tokenizer", "text_encoder")
        raise ValueError(f"--model {spec}: the pipeline has a {have} but no {needed}; a text-to-image pipeline needs both")


def _assemble(name, unet, sched, vae, enc, tok, spec) -> LoadedModel:
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    c = unet.config
    conditional = type(unet).__name__ == "UNet2DConditionModel"
    if conditional and enc is None:
        raise ValueError(f"--model {spec}: a UNet2DConditionModel needs its text encoder and tokenizer; give the whole "
                         f"pipeline folder (model_index.json with text_encoder/ and tokenizer/)")
    num_classes = 0 if conditional else int(c.get("num_class_embeds") or 0)
    null = None
    if num_classes:
        null = num_classes - 1  # our convention: the last embedding is the null class
        num_classes -= 1
    size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
    h, w = (size, size) if isinstance(size, int) else size
    extras: dict = {}
    if vae is not None:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        if int(vae.config.latent_channels) != int(c.in_channels):
            raise ValueError(f"--model {spec}: the VAE's {vae.config.latent_channels} latent channels do not match the "
                             f"UNet's {c.in_channels} input channels (inpainting / image-conditioned UNets, which take "
                             f"extra input channels, are not supported by the samplers)")
        extras.update(vae=vae, pixel_shape=(int(vae.config.out_channels), h * f, w * f))
    if enc is not None:
        extras.update(text_encoder=enc, tokenizer=tok, text_conditional=True)
    return LoadedModel(
        name=name,
        kind="diffusion",
        unet=unet,
        scheduler_config=sched,
        event_shape=(int(c.in_channels), h, w),
        num_classes=num_classes,
        null_class=null,
        prediction_type=sched.get("prediction_type", "epsilon"),
        is_image=True,
        extras=extras,
    )


# -- in-memory objects (the Python API's ``model=pipe``) -----------------------------------------
ACCEPTED_OBJECTS = ("a diffusers pipeline with a unet and a scheduler (e.g. StableDiffusionPipeline, DDPMPipeline), "
                    "a UNet2DModel or a UNet2DConditionModel (inside its pipeline)")


def short_repr(obj) -> str:
    """``module.Class`` of ``obj`` and its ``_name_or_path`` if it has one: never its config dump."""
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    where = _name_or_path(obj)
    return f"{kind} ({where!r})" if where else kind


def _name_or_path(obj) -> str | None:
    cfg = getattr(obj, "config", None)
    value = None
    if isinstance(cfg, dict):
        value = cfg.get("_name_or_path")
    elif cfg is not None:
        value = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    value = value or getattr(obj, "name_or_path", None)
    return str(value) if value else None


def _is_pipeline(obj) -> bool:
    return isinstance(getattr(obj, "components", None), dict) and hasattr(obj, "config") and hasattr(obj, "save_pretrained")


def _first_param(module):
    for t in (*module.parameters(), *module.buffers()):
        return t
    return None


def _config_dict(part) -> dict | None:
    """A component's configuration as plain data (diffusers ConfigMixin / transformers
    PretrainedConfig), or a tokenizer's defining facts; None for parts with neither."""
    cfg = getattr(part, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        data = cfg.to_dict()
    elif isinstance(cfg, dict):
        data = dict(cfg)
    elif hasattr(part, "get_vocab"):  # a tokenizer: its vocabulary and length define the token ids
        vocab = part.get_vocab()
        data = {"vocab_sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
                "model_max_length": getattr(part, "model_max_length", None)}
    else:
        return None
    return {k: v for k, v in data.items() if k not in ("_name_or_path", "_diffusers_version", "transformers_version",
                                                      "_commit_hash", "_use_default_values")}


def adapter_record(module) -> dict:
    """What peft says about LoRA-style adapters on ``module``: {"adapters": names loaded,
    "active": names active, "merged": names fused into the weights}; empty lists without peft."""
    names = sorted(getattr(module, "peft_config", None) or {})
    active: list = []
    if names:
        try:
            got = module.active_adapters() if callable(getattr(module, "active_adapters", None)) else module.active_adapters
            active = sorted([got] if isinstance(got, str) else list(got or []))
        except Exception:  # noqa: BLE001 - peft raises when nothing is active
            active = []
    merged: set = set()
    for sub in module.modules():
        m = getattr(sub, "merged_adapters", None)  # peft BaseTunerLayer: adapters merged into this layer
        if isinstance(m, (list, tuple, set)):
            merged.update(str(x) for x in m)
    return {"adapters": names, "active": active, "merged": sorted(merged)}


_FINGERPRINT_ENTRIES = 64  # entries read from every parameter / buffer tensor


def weights_fingerprint(modules: dict) -> str:
    """sha256 over, for every parameter and buffer of every module (in name order), its name,
    shape, dtype and ``_FINGERPRINT_ENTRIES`` evenly spaced entries (as float64, so the device
    does not matter). Cheap (one gather per tensor); a change that touches none of the read
    entries is not seen (docs/python_api.md)."""
    h = hashlib.sha256()
    for part_name in sorted(modules):
        module = modules[part_name]
        tensors = sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items())
        picks = []
        for name, t in tensors:
            h.update(f"{part_name}.{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            k = min(_FINGERPRINT_ENTRIES, flat.numel())
            idx = torch.linspace(0, flat.numel() - 1, k, dtype=torch.float64, device=flat.device).round().long()
            v = flat[idx]
            picks.append((v.real if v.is_complex() else v).to(torch.float64))
        if picks:
            h.update(torch.cat(picks).cpu().numpy().tobytes())
    return h.hexdigest()


def from_object(obj, spec: str | None = None) -> LoadedModel:
    """LoadedModel of a model the caller already holds, used as it is (device, dtype, adapters).

    Accepted: a diffusers pipeline with ``unet`` and ``scheduler`` (+ ``vae``, ``text_encoder``,
    ``tokenizer``: Stable Diffusion 1.x / 2.x, DDPMPipeline, ...) or a bare UNet2DModel (the
    default DDPM schedule, as for a bare UNet folder). The pipeline goes through the same checks
    (``check_pipeline_kind``) and the same assembly (``_assemble``) as a folder, so the model
    equals the one loaded from the pipeline saved with ``save_pretrained``. Nothing is copied,
    cast or moved; the scheduler is read (its config), never stepped.

    ``origin`` records the class, ``_name_or_path``, components, dtype, device, adapters
    (peft: loaded / active / merged names, and the pipeline's fused LoRAs) and a fingerprint:
    sha256 of the configs + adapter names + ``weights_fingerprint``. The model name (the run's
    ``model`` key, which names its default output folder) holds that fingerprint, never an
    address in memory. TypeError for other objects (short repr); ValueError for flow-matching /
    transformer / SDXL pipelines (the folder messages)."""
    cls = type(obj).__name__
    label = _name_or_path(obj)
    spec = spec or f"<in-memory {cls}{f' {label!r}' if label else ''}>"
    if _is_pipeline(obj):
        parts = {k: v for k, v in obj.components.items() if v is not None}
        comps = {k: [type(v).__module__.split(".")[0], type(v).__name__] for k, v in parts.items()}
        fam = family_of(cls, comps)
        if fam is not None and fam.from_pipeline is None:
            raise ValueError(f"--model {spec}: in-memory {fam.name} pipelines are not supported yet; save it with "
                             f"save_pretrained and pass the folder")
        if fam is not None:
            family_model, used = fam.from_pipeline(obj, parts, comps, spec)
            return _with_origin(family_model, obj, used, cls, label)
        check_pipeline_kind(cls, comps, spec)
        _check_text_pair(comps, spec)
        _check_class("unet", comps["unet"][1], UNET_CLASSES, spec)
        if "scheduler" not in parts:
            raise ValueError(f"--model {spec}: the pipeline has no scheduler; its training schedule (the scheduler's "
                             f"config) is needed")
        sched = dict(parts["scheduler"].config)
        if "vae" in parts:
            _check_class("vae", comps["vae"][1], VAE_CLASSES, spec)
        if "text_encoder" in parts:
            _check_class("text_encoder", comps["text_encoder"][1], TEXT_ENCODER_CLASSES, spec)
            _check_class("tokenizer", comps["tokenizer"][1], TOKENIZER_CLASSES, spec)
        unet, vae = parts["unet"], parts.get("vae")
        enc, tok = parts.get("text_encoder"), parts.get("tokenizer")
        used = {k: parts[k] for k in ("unet", "scheduler", "vae", "text_encoder", "tokenizer") if k in parts}
    elif isinstance(obj, torch.nn.Module) and cls in UNET_CLASSES:
        if cls == "UNet2DConditionModel":
            raise ValueError(f"--model {spec}: a bare UNet2DConditionModel needs its text encoder and tokenizer; pass "
                             f"the whole pipeline (e.g. model=pipe, a StableDiffusionPipeline)")
        unet, vae, enc, tok = obj, None, None, None
        sched = dict(DEFAULT_SCHEDULER_CONFIG)
        used = {"unet": obj}
    elif isinstance(obj, torch.nn.Module) and "Transformer" in cls:
        flow = {"SD3": "StableDiffusion3Pipeline", "Flux": "FluxPipeline"}
        whole = next((p for prefix, p in flow.items() if cls.startswith(prefix)), None)
        if whole is not None:
            raise ValueError(f"--model {spec}: a bare {cls} is only the denoiser of a flow-matching pipeline; "
                             f"flow-matching transformer models are not supported yet without their pipeline (text "
                             f"encoders, VAE, scheduler): pass the whole {whole} (model=pipe) or its save_pretrained "
                             f"folder")
        raise ValueError(f"--model {spec}: a {cls} is a transformer denoiser; transformer-based models are not "
                         f"supported yet; pass a UNet-based pipeline, or a flow-matching one ({FLOW_MATCHING_NOTE})")
    else:
        raise TypeError(f"model must be a model spec string (zoo name, prefix:FILE, folder or hub id) or an in-memory "
                        f"model: {ACCEPTED_OBJECTS}; got {short_repr(obj)}")
    if _first_param(unet) is None:
        raise ValueError(f"--model {spec}: the UNet has no parameters")
    return _with_origin(_assemble(label, unet, sched, vae, enc, tok, spec), obj, used, cls, label)


def _with_origin(model: LoadedModel, obj, used: dict, cls: str, label) -> LoadedModel:
    """Name ``model`` by the in-memory object's fingerprint and record its ``origin`` (from_object)."""
    first = next((p for v in used.values() if isinstance(v, torch.nn.Module) for p in v.parameters()), None)
    modules = {k: v for k, v in used.items() if isinstance(v, torch.nn.Module)}
    adapters = {k: rec for k, v in modules.items() if any((rec := adapter_record(v)).values())}
    fused = sorted(str(x) for x in (getattr(obj, "_merged_adapters", None) or ()))  # the pipeline's fuse_lora record
    configs = {k: _config_dict(v) for k, v in used.items()}
    digest_src = json.dumps({"class": cls, "configs": configs, "adapters": adapters, "fused_loras": fused,
                             "weights": weights_fingerprint(modules)}, sort_keys=True, default=str)
    digest_src = re.sub(r" at 0x[0-9a-fA-F]+", "", digest_src)  # never an address in memory
    digest = hashlib.sha256(digest_src.encode()).hexdigest()
    origin = {
        "in_memory": True,
        "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
        "_name_or_path": label,
        "components": {k: f"{type(v).__module__}.{type(v).__qualname__}" for k, v in used.items()},
        "dtype": None if first is None else str(first.dtype).replace("torch.", ""),
        "device": None if first is None else str(first.device),
        "adapters": adapters,
        "fused_loras": fused,
        "fingerprint": digest,
        "fingerprint_covers": "component configs, adapter names and 64 evenly spaced entries of every weight tensor",
    }
    model.name = f"{label} (in-memory {cls}, fingerprint {digest[:12]})" if label else f"in-memory {cls} (fingerprint {digest[:12]})"
    model.origin = origin
    return model


def load_model(spec: str, variant: str | None = None) -> LoadedModel:
    """Resolve ``spec``: zoo name | ``prefix:FILE`` | diffusers folder | hub id.

    variant: a weights variant of a diffusers folder / hub id (``"fp16"``: the
    ``*.fp16.safetensors`` files); not allowed for zoo names and prefixes."""
    from .. import zoo

    _ensure_registered()
    if not isinstance(spec, str) or not spec:
        raise ValueError("model must be a non-empty string")
    if variant is not None and (spec in zoo.ZOO or (":" in spec and not Path(spec).exists())):
        raise ValueError(f"--weights-variant applies to diffusers folders and hub ids, not to {spec!r}")
    if spec in zoo.ZOO:
        return zoo.ZOO[spec].loader()
    if ":" in spec and not Path(spec).exists():
        prefix, rest = spec.split(":", 1)
        if prefix in _PREFIXES:
            return _PREFIXES[prefix][0](rest)
        if len(prefix) > 1:  # not a Windows drive letter
            raise ValueError(f"unknown model prefix {prefix!r}; known: {sorted(_PREFIXES)}")
    path = Path(spec)
    if path.exists() or "/" in spec:
        return load_diffusers(spec, variant=variant)
    raise ValueError(
        f"unknown model {spec!r}; choose a zoo model ({', '.join(sorted(zoo.ZOO))}), "
        f"a prefix spec ({', '.join(p + ':FILE' for p in sorted(_PREFIXES))}), a diffusers folder or a hub id"
    )
