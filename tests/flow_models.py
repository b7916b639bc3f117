"""Tiny random flow-matching pipelines (SD3 / SD3.5 and Flux), built offline as diffusers' fast tests
build theirs.

SD3: an SD3Transformer2DModel, two CLIPTextModelWithProjection encoders (CLIP-L / CLIP-G stand-ins)
with CLIP tokenizers written by tests/sd_models.py, a tiny T5EncoderModel with a T5 tokenizer built
from an in-memory Unigram vocabulary (no sentencepiece file, no download), an AutoencoderKL with
SD3's shift / scaling factors, and a FlowMatchEulerDiscreteScheduler with SD3's static shift 3.
Flux: a FluxTransformer2DModel (optionally guidance-distilled, ``guidance_embeds=True``), a
CLIPTextModel (pooled output), the tiny T5, a VAE with 2 latent channels (packed 2x2 into 8
transformer channels) and Flux-dev's dynamic-shifting scheduler config.

Sizes: VAE scale factor 2; SD3 latents LATENT x LATENT (pixels 2 * LATENT); Flux runs at an
explicit height / width (its pipeline's default is 128 latent pixels, too large for CPU tests).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_models import build_tokenizer

LATENT = 8  # SD3 transformer sample_size; pixels = 2 * LATENT
PIXELS = 2 * LATENT
T5_WORDS = ("a", "cat", "dog", "red", "blue", "photo", "of", "the", "painting", "squirrel")
T5_DIM = 64  # = SD3 joint_attention_dim (CLIP-L 32 + CLIP-G 32 padded to 64, as 768 + 1280 -> 4096)


def build_t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer (transformers' tokenizers-backed T5Tokenizer) over a tiny Unigram vocabulary:
    <pad> 0, </s> 1, <unk> 2, the word-start marker, whole words and single letters (so every
    lower-case text tokenizes; other characters become <unk>). Appends </s> like T5."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in T5_WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("\u2581" + c, -5.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def build_t5(vocab_size: int, d_model: int = T5_DIM, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def build_clip(vocab_size: int, projection: bool, seed: int = 0, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                         num_hidden_layers=3, vocab_size=vocab_size, max_position_embeddings=16, hidden_act="gelu",
                         projection_dim=32)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def build_flow_vae(latent_channels: int, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(sample_size=PIXELS, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


def sd3_scheduler(**overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **overrides})


def flux_scheduler(**overrides):
    """Flux-dev's scheduler config: dynamic shifting, mu from the packed image sequence length."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kw = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
              max_image_seq_len=4096)
    kw.update(overrides)
    return FlowMatchEulerDiscreteScheduler(**kw)


def tiny_sd3_pipeline(tmp: Path, t5: bool = True, seed: int = 0, scheduler=None):
    """StableDiffusion3Pipeline with tiny random parts; ``t5=False`` leaves text_encoder_3 /
    tokenizer_3 out (diffusers then uses zero T5 embeddings)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = build_tokenizer(Path(tmp) / "_clip_tokenizer")
    tok2 = build_tokenizer(Path(tmp) / "_clip_tokenizer_2")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=LATENT, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=T5_DIM, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=16).eval()
    tok3 = build_t5_tokenizer() if t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler if scheduler is not None else sd3_scheduler(),
        vae=build_flow_vae(4, seed), text_encoder=build_clip(len(tok), True, seed),
        tokenizer=tok, text_encoder_2=build_clip(len(tok2), True, seed + 1), tokenizer_2=tok2,
        text_encoder_3=build_t5(len(tok3), seed=seed) if t5 else None, tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(tmp: Path, guidance: bool = False, seed: int = 0, scheduler=None):
    """FluxPipeline with tiny random parts; ``guidance=True``: a guidance-distilled transformer
    (Flux-dev's ``guidance_embeds``)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tok = build_tokenizer(Path(tmp) / "_clip_tokenizer")
    tok2 = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance).eval()
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler if scheduler is not None else flux_scheduler(),
                        vae=build_flow_vae(2, seed), text_encoder=build_clip(len(tok), False, seed), tokenizer=tok,
                        text_encoder_2=build_t5(len(tok2), d_model=32, seed=seed), tokenizer_2=tok2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_flow_pipeline(folder: Path, family: str, **kw) -> Path:
    """Save a tiny SD3 (``family="sd3"``) or Flux (``"flux"``) pipeline with save_pretrained."""
    folder = Path(folder)
    build = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[family]
    build(folder.parent / f"_{folder.name}_src", **kw).save_pretrained(folder)
    return folder


# -- released configurations (architecture only; weights random or on the meta device) -------------
# stabilityai/stable-diffusion-3.5-medium: MM-DiT-X, 24 blocks, dual attention in blocks 0-12, QK RMS norm
SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
# black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks, guidance-distilled
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                          num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def wide_clip(vocab_size: int, hidden: int, projection: int | None, seed: int = 0):
    """A one-layer CLIP text encoder of a released width (hidden / projection), for released
    transformer configs: CLIP-L 768 / 768, CLIP-G 1280 / 1280."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                         vocab_size=vocab_size, max_position_embeddings=16, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def sd35_medium_pipeline(tmp: Path, seed: int = 0):
    """StableDiffusion3Pipeline with SD3.5-medium's transformer and VAE (random weights, ~2.5 B
    parameters) and one-layer text encoders of the released widths (CLIP-L 768, CLIP-G 1280, T5 4096)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = build_tokenizer(Path(tmp) / "_clip_tokenizer")
    tok3 = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER).eval()
    vae = AutoencoderKL(**SD3_VAE).eval()
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=4096, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0)).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sd3_scheduler(), vae=vae,
                                    text_encoder=wide_clip(len(tok), 768, 768, seed), tokenizer=tok,
                                    text_encoder_2=wide_clip(len(tok), 1280, 1280, seed + 1), tokenizer_2=tok,
                                    text_encoder_3=t5, tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe
