"""Flow-matching text-to-image pipelines (SD3 / SD3.5 and Flux): the families ``sd3`` and ``flux``.

A rectified-flow model (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis", arXiv 2403.03206, eq. 1-3 and sec. 2) sees x_sigma = (1 - sigma) x0 + sigma eps and
predicts the velocity v = eps - x0. The loaders of this module (``sd3.py``, ``flux.py``) turn a
diffusers pipeline into a ``LoadedModel(prediction_type="flow")`` whose ``unet`` is an adapter
called as every denoiser here, ``unet(sample, timestep, **cond)``, with

- ``sample``: the unpacked flow-space latent (B, C, h, w); ``timestep``: (B,) sigma *
  num_train_timesteps, the units of ``FlowMatchEulerDiscreteScheduler.timesteps``;
- ``cond``: a flat dict of tensors with one row per prompt (``encoder_hidden_states``,
  ``pooled_projections``; guidance-distilled Flux adds ``guidance``);
- output: the velocity with the sample's shape.

What the adapter does for a family (unit change, 2x2 packing, position ids) stays inside it; the
conversion to a denoiser (x0 = x - sigma v, eps = x + (1 - sigma) v) lives in ``gensample.core``.
``extras["sigma_mu"]`` gives the dynamic-shifting ``mu`` of a run's resolution
(``image_seq_mu``), ``extras["flow_base_sigmas"]`` the unshifted sigmas a pipeline hands to
``set_timesteps`` (Flux: linspace(1, 1/N, N)), or None for the scheduler's own grid (SD3).
See docs/flow_matching.md, "SD3 and Flux pipelines".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..options import MAX_SEQUENCE_LENGTH as MAX_SEQUENCE_LENGTH_LIMIT  # both pipelines refuse longer T5 sequences
from .loading import Family, LoadedModel, _check_class, _load_component, _scheduler_config
from .text import PromptEncoder, module_device_dtype, token_usage


def image_seq_mu(image_seq_len: int, scheduler_config: dict, default_max_shift: float) -> float:
    """Dynamic-shifting mu: linear in the transformer's image sequence length, from
    (base_image_seq_len, base_shift) to (max_image_seq_len, max_shift) (Esser et al. 2024, sec. 5.3.2:
    resolution-dependent shifting; diffusers' ``calculate_shift``, same arithmetic order, so the
    float is the pipeline's). ``default_max_shift``: the pipeline's fallback when the config lacks
    the key (SD3 1.16, Flux 1.15)."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", default_max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    intercept = base_shift - slope * base_len
    return image_seq_len * slope + intercept


def check_max_sequence_length(value, default: int) -> int:
    """The T5 token length: ``value`` (None -> ``default``), an int in [1, 512]."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQUENCE_LENGTH_LIMIT:
        raise ValueError(f"--max-sequence-length must be an integer in [1, {MAX_SEQUENCE_LENGTH_LIMIT}] (the T5 "
                         f"token length of SD3 / Flux prompts), got {value!r}")
    return value


def sigma_mu_of(scheduler_config: dict, patch: int, default_max_shift: float):
    """``extras["sigma_mu"]``: event_shape (..., h, w) -> the dynamic-shifting mu of
    image_seq_len = (h // patch) * (w // patch) (``image_seq_mu``), or None when the scheduler does
    not shift dynamically."""

    def sigma_mu(event_shape) -> float | None:
        if not scheduler_config.get("use_dynamic_shifting"):
            return None
        h, w = int(event_shape[-2]), int(event_shape[-1])
        return image_seq_mu((h // patch) * (w // patch), scheduler_config, default_max_shift)

    return sigma_mu


def text_parts(parts: dict) -> dict:
    """The text encoders and tokenizers a pipeline has (``extras``' entries; absent ones left out)."""
    return {k: v for k, v in parts.items() if k.startswith(("text_encoder", "tokenizer")) and v is not None}


def t5_embeds(tokenizer, encoder, prompts: Sequence[str], max_len: int, device) -> torch.Tensor:
    """(P, max_len, D) T5 last hidden states: tokens padded / truncated to ``max_len`` with </s>
    appended and no attention mask, as SD3's and Flux's ``_get_t5_prompt_embeds`` do; a cut prompt
    gets one warning. Cast to the encoder's dtype, returned on ``device``."""
    usage = token_usage(tokenizer, prompts, max_len=max_len)
    for i in usage["truncated"]:
        warnings.warn(f"prompt {prompts[i][:40]!r}... is {usage['tokens'][i]} T5 tokens long; --max-sequence-length "
                      f"{max_len} keeps the first {max_len}", UserWarning, stacklevel=3)
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    enc_device, enc_dtype = module_device_dtype(encoder)
    with torch.no_grad():
        hidden = encoder(ids.to(enc_device))[0]
    return hidden.to(dtype=enc_dtype, device=device)  # (P, max_len, D)


class FlowVelocity(torch.nn.Module):
    """The velocity adapter of a flow-matching transformer (kept as ``self.transformer``, so the
    state dict's names are the transformer's under ``transformer.``); ``config``, ``dtype``,
    ``device``: the transformer's. Subclasses implement ``forward``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return module_device_dtype(self.transformer)[1]

    @property
    def device(self) -> torch.device:
        return module_device_dtype(self.transformer)[0]


class FlowPromptEncoder(PromptEncoder):
    """Shared state of the SD3 / Flux prompt encoders: the T5 length (``max_sequence_length``)
    and the device of the first text encoder."""

    default_max_sequence_length = 256

    def __init__(self):
        self.max_sequence_length = self.default_max_sequence_length

    def set_max_sequence_length(self, value) -> None:
        self.max_sequence_length = check_max_sequence_length(value, self.default_max_sequence_length)

    def _modules(self) -> list:
        raise NotImplementedError

    @property
    def device(self):
        return module_device_dtype(self._modules()[0])[0]

    def cache_key(self) -> tuple:
        return (str(self.device), *(str(module_device_dtype(m)[1]) for m in self._modules()), self.max_sequence_length)


@dataclass
class FlowPipelineModel(LoadedModel):
    """A ``LoadedModel`` of a flow-matching pipeline: ``configure_run`` also takes
    ``max_sequence_length`` (T5 tokens; the family's default when unset) and, for a guidance-distilled
    model (``extras["embedded_guidance"]``), ``guidance_scale`` as the embedded guidance;
    ``set_resolution`` asks for pixel sizes that are multiples of the VAE scale factor times the
    transformer's patch (``extras["latent_multiple"]``: SD3 its patch_size, Flux 2 for the packing)."""

    def configure_run(self, cfg: dict) -> None:
        super().configure_run(cfg)
        pe = self.prompt_encoder()
        pe.set_max_sequence_length(cfg.get("max_sequence_length"))
        if self.extras.get("embedded_guidance"):
            gs = cfg.get("guidance_scale")
            pe.set_guidance(1.0 if gs is None else gs)

    def set_resolution(self, height: int | None, width: int | None) -> None:
        m = self.vae_scale_factor() * int(self.extras.get("latent_multiple", 1))
        for flag, v in (("--height", height), ("--width", width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < m or v % m):
                raise ValueError(f"{flag} must be a positive multiple of {m} for model {self.name!r} (VAE scale factor "
                                 f"{self.vae_scale_factor()} x latent patch {self.extras.get('latent_multiple', 1)}), got {v!r}")
        super().set_resolution(height, width)


# -- shared loading helpers ------------------------------------------------------------------------
T5_CLASSES = ("T5EncoderModel",)
T5_TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast")


def load_parts(folder, comps: dict, spec: str, variant, table: dict) -> dict:
    """The components of a pipeline folder: ``table`` maps name -> (allowed classes, required);
    an optional component that model_index.json leaves out (or names as [null, null]) is None."""
    parts = {}
    for name, (allowed, required) in table.items():
        if name not in comps:
            if required:
                raise ValueError(f"--model {spec}: the pipeline's model_index.json names no {name!r} "
                                 f"(components: {sorted(comps)})")
            parts[name] = None
            continue
        if name.startswith("tokenizer") and (folder / name).is_dir():
            parts[name] = _load_tokenizer(folder / name, name, comps[name], allowed, spec)
        else:
            parts[name] = _load_component(folder, name, comps[name], allowed, spec, variant)
    return parts


def _load_tokenizer(where, name: str, lib_cls: list, allowed: tuple, spec: str):
    """A tokenizer from its own subfolder (``tokenizer_2/``, ``tokenizer_3/``: folders without a
    config.json, which ``loading._component_dir`` only accepts for ``tokenizer``)."""
    import importlib

    lib, cls = lib_cls
    _check_class(name, cls, allowed, spec)
    try:
        return getattr(importlib.import_module(lib), cls).from_pretrained(where)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--model {spec}: could not load {name} ({cls}) from {where}: "
                         f"{err.__class__.__name__}: {err}") from None


def check_parts(parts: dict, comps: dict, spec: str, table: dict) -> dict:
    """An in-memory pipeline's components checked against ``table`` (as ``load_parts``)."""
    out = {}
    for name, (allowed, required) in table.items():
        if parts.get(name) is None:
            if required:
                raise ValueError(f"--model {spec}: the pipeline has no {name} (components: {sorted(parts)})")
            out[name] = None
            continue
        _check_class(name, comps[name][1], allowed, spec)
        out[name] = parts[name]
    return out


def check_pair(parts: dict, encoder: str, tokenizer: str, spec: str) -> None:
    if (parts.get(encoder) is None) != (parts.get(tokenizer) is None):
        have, needed = (encoder, tokenizer) if parts.get(encoder) is not None else (tokenizer, encoder)
        raise ValueError(f"--model {spec}: the pipeline has a {have} but no {needed}; they come together")


def flow_scheduler_config(sched: dict, comps: dict, spec: str) -> dict:
    """The pipeline's scheduler config (keys without a leading underscore); a non-flow-matching
    scheduler class is refused (the model is trained on the flow interpolant)."""
    cls = (comps.get("scheduler") or [None, ""])[1] or ""
    if not cls.startswith("FlowMatch"):
        raise ValueError(f"--model {spec}: the flow-matching transformer comes with a {cls or 'missing'} scheduler; "
                         f"a FlowMatchEulerDiscreteScheduler config is needed (its shift / dynamic shifting define the "
                         f"sigma grid the model was trained and tuned on)")
    return {k: v for k, v in sched.items() if not k.startswith("_")}


# -- the families ---------------------------------------------------------------------------------
def flow_family(name: str, pipeline_classes: tuple, table: dict, build_model) -> Family:
    """The ``Family`` of the pipelines whose class is in ``pipeline_classes`` (their image-conditioned
    variants fall through to the refusals of ``loading.check_pipeline_kind``): a folder or an in-memory
    pipeline (used as it is) with the components of ``table`` and a flow-matching scheduler becomes
    ``build_model(name, parts, scheduler_config, spec)``."""

    def load_folder(folder, index: dict, comps: dict, name_, spec: str, variant) -> FlowPipelineModel:
        sched = flow_scheduler_config(_scheduler_config(Path(folder), spec), comps, spec)
        return build_model(name_, load_parts(Path(folder), comps, spec, variant, table), sched, spec)

    def from_pipeline(pipe, parts: dict, comps: dict, spec: str) -> tuple:
        """(LoadedModel, used components)."""
        if "scheduler" not in parts:
            raise ValueError(f"--model {spec}: the pipeline has no scheduler; its flow-matching config is needed")
        sched = flow_scheduler_config(dict(parts["scheduler"].config), comps, spec)
        used = check_parts(parts, comps, spec, table)
        model = build_model(None, used, sched, spec)
        return model, {"scheduler": parts["scheduler"], **{k: v for k, v in used.items() if v is not None}}

    def detect(class_name: str, comps: dict) -> bool:
        return class_name in pipeline_classes

    return Family(name, detect=detect, load_folder=load_folder, from_pipeline=from_pipeline)
