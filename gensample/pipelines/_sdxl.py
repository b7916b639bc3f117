"""SDXL conditioning for the gensample pipelines (Podell et al., "SDXL", arXiv 2307.01952).

An SDXL UNet (``addition_embed_type="text_time"``) is conditioned on three things (SDXL Sec. 2.1,
2.2): the concatenated penultimate hidden states of two CLIP text encoders (cross-attention), the
pooled, projected embedding of the second one, and six micro-conditioning numbers
(original size, crop top-left, target size). The UNet takes the last two nested, as
``added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}``.

Our samplers repeat conditioning rows and concatenate branches, so they hold conditioning as a
*flat* dict of tensors with batch dim 0: ``{"encoder_hidden_states": (P, L, D), "text_embeds":
(P, D_pool), "time_ids": (P, 6)}``. The nested keyword is rebuilt at the network
boundary (``adapter``: the loader's ``gensample.models.sdxl.SDXLUNet``); ``unet_kwargs`` does the
same for a direct call.

The prompt encoding is diffusers' own: ``StableDiffusionXLPipeline.encode_prompt`` and
``_get_add_time_ids`` run on the calling pipeline (which holds ``text_encoder``,
``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``unet`` and the ``force_zeros_for_empty_prompt``
config key, as an SDXL pipeline does). So a face built from an SDXL pipeline's components sees
exactly the conditioning the stock pipeline computes (one source of truth; docs/python_api.md
"SDXL").
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

FLAT_KEYS = ("encoder_hidden_states", "text_embeds", "time_ids")


def is_sdxl_unet(unet) -> bool:
    """True for a UNet2DConditionModel with SDXL's added conditioning (pooled text + time ids)."""
    cfg = getattr(getattr(unet, "_orig_mod", unet), "config", None)
    return cfg is not None and cfg.get("addition_embed_type") == "text_time"


def unet_kwargs(cond: dict) -> dict:
    """Flat conditioning -> the UNet's keywords: ``text_embeds`` / ``time_ids`` go into
    ``added_cond_kwargs``; every other key is passed as is."""
    cond = dict(cond)
    added = {k: cond.pop(k) for k in ("text_embeds", "time_ids") if k in cond}
    if added:
        cond["added_cond_kwargs"] = added
    return cond


def adapter(unet) -> torch.nn.Module:
    """The SDXL UNet behind flat keywords ``(sample, timestep, encoder_hidden_states, text_embeds,
    time_ids)``, so that generic code (``core.denoiser.Denoiser``) can batch and cast the rows: the
    loader's adapter ``gensample.models.sdxl.SDXLUNet`` (one adapter for the CLI and the faces)."""
    from ..models.sdxl import SDXLUNet

    return SDXLUNet(unet)


def check_text_encoders(unet, text_encoder=None, text_encoder_2=None) -> None:
    """ValueError when the given encoders cannot feed the SDXL UNet: the hidden sizes must add up to
    ``cross_attention_dim`` and 6 * ``addition_time_embed_dim`` + the second encoder's
    ``projection_dim`` must equal ``projection_class_embeddings_input_dim``."""
    cfg = unet.config
    h1 = getattr(getattr(text_encoder, "config", None), "hidden_size", None) if text_encoder is not None else 0
    h2 = getattr(getattr(text_encoder_2, "config", None), "hidden_size", None) if text_encoder_2 is not None else None
    cross = cfg.get("cross_attention_dim")
    if isinstance(h1, int) and isinstance(h2, int) and isinstance(cross, int) and h1 + h2 != cross:
        raise ValueError(f"text_encoder / text_encoder_2: hidden sizes {h1} + {h2} = {h1 + h2} do not match the SDXL "
                         f"UNet's cross_attention_dim {cross}")
    proj = getattr(getattr(text_encoder_2, "config", None), "projection_dim", None) if text_encoder_2 is not None else None
    want = cfg.get("projection_class_embeddings_input_dim")
    time_dim = cfg.get("addition_time_embed_dim")
    if isinstance(proj, int) and isinstance(want, int) and isinstance(time_dim, int) and 6 * time_dim + proj != want:
        raise ValueError(f"text_encoder_2: projection_dim {proj} + 6 time ids x addition_time_embed_dim {time_dim} = "
                         f"{6 * time_dim + proj} does not match the SDXL UNet's projection_class_embeddings_input_dim "
                         f"{want}")


def _sdxl_pipeline_class():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline


def pixel_size(pipe, height: Optional[int], width: Optional[int]) -> Tuple[int, int]:
    """(height, width) in pixels, SDXL's default: the UNet's sample size times the VAE factor."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    vae = getattr(pipe, "vae", None)
    f = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    return int(height or h * f), int(width or w * f)


def time_ids(pipe, original_size, crops_coords_top_left, target_size, dtype, projection_dim: int) -> torch.Tensor:
    """(1, 6) micro-conditioning (SDXL Sec. 2.2), checked against the UNet by diffusers' own code."""
    return _sdxl_pipeline_class()._get_add_time_ids(pipe, tuple(original_size), tuple(crops_coords_top_left),
                                                    tuple(target_size), dtype=dtype,
                                                    text_encoder_projection_dim=projection_dim)


def encode(pipe, prompt, negative_prompt=None, *, do_cfg: bool, device, height: Optional[int] = None,
           width: Optional[int] = None, prompt_2=None, negative_prompt_2=None, prompt_embeds=None,
           negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
           original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
           negative_crops_coords_top_left=(0, 0), negative_target_size=None, clip_skip=None):
    """(cond, uncond): flat dicts (``FLAT_KEYS``), one row per prompt; ``uncond`` is None unless
    ``do_cfg``. Prompts need the pipeline's ``text_encoder_2`` and ``tokenizer_2`` (ValueError naming them). Argument meanings and defaults are StableDiffusionXLPipeline's (``prompt_2`` to the
    second encoder; a missing negative prompt gives zero embeddings when the pipeline's config has
    ``force_zeros_for_empty_prompt``; negative time ids only when both negative sizes are given)."""
    if prompt_embeds is None and (getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None):
        raise ValueError(f"an SDXL UNet needs text_encoder_2 and tokenizer_2 to encode prompt ({type(pipe).__name__}."
                         f"from_pipe(sdxl_pipe) carries them over); or pass prompt_embeds and pooled_prompt_embeds")
    if prompt_embeds is not None and pooled_prompt_embeds is None:
        raise ValueError("prompt_embeds on an SDXL UNet need pooled_prompt_embeds too (the second encoder's "
                         "pooled output), as in StableDiffusionXLPipeline")
    if do_cfg and negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError("negative_prompt_embeds on an SDXL UNet need negative_pooled_prompt_embeds too")
    pos, neg, pooled, neg_pooled = _sdxl_pipeline_class().encode_prompt(
        pipe, prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
        negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, clip_skip=clip_skip)
    h, w = pixel_size(pipe, height, width)
    enc2 = getattr(pipe, "text_encoder_2", None)
    proj = int(enc2.config.projection_dim) if enc2 is not None else int(pooled.shape[-1])
    ids = time_ids(pipe, original_size or (h, w), crops_coords_top_left, target_size or (h, w), pos.dtype, proj)
    n = pos.shape[0]
    cond = {"encoder_hidden_states": pos, "text_embeds": pooled.to(device),
            "time_ids": ids.to(device).expand(n, -1)}
    if not do_cfg:
        return cond, None
    neg_ids = ids
    if negative_original_size is not None and negative_target_size is not None:
        neg_ids = time_ids(pipe, negative_original_size, negative_crops_coords_top_left, negative_target_size,
                           pos.dtype, proj)
    uncond = {"encoder_hidden_states": neg, "text_embeds": neg_pooled.to(device),
              "time_ids": neg_ids.to(device).expand(neg.shape[0], -1)}
    return cond, uncond


def rows(cond: dict, index) -> dict:
    """The rows ``index`` (int or slice / index tensor) of every entry of a flat conditioning dict."""
    return {k: v[index] for k, v in cond.items()}


def stack_rows(conds: Sequence[dict]) -> dict:
    """Stack single-row dicts (entries without batch dim) into one flat dict with batch dim 0."""
    return {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
