"""Tiny random SDXL pipelines, built offline as diffusers' SDXL fast tests build theirs.

A UNet2DConditionModel with ``addition_embed_type="text_time"`` (pooled text + six size numbers
as an added embedding), an AutoencoderKL with SDXL's latent scaling (0.13025, ``force_upcast``),
two CLIP text encoders (a CLIPTextModel and a CLIPTextModelWithProjection whose projection gives
the pooled embedding) and two CLIPTokenizers from the byte-level vocab + merges of
tests/sd_models.py (the second pads with "!", as SDXL's tokenizer_2 does): no download.

The encoders have different widths (24 and 40, projection 16) so that a wrong concatenation order
or a pooled vector from the wrong encoder fails loudly: cross_attention_dim = 24 + 40 = 64 and
projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + 16 = 64.

``save_sdxl_pipeline(dir, prediction_type)`` writes the nested folder with ``save_pretrained``;
"v_prediction" gives a v-prediction fine-tune's scheduler, "v_zero_snr" a zero-terminal-SNR one
(``rescale_betas_zero_snr``, trailing spacing). ``real_size_sdxl_pipeline`` uses SDXL base 1.0's UNet config (random weights)
with tiny text encoders of the real widths (768 + 1280, pooled 1280). ``write_oms_xl_release``
writes a tiny OMS module for SDXL latents in the released folder layout (h1t/oms_b_openclip_xl).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_models import MAX_TOKENS, write_tokenizer_files

LATENT = 8  # UNet sample_size; pixels = 2 * LATENT (two VAE blocks)
PIXELS = 2 * LATENT
HIDDEN_1, HIDDEN_2, PROJECTION = 24, 40, 16
TIME_EMBED = 8

# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json)
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def build_tokenizers(tmp: Path):
    """(tokenizer, tokenizer_2): CLIPTokenizers from the tiny BPE files; the second pads with "!"."""
    from transformers import CLIPTokenizer

    folder = Path(tmp) / "_sdxl_tokenizer_src"
    write_tokenizer_files(folder)
    files = (str(folder / "vocab.json"), str(folder / "merges.txt"))
    return (CLIPTokenizer(*files, model_max_length=MAX_TOKENS),
            CLIPTokenizer(*files, model_max_length=MAX_TOKENS, pad_token="!"))


def build_text_encoders(vocab_size: int, seed: int = 0, hidden=(HIDDEN_1, HIDDEN_2), projection: int = PROJECTION,
                        layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(width, **kw):
        return CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                              hidden_size=width, intermediate_size=2 * width, layer_norm_eps=1e-5,
                              num_attention_heads=4, num_hidden_layers=layers, vocab_size=vocab_size,
                              max_position_embeddings=MAX_TOKENS, hidden_act="gelu", **kw)

    torch.manual_seed(seed)
    enc = CLIPTextModel(cfg(hidden[0])).eval()
    torch.manual_seed(seed + 1)
    enc2 = CLIPTextModelWithProjection(cfg(hidden[1], projection_dim=projection)).eval()
    return enc, enc2


def build_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw = dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=LATENT, in_channels=4, out_channels=4,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
              addition_time_embed_dim=TIME_EMBED, transformer_layers_per_block=(1, 2),
              projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION,
              cross_attention_dim=HIDDEN_1 + HIDDEN_2, norm_num_groups=8)
    kw.update(overrides)
    return UNet2DConditionModel(**kw).eval()


def build_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = dict(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              norm_num_groups=8, sample_size=PIXELS, scaling_factor=0.13025, force_upcast=True)
    kw.update(overrides)
    return AutoencoderKL(**kw).eval()


def build_scheduler(prediction_type: str = "epsilon"):
    """SDXL base's EulerDiscreteScheduler config; "v_prediction": a v fine-tune on the same betas;
    "v_zero_snr": a zero-terminal-SNR v fine-tune (rescale_betas_zero_snr, trailing spacing)."""
    from diffusers import EulerDiscreteScheduler

    # the base's scheduler_config.json also carries DDIM/PNDM keys (kept by from_config), so a
    # DDIMScheduler made from it does not clip x0
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
              timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
              clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0, skip_prk_steps=True)
    if prediction_type == "v_prediction":
        kw.update(prediction_type="v_prediction")
    elif prediction_type == "v_zero_snr":
        kw.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    elif prediction_type != "epsilon":
        raise ValueError(f"prediction_type must be epsilon, v_prediction or v_zero_snr, got {prediction_type!r}")
    return EulerDiscreteScheduler.from_config(kw)


def build_sdxl_pipeline(tmp: Path, prediction_type: str = "epsilon", seed: int = 0, force_zeros: bool = True,
                        unet=None, text_widths=(HIDDEN_1, HIDDEN_2), projection: int = PROJECTION, vae=None):
    """A StableDiffusionXLPipeline of tiny random components (``tmp``: a folder for the tokenizer files)."""
    from diffusers import StableDiffusionXLPipeline

    tok, tok2 = build_tokenizers(tmp)
    enc, enc2 = build_text_encoders(len(tok), seed, text_widths, projection)
    pipe = StableDiffusionXLPipeline(vae=vae if vae is not None else build_vae(seed), text_encoder=enc,
                                     text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet if unet is not None else build_unet(seed),
                                     scheduler=build_scheduler(prediction_type),
                                     force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sdxl_pipeline(folder: Path, prediction_type: str = "epsilon", seed: int = 0, variant: str | None = None,
                       force_zeros: bool = True) -> Path:
    """Save a tiny random SDXL pipeline (nested layout, ``save_pretrained``) to ``folder``."""
    folder = Path(folder)
    pipe = build_sdxl_pipeline(folder.parent, prediction_type, seed, force_zeros)
    if variant == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, variant=variant)
    return folder


def real_size_sdxl_pipeline(tmp: Path, seed: int = 0):
    """SDXL base 1.0's UNet (random weights, ~2.6B parameters, float32 ~10 GB) with one-layer text
    encoders of the real widths (CLIP-L 768 + OpenCLIP bigG 1280, pooled 1280) and SDXL's VAE
    block widths reduced to two blocks of 32/64 channels but kept at scale factor 8 (four blocks)."""
    torch.manual_seed(seed)
    unet = build_unet(seed, **SDXL_BASE_UNET)
    vae = build_vae(seed, block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024)
    pipe = build_sdxl_pipeline(tmp, seed=seed, unet=unet, text_widths=(768, 1280), projection=1280, vae=vae)
    return pipe


def write_oms_xl_release(folder: Path, text_target: Path | None, seed: int = 1):
    """A tiny OMS module for SDXL latents (4 channels) in the released layout of h1t/oms_b_openclip_xl:
    oms_module/ (config.json + diffusion_pytorch_model.fp16.safetensors only) and oms_text_encoder/
    + oms_tokenizer/ pointers to an SD 2.x-layout folder (``text_target``: its own text encoder,
    as the release's point at SD 2.1's OpenCLIP ViT-H). Returns the module (fp16-rounded, float32)."""
    from oms_fixtures import write_oms_release

    return write_oms_release(folder, text_target, seed)
