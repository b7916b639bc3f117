"""STSLPipeline on Stable-Diffusion-shaped tiny random components (diffusers fast-test style) and on
a pixel UNet2DModel: the latent path runs end to end on SD classes, with honest VAE/UNet counts."""

import numpy as np
import pytest
import torch

from gensample.samplers.operators import make_operator
from sd_models import build_pixel_unet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd_parts():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
    )
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    for p in [*unet.parameters(), *vae.parameters()]:
        p.requires_grad_(False)
    return unet.eval(), vae.eval(), sched


@pytest.mark.parametrize("method, kwargs", [
    ("stsl", dict(inner_steps=2)),
    ("psld", dict()),
    ("dps", dict()),
])
def test_sd_shaped_latent_path_end_to_end(sd_parts, method, kwargs):
    from gensample.pipelines.stsl import STSLPipeline

    unet, vae, sched = sd_parts
    pipe = STSLPipeline(unet=unet, scheduler=sched, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    op = make_operator("sr-bicubic", (3, 32, 32), sr_factor=4)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = op.measure(x, 0.05, [torch.Generator().manual_seed(1)])
    embeds = torch.randn(1, 7, 8, generator=torch.Generator().manual_seed(2))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = pipe(y, op, method=method, num_inference_steps=3, batch_size=2, prompt_embeds=embeds, generator=gens,
               output_type="np", **kwargs)
    img = out.images
    assert img.shape == (2, 32, 32, 3) and np.isfinite(img).all()
    c = pipe.last_counters
    steps, k = 3, kwargs.get("inner_steps", 1)
    assert c.nfe_paper == steps * k
    # every guided evaluation decodes with a backward pass; the final image decodes once more
    assert c.vae_decode_backward == steps * k and c.vae_decode == steps * k + 1
    if method == "psld":  # gluing differentiates through the encoder
        assert c.vae_encode_backward == steps
    # batch of one equals its batch element (per-sample generators)
    one = pipe(y, op, method=method, num_inference_steps=3, batch_size=1, prompt_embeds=embeds,
               generator=[torch.Generator().manual_seed(0)], output_type="np", **kwargs).images
    np.testing.assert_allclose(one[0], img[0], atol=1e-4)


def test_pixel_unet2d_pipeline_and_errors():
    from diffusers import DDPMScheduler

    from gensample.pipelines.stsl import STSLPipeline

    unet = build_pixel_unet()
    pipe = STSLPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    op = make_operator("inpaint-box", (3, 8, 8))
    y = op(torch.zeros(1, 3, 8, 8))
    out = pipe(y, op, num_inference_steps=2, inner_steps=1, output_type="pt")
    assert out.images.shape == (1, 3, 8, 8) and pipe.last_counters.vae_decode == 0
    with pytest.raises(ValueError, match="output_type"):
        pipe(y, op, num_inference_steps=2, output_type="latent")
    with pytest.raises(TypeError, match="LinearOperator"):
        pipe(y, "inpaint-box", num_inference_steps=2)
    with pytest.raises(ValueError, match="method must be one of"):
        pipe(y, op, method="p2l", num_inference_steps=2)
