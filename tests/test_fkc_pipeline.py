"""FKCPipeline end to end on tiny random diffusers models built offline (docs/fkc.md "CLI")."""

import json

import numpy as np
import pytest
import torch

from gensample.pipelines.fkc import FKCPipeline
from gensample.schedulers.fkc import FKCScheduler
from sd_models import build_pixel_unet



def _tiny_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    words = ["a", "cat", "dog", "photo", "of", "red", "blue"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted({c for w in words for c in w})
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in words:  # merge each word left to right into one token
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)


def _tiny_sd(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    torch.manual_seed(0)
    tok = _tiny_tokenizer(tmp_path)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=8, intermediate_size=16,
                                        num_attention_heads=2, num_hidden_layers=2, vocab_size=max(tok.get_vocab().values()) + 1,
                                        max_position_embeddings=8, pad_token_id=1))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    return FKCPipeline(unet=unet, scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok)


def test_sd_shaped_fkc_cfg_with_prompts_as_experts(tmp_path):
    pipe = _tiny_sd(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FKCScheduler)
    seen = []
    out = pipe(prompt=["a photo of a cat", "a red dog"], negative_prompt="blue", guidance_scale=4.0, num_particles=3,
               num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np", resample="every",
               callback_on_step_end=lambda p, i, t, d: seen.append(i) or d)
    assert out.images.shape == (6, 16, 16, 3) and np.isfinite(out.images).all()
    assert out.ess.shape == (2, 4) and ((out.ess >= 1) & (out.ess <= 3 + 1e-9)).all()
    assert out.weights.dtype == np.float64 and np.allclose(out.weights.reshape(2, 3).sum(1), 1.0)
    assert seen == [0, 1, 2, 3]
    # a product of two prompts (one group), weighted output
    out2 = pipe(target="product", experts=["cat", "dog"], num_particles=4, num_inference_steps=3,
                generator=torch.Generator().manual_seed(1), output_type="latent", final="weighted", resample="never")
    assert out2.images.shape == (4, 4, 8, 8) and out2.ess.shape == (1, 3)
    assert not np.allclose(out2.weights, 0.25)  # product weights are not trivial


def test_sd_cfg_w1_equals_plain_conditional_sampling(tmp_path):
    pipe = _tiny_sd(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    a = pipe(prompt="a cat", guidance_scale=1.0, num_particles=2, num_inference_steps=3,
             generator=torch.Generator().manual_seed(0), output_type="latent", final="weighted")
    b = pipe(target="anneal", beta=1.0, prompt="a cat", num_particles=2, num_inference_steps=3,
             generator=torch.Generator().manual_seed(0), output_type="latent", final="weighted")
    torch.testing.assert_close(a.images, b.images)
    assert np.allclose(a.weights, 0.5) and np.allclose(a.ess, 2.0)


def test_class_conditional_unet2d_experts(tmp_path):
    from diffusers import DDPMScheduler

    unet = build_pixel_unet(num_class_embeds=4)  # 3 classes + null
    pipe = FKCPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0, 2], guidance_scale=3.0, num_particles=2, num_inference_steps=3,
               generator=torch.Generator().manual_seed(0), output_type="pt", final="one_per_group")
    assert out.images.shape == (2, 3, 8, 8) and out.ess.shape == (2, 3)
    out = pipe(target="product", experts=[0, 1], num_particles=2, num_inference_steps=3,
               generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np")
    assert out.images.shape == (2, 8, 8, 3)
    pipe.save_pretrained(tmp_path / "p")
    again = FKCPipeline.from_pretrained(tmp_path / "p")
    assert isinstance(again.scheduler, FKCScheduler)
    with pytest.raises(ValueError, match="class_labels must be in"):
        pipe(class_labels=[3], num_inference_steps=2)
    with pytest.raises(ValueError, match="target must be one of"):
        pipe(class_labels=[0], target="bogus", num_inference_steps=2)
    with pytest.raises(ValueError, match="at least two"):
        pipe(target="product", experts=[1], num_inference_steps=2)
