"""Tiny random Stable Diffusion-class pipelines, built offline as diffusers' fast tests build theirs.

A UNet2DConditionModel (cross-attention), an AutoencoderKL (scale factor 2), a CLIPTextModel from a
tiny CLIPTextConfig and a CLIPTokenizer from a byte-level vocab + merges written to a folder: no
download. ``save_sd_pipeline(dir, version, layout)`` writes the model_index.json folder in the
nested layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or the flat one (the UNet's
config.json and weights and scheduler_config.json at the root).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

LATENT = 8  # UNet sample_size; pixels = LATENT * 2 (two VAE blocks)
PIXELS = 2 * LATENT
MAX_TOKENS = 16


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins of bytes used by byte-level BPE vocabularies (GPT-2 / CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(folder: Path) -> int:
    """vocab.json + merges.txt of a tiny CLIP BPE (every byte, a few merges); returns vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("e", "d</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def build_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                         num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS)
    return CLIPTextModel(cfg).eval()


def build_pixel_unet(channels: int = 3, attention: bool = True, num_class_embeds=None, seed: int = 0):
    """A tiny random pixel-space UNet2DModel (8x8, widths 4/8), the one the pipeline tests share;
    ``attention`` puts an attention block at the lower resolution."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    down, up = (("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")) if attention else \
        (("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D"))
    return UNet2DModel(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4, sample_size=8,
                       in_channels=channels, out_channels=channels, down_block_types=down, up_block_types=up,
                       num_class_embeds=num_class_embeds)


def build_unet(version: int = 1, seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw = dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=LATENT, in_channels=4, out_channels=4,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)
    if version == 2:  # SD 2.x: linear projections, per-block head dims
        kw.update(use_linear_projection=True, attention_head_dim=(2, 4))
    kw.update(overrides)
    return UNet2DConditionModel(**kw).eval()


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=PIXELS).eval()


def build_scheduler(version: int = 1):
    """SD's training schedule: scaled-linear betas 0.00085..0.012; 2.x predicts v."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1,
                         prediction_type="v_prediction" if version == 2 else "epsilon")


def build_sd_pipeline(tmp: Path, version: int = 1, seed: int = 0):
    from diffusers import StableDiffusionPipeline

    tok = build_tokenizer(Path(tmp) / "_tokenizer_src")
    return StableDiffusionPipeline(vae=build_vae(seed), text_encoder=build_text_encoder(len(tok), seed), tokenizer=tok,
                                   unet=build_unet(version, seed), scheduler=build_scheduler(version),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def flatten(folder: Path) -> Path:
    """Nested -> flat: unet/* and scheduler/scheduler_config.json move to the root (google/ddpm-* style)."""
    folder = Path(folder)
    for f in (folder / "unet").iterdir():
        shutil.move(str(f), str(folder / f.name))
    (folder / "unet").rmdir()
    shutil.move(str(folder / "scheduler" / "scheduler_config.json"), str(folder / "scheduler_config.json"))
    (folder / "scheduler").rmdir()
    return folder


def save_sd_pipeline(folder: Path, version: int = 1, layout: str = "nested", seed: int = 0, variant: str | None = None) -> Path:
    """Save a tiny random SD pipeline (1: epsilon, 2: v-prediction) to ``folder``; returns it."""
    folder = Path(folder)
    pipe = build_sd_pipeline(folder.parent, version, seed)
    if variant == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, variant=variant)
    if layout == "flat":
        flatten(folder)
    elif layout != "nested":
        raise ValueError(f"layout must be nested or flat, got {layout!r}")
    return folder
