"""Tiny random Stable Diffusion pipelines as live objects, for pipeline-face tests.

Built offline from the component builders of tests/sd_models.py (tiny UNet2DConditionModel,
AutoencoderKL, CLIPTextModel from a tiny CLIPTextConfig, a CLIPTokenizer from a vocab/merges
written into a folder), as diffusers' fast tests build theirs. ``tiny_sd_pipeline`` returns a
``StableDiffusionPipeline`` (``kind="text2img"``) or a ``StableDiffusionInpaintPipeline``
(``kind="inpaint"``: a 9-channel UNet input = latents + mask + masked-image latents).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_models import LATENT, PIXELS, build_scheduler, build_text_encoder, build_tokenizer, build_unet, build_vae

PREDICTION_TYPES = ("epsilon", "v_prediction")
KINDS = ("text2img", "inpaint")


def tiny_sd_pipeline(tmp: Path, prediction_type: str = "epsilon", kind: str = "text2img", scheduler=None, seed: int = 0):
    """A tiny random SD pipeline; ``tmp``: a folder for the tokenizer files (tests: tmp_path).

    prediction_type "epsilon" builds the SD 1.x layout, "v_prediction" the SD 2.x one (linear
    attention projections, v-prediction scheduler). scheduler: None for SD's DDIM config."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    version = 1 if prediction_type == "epsilon" else 2
    tok = build_tokenizer(Path(tmp) / "_tokenizer_src")
    unet = build_unet(version, seed, **({"in_channels": 9} if kind == "inpaint" else {}))
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    pipe = cls(vae=build_vae(seed), text_encoder=build_text_encoder(len(tok), seed), tokenizer=tok, unet=unet,
               scheduler=scheduler if scheduler is not None else build_scheduler(version),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_inputs(seed: int = 0) -> dict:
    """image (1, 3, PIXELS, PIXELS) in [0, 1] and a mask covering the left half (1 = repaint)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, PIXELS, PIXELS, generator=g)
    mask = torch.zeros(1, 1, PIXELS, PIXELS)
    mask[..., : PIXELS // 2] = 1.0
    return {"image": image, "mask_image": mask, "height": PIXELS, "width": PIXELS}


__all__ = ["LATENT", "PIXELS", "tiny_sd_pipeline", "inpaint_inputs"]
