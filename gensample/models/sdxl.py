"""The SDXL family (Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution
Image Synthesis", ICLR 2024, arXiv 2307.01952): loader, text conditioning and UNet adapter.

What differs from Stable Diffusion 1.x / 2.x (docs/text_to_image.md "SDXL"):

- **Two text encoders** (sec. 2.1): CLIP ViT-L (``text_encoder``, a CLIPTextModel) and OpenCLIP
  ViT-bigG (``text_encoder_2``, a CLIPTextModelWithProjection). The cross-attention context is the
  *penultimate* hidden state of each, concatenated along the channels (768 + 1280 = 2048 for the
  base model); the projected pooled embedding of the second encoder (1280) conditions the UNet
  through an added embedding.
- **Micro-conditioning** (sec. 2.2, "size- and crop-conditioning"): six numbers, the original
  image size (h, w), the crop's top-left corner (top, left) and the target size (h, w), each
  Fourier-embedded by the UNet (``addition_time_embed_dim`` channels each) and concatenated with the
  pooled text embedding: ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim +
  projection_dim``. Defaults as diffusers' StableDiffusionXLPipeline: original = target = the
  sampled pixel size, crop (0, 0); the negative branch uses the same numbers unless
  ``negative_original_size`` / ``negative_target_size`` are set.
- **The negative branch**: with no negative prompt and ``force_zeros_for_empty_prompt`` (the
  base model's setting), CFG's unconditional input is all zeros (context and pooled embedding),
  not the encoded empty prompt.

The conditioning stays a *flat* dict of tensors with one row per prompt
(``encoder_hidden_states`` (P, L, 2048), ``text_embeds`` (P, 1280), ``time_ids`` (P, 6)), so the
generic code can repeat rows and concatenate CFG branches; ``SDXLUNet`` rebuilds the UNet's nested
``added_cond_kwargs`` from those keywords. Refiners / image-to-image / inpainting pipelines are
refused by name in ``loading.check_pipeline_kind``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .loading import (
    TEXT_ENCODER_CLASSES,
    TOKENIZER_CLASSES,
    VAE_CLASSES,
    Family,
    LoadedModel,
    _check_class,
    _load_component,
    _scheduler_config,
    register_family,
)
from .text import PromptEncoder, max_tokens, token_usage, warn_truncated

PIPELINE_CLASS = "StableDiffusionXLPipeline"
TEXT_ENCODER_2_CLASSES = ("CLIPTextModelWithProjection",)
# pipeline classes of the SDXL family that are not text-to-image from noise: refused by name
# (loading.check_pipeline_kind)
REFUSED_TAGS = ("Img2Img", "Inpaint", "Refiner", "InstructPix2Pix", "ControlNet", "Adapter")
MICRO_KEYS = ("original_size", "crops_coords_top_left", "target_size",
              "negative_original_size", "negative_crops_coords_top_left", "negative_target_size")


def _detect(class_name: str, comps: dict) -> bool:
    """A base SDXL text-to-image pipeline: StableDiffusionXLPipeline, or a pipeline folder with a
    conditional UNet and a second text encoder that is not a refiner / image-to-image / inpainting /
    control pipeline (those fall through to the refusals of ``check_pipeline_kind``)."""
    if any(tag in class_name for tag in REFUSED_TAGS):
        return False
    if class_name == PIPELINE_CLASS:
        return True
    unet = (comps.get("unet") or [None, None])[1]
    return "text_encoder_2" in comps and unet == "UNet2DConditionModel" and not class_name.startswith(("StableDiffusion3", "Flux"))


# -- the UNet adapter -----------------------------------------------------------------------------
class SDXLUNet(torch.nn.Module):
    """The SDXL UNet called with flat keywords: ``(sample, timestep, encoder_hidden_states,
    text_embeds, time_ids)`` -> ``unet(sample, timestep, encoder_hidden_states=...,
    added_cond_kwargs={"text_embeds": ..., "time_ids": ...})`` (Podell et al. 2024, sec. 2.2: the
    pooled text embedding and the Fourier-embedded size numbers are added to the time embedding).
    ``config``, ``dtype`` and ``device`` are the wrapped UNet's."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def forward(self, sample, timestep, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                return_dict: bool = True, **kwargs):
        if encoder_hidden_states is None or text_embeds is None or time_ids is None:
            missing = [k for k, v in (("encoder_hidden_states", encoder_hidden_states), ("text_embeds", text_embeds),
                                      ("time_ids", time_ids)) if v is None]
            raise TypeError(f"the SDXL UNet needs encoder_hidden_states, text_embeds and time_ids; missing {missing}")
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=return_dict, **kwargs)


# -- text conditioning ----------------------------------------------------------------------------
def _pair(value, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"{name} must be a pair of non-negative integers (height, width) / (top, left), got {value!r}")
    return int(value[0]), int(value[1])


class SDXLPromptEncoder(PromptEncoder):
    """SDXL's text conditioning (Podell et al. 2024, secs. 2.1-2.2) as flat rows.

    ``encode(prompts)`` -> ``{"encoder_hidden_states": (P, L, D1 + D2), "text_embeds": (P, Dp),
    "time_ids": (P, 6)}``: the penultimate hidden states of ``text_encoder`` (may be None: then
    ``text_encoder_2`` alone) and ``text_encoder_2`` concatenated, the second encoder's projected
    pooled output, and (original_size, crops_coords_top_left, target_size). Prompts are padded /
    truncated to each tokenizer's ``model_max_length``; no attention mask (as diffusers).

    ``pixel_size()``: the run's (height, width), the default original / target size. The six
    micro-conditioning attributes (``MICRO_KEYS``, None = the default) may be set by the caller.
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, pixel_size, *,
                 force_zeros_for_empty_prompt: bool = True, addition_time_embed_dim: int | None = None,
                 projection_class_embeddings_input_dim: int | None = None):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.pixel_size = pixel_size
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.addition_time_embed_dim = addition_time_embed_dim
        self.projection_class_embeddings_input_dim = projection_class_embeddings_input_dim
        for key in MICRO_KEYS:
            setattr(self, key, None)

    def _pairs(self):
        return [(t, e) for t, e in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
                if e is not None]

    @property
    def device(self):
        return next(self.text_encoder_2.parameters()).device

    def cache_key(self) -> tuple:
        dtypes = tuple(str(next(e.parameters()).dtype) for _, e in self._pairs())
        return (str(self.device), dtypes, self.time_ids(False), self.time_ids(True), self.force_zeros_for_empty_prompt)

    # micro-conditioning (sec. 2.2)
    def time_ids(self, negative: bool = False) -> tuple:
        """(original h, w, crop top, left, target h, w) as diffusers' ``_get_add_time_ids``: the
        negative ones fall back to the positive ones unless both negative sizes are set."""
        h, w = (int(v) for v in self.pixel_size())
        orig = _pair(self.original_size, "original_size") or (h, w)
        crop = _pair(self.crops_coords_top_left, "crops_coords_top_left") or (0, 0)
        target = _pair(self.target_size, "target_size") or (h, w)
        n_orig = _pair(self.negative_original_size, "negative_original_size")
        n_target = _pair(self.negative_target_size, "negative_target_size")
        if negative and n_orig is not None and n_target is not None:
            n_crop = _pair(self.negative_crops_coords_top_left, "negative_crops_coords_top_left") or (0, 0)
            return (*n_orig, *n_crop, *n_target)
        return (*orig, *crop, *target)

    def _time_ids_tensor(self, n: int, negative: bool) -> torch.Tensor:
        ids = torch.tensor([self.time_ids(negative)], dtype=torch.float32, device=self.device)
        return ids.expand(n, 6).clone()

    def check_dims(self) -> None:
        """The UNet's added-embedding input width = 6 * addition_time_embed_dim + the pooled width
        (ValueError otherwise, as diffusers' ``_get_add_time_ids``)."""
        if self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None:
            return
        pooled = int(self.text_encoder_2.config.projection_dim)
        got = 6 * int(self.addition_time_embed_dim) + pooled
        if got != int(self.projection_class_embeddings_input_dim):
            raise ValueError(f"the SDXL UNet expects an added embedding of {self.projection_class_embeddings_input_dim} "
                             f"channels but 6 size numbers x addition_time_embed_dim {self.addition_time_embed_dim} + "
                             f"the pooled text embedding's {pooled} give {got}: the UNet and text_encoder_2 do not match "
                             f"(a refiner UNet conditions on an aesthetic score instead of the target size)")

    def encode(self, prompts: Sequence[str]) -> dict:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        hidden, pooled = [], None
        for tok, enc in self._pairs():
            max_len = max_tokens(tok, enc)
            warn_truncated(tok, prompts, enc)
            ids = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                out = enc(ids.to(next(enc.parameters()).device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer (sec. 2.1)
            if enc is self.text_encoder_2:
                pooled = out.text_embeds  # the projected pooled output of the second encoder
        dev = self.device
        ehs = torch.cat([h.to(dev) for h in hidden], dim=-1)
        return {"encoder_hidden_states": ehs, "text_embeds": pooled.to(dev),
                "time_ids": self._time_ids_tensor(len(prompts), negative=False)}

    def encode_negative(self, prompt: str | None) -> dict:
        """CFG's unconditional row: zeros (context and pooled) when no negative prompt is given and
        ``force_zeros_for_empty_prompt`` is set, else the encoded negative prompt ("" when None);
        time_ids are the negative micro-conditioning."""
        row = self.encode(["" if prompt is None else prompt])
        if prompt is None and self.force_zeros_for_empty_prompt:
            row = {"encoder_hidden_states": torch.zeros_like(row["encoder_hidden_states"]),
                   "text_embeds": torch.zeros_like(row["text_embeds"])}
        row["time_ids"] = self._time_ids_tensor(1, negative=True)
        return row

    def token_usage(self, prompts: Sequence[str]) -> dict:
        usage = token_usage(self.tokenizer_2, prompts, self.text_encoder_2)
        if self.text_encoder is not None:
            usage = {**token_usage(self.tokenizer, prompts, self.text_encoder),
                     "tokenizer_2": usage}
        return usage

    def run_record(self) -> dict:
        """What run.json says about the SDXL conditioning of this run."""
        t, n = self.time_ids(False), self.time_ids(True)
        return {"sdxl": {"original_size": list(t[:2]), "crops_coords_top_left": list(t[2:4]), "target_size": list(t[4:]),
                         "negative_original_size": list(n[:2]), "negative_crops_coords_top_left": list(n[2:4]),
                         "negative_target_size": list(n[4:]),
                         "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                         "text_encoders": [type(e).__name__ for _, e in self._pairs()]}}


# -- assembling a LoadedModel ------------------------------------------------------------------
def build_model(name, unet, scheduler_config: dict, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                spec: str, force_zeros_for_empty_prompt: bool = True) -> LoadedModel:
    """The LoadedModel of SDXL components: the UNet behind ``SDXLUNet``, the VAE (pixels =
    sample_size x the VAE scale factor: 1024 for the base model), the ``SDXLPromptEncoder``."""
    c = unet.config
    if c.get("addition_embed_type") != "text_time":
        raise ValueError(f"--model {spec}: an SDXL pipeline needs a UNet with addition_embed_type='text_time' "
                         f"(pooled text + size conditioning), got {c.get('addition_embed_type')!r}")
    if vae is None:
        raise ValueError(f"--model {spec}: the SDXL pipeline has no vae; its latents cannot be decoded")
    if text_encoder_2 is None or tokenizer_2 is None:
        raise ValueError(f"--model {spec}: an SDXL pipeline needs text_encoder_2 and tokenizer_2 (the pooled text "
                         f"embedding comes from the second encoder)")
    if (text_encoder is None) != (tokenizer is None):
        raise ValueError(f"--model {spec}: the pipeline has a {'text_encoder' if text_encoder is not None else 'tokenizer'} "
                         f"but no {'tokenizer' if text_encoder is not None else 'text_encoder'}")
    if int(vae.config.latent_channels) != int(c.in_channels):
        raise ValueError(f"--model {spec}: the VAE's {vae.config.latent_channels} latent channels do not match the "
                         f"UNet's {c.in_channels} input channels (inpainting UNets take extra input channels)")
    width = sum(int(e.config.hidden_size) for e in (text_encoder, text_encoder_2) if e is not None)
    if c.cross_attention_dim is not None and int(c.cross_attention_dim) != width:
        raise ValueError(f"--model {spec}: the UNet attends to {c.cross_attention_dim}-dim text but the text encoders' "
                         f"penultimate states concatenate to {width}")
    sched = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
    h, w = (size, size) if isinstance(size, int) else size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    extras: dict = {"vae": vae, "pixel_shape": (int(vae.config.out_channels), h * f, w * f),
                    "text_encoder": text_encoder, "tokenizer": tokenizer, "text_encoder_2": text_encoder_2,
                    "tokenizer_2": tokenizer_2, "text_conditional": True, "family": "sdxl"}
    if text_encoder is None:
        del extras["text_encoder"], extras["tokenizer"]
    model = LoadedModel(name=name, kind="diffusion", unet=SDXLUNet(unet), scheduler_config=sched,
                        event_shape=(int(c.in_channels), h, w), prediction_type=sched.get("prediction_type", "epsilon"),
                        is_image=True, extras=extras)
    # the run's pixel size: ``LoadedModel.set_resolution`` updates this same extras dict
    pe = SDXLPromptEncoder(tokenizer, text_encoder, tokenizer_2, text_encoder_2,
                           pixel_size=lambda: extras["pixel_shape"][1:],
                           force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                           addition_time_embed_dim=c.get("addition_time_embed_dim"),
                           projection_class_embeddings_input_dim=c.get("projection_class_embeddings_input_dim"))
    try:
        pe.check_dims()
    except ValueError as err:
        raise ValueError(f"--model {spec}: {err}") from None
    model.extras["prompt_encoder"] = pe
    return model


def _refuse_refiner(index: dict, spec: str) -> None:
    if index.get("requires_aesthetics_score"):
        raise ValueError(f"--model {spec}: {index.get('_class_name')} is an SDXL refiner (it conditions on an aesthetic "
                         f"score and denoises a given image); refiner pipelines are not supported yet: gensample's "
                         f"samplers start from noise (use the SDXL base pipeline)")


def _load_tokenizer(folder: Path, name: str, lib_cls: list, spec: str):
    """A tokenizer from its subfolder (tokenizers have no config.json, so the generic component
    lookup does not find ``tokenizer_2/``)."""
    import importlib

    lib, cls = lib_cls
    _check_class(name, cls, TOKENIZER_CLASSES, spec)
    where = folder / name
    if not where.is_dir():
        raise ValueError(f"--model {spec}: component {name!r} ({cls}) of model_index.json not found; looked for {where}/")
    try:
        return getattr(importlib.import_module(lib), cls).from_pretrained(where)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--model {spec}: could not load {name} ({cls}) from {where}: {err.__class__.__name__}: {err}") from None


def load_folder(folder: Path, index: dict, comps: dict, name: str, spec: str, variant: str | None) -> LoadedModel:
    """An SDXL pipeline folder (nested diffusers layout, e.g. ``save_pretrained`` or a single-file
    checkpoint converted with ``from_single_file(...).save_pretrained``), whole."""
    folder = Path(folder)
    _refuse_refiner(index, spec)
    for part in ("unet", "vae", "text_encoder_2", "tokenizer_2"):
        if part not in comps:
            raise ValueError(f"--model {spec}: the SDXL pipeline's model_index.json names no {part!r} "
                             f"(components: {sorted(comps)})")
    unet = _load_component(folder, "unet", comps["unet"], ("UNet2DConditionModel",), spec, variant)
    sched = _scheduler_config(folder, spec)
    vae = _load_component(folder, "vae", comps["vae"], VAE_CLASSES, spec, variant)
    enc = tok = None
    if "text_encoder" in comps or "tokenizer" in comps:
        if "text_encoder" not in comps or "tokenizer" not in comps:
            raise ValueError(f"--model {spec}: text_encoder and tokenizer come together; model_index.json names only "
                             f"{'text_encoder' if 'text_encoder' in comps else 'tokenizer'}")
        enc = _load_component(folder, "text_encoder", comps["text_encoder"], TEXT_ENCODER_CLASSES, spec, variant)
        tok = _load_component(folder, "tokenizer", comps["tokenizer"], TOKENIZER_CLASSES, spec, variant)
    enc2 = _load_component(folder, "text_encoder_2", comps["text_encoder_2"], TEXT_ENCODER_2_CLASSES, spec, variant)
    tok2 = _load_tokenizer(folder, "tokenizer_2", comps["tokenizer_2"], spec)
    return build_model(name, unet, sched, vae, enc, tok, enc2, tok2, spec,
                       force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))


def from_pipeline(pipe, parts: dict, comps: dict, spec: str) -> tuple:
    """(LoadedModel, used components) of an in-memory StableDiffusionXLPipeline, used as it is."""
    _refuse_refiner(dict(pipe.config), spec)
    for part, allowed in (("unet", ("UNet2DConditionModel",)), ("vae", VAE_CLASSES),
                          ("text_encoder_2", TEXT_ENCODER_2_CLASSES), ("tokenizer_2", TOKENIZER_CLASSES)):
        if part not in parts:
            raise ValueError(f"--model {spec}: the SDXL pipeline has no {part}")
        _check_class(part, comps[part][1], allowed, spec)
    for part, allowed in (("text_encoder", TEXT_ENCODER_CLASSES), ("tokenizer", TOKENIZER_CLASSES)):
        if part in parts:
            _check_class(part, comps[part][1], allowed, spec)
    if "scheduler" not in parts:
        raise ValueError(f"--model {spec}: the pipeline has no scheduler; its training schedule (the scheduler's "
                         f"config) is needed")
    if next(parts["unet"].parameters(), None) is None:
        raise ValueError(f"--model {spec}: the UNet has no parameters")
    force_zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    model = build_model(None, parts["unet"], dict(parts["scheduler"].config), parts["vae"], parts.get("text_encoder"),
                        parts.get("tokenizer"), parts["text_encoder_2"], parts["tokenizer_2"], spec, force_zeros)
    used = {k: parts[k] for k in ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
            if k in parts}
    return model, used


register_family(Family("sdxl", detect=_detect, load_folder=load_folder, from_pipeline=from_pipeline))
