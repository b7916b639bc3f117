"""Time-Shift in diffusers pipelines: stock DDPM/DDIM/StableDiffusion pipelines via
`enable_time_shift`, and our `TimeShiftPipeline` (specs/time_shift.md sec. 4, ecosystem.md sec. 2)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from gensample.pipelines.time_shift import (
    TimeShiftModelWrapper,
    TimeShiftPipeline,
    disable_time_shift,
    enable_time_shift,
)
from gensample.samplers.time_shift import TimeShiftScheduler


def tiny_unet(num_class_embeds=None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4, sample_size=8, in_channels=3,
        out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds,
    ).eval()


class Spy:
    """Records the timestep tensors a UNet receives."""

    def __init__(self, unet):
        self.seen = []
        unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.seen.append(torch.as_tensor(t).clone())


def _ddim_pipe():
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_window_zero_is_stock_bit_for_bit(eta):
    ref = _ddim_pipe()(batch_size=2, num_inference_steps=5, eta=eta, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images
    pipe = enable_time_shift(_ddim_pipe(), window_size=0)
    got = pipe(batch_size=2, num_inference_steps=5, eta=eta, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(ref, got)


def test_ddim_pipeline_time_shift_passes_per_sample_timesteps():
    pipe = enable_time_shift(_ddim_pipe(), window_size=40, cutoff=200)
    spy = Spy(pipe.unet.unet)
    out = pipe(batch_size=3, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (3, 8, 8, 3) and np.isfinite(out.images).all()
    grid = pipe.scheduler.timesteps.tolist()
    assert len(spy.seen) == 5 and all(t.shape == (3,) for t in spy.seen)
    for k, (t, t_s) in enumerate(zip(grid, spy.seen)):
        if k == 0 or t <= 200:
            assert (t_s == t).all()
        else:
            assert ((t_s >= t - 20) & (t_s <= t + 20)).all()
    # the random UNet's samples do not have the variance of q(x_t): TS must shift somewhere
    assert any((t_s != t).any() for t, t_s in zip(grid, spy.seen))
    disable_time_shift(pipe)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDIMScheduler)


def test_ddpm_pipeline_time_shift_runs_ddpm_like():
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(clip_sample=False))
    enable_time_shift(pipe, window_size=30, cutoff=300)
    assert isinstance(pipe.scheduler, TimeShiftScheduler) and pipe.scheduler.config.eta == 1.0
    a = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
    c = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert not np.array_equal(a, c) and np.isfinite(a).all()  # stochastic (seeded: contract tests)
    with pytest.raises(ValueError, match="already enabled"):
        enable_time_shift(pipe)


def test_wrapper_cfg_halves_share_ts():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
    ).eval()
    sched = TimeShiftScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, window_size=40, cutoff=0)
    sched.set_timesteps(10)
    wrapper = TimeShiftModelWrapper(unet, sched)
    spy = Spy(unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1, 1)
    emb = torch.randn(6, 5, 8, generator=g)
    t = sched.timesteps[3]
    with torch.no_grad():
        out = wrapper(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
    t_s = spy.seen[0]
    assert out.shape == (6, 4, 8, 8) and t_s.shape == (6,)
    assert torch.equal(t_s[:3], t_s[3:]) and torch.equal(t_s[:3], sched.model_timesteps(x, t))
    assert t_s[0] != t_s[2]  # per-sample: different variances give different shifts
    assert wrapper.config.in_channels == 4 and wrapper.dtype == torch.float32


@pytest.mark.slow  # ~5 s idle, 40 s on the shared dev machine
def test_stable_diffusion_pipeline_time_shift():
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
    ).eval()
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    emb, neg = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=5, guidance_scale=3.0,
              height=32, width=32, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    enable_time_shift(pipe, window_size=0)
    assert np.array_equal(ref, pipe(generator=torch.Generator().manual_seed(0), **kw).images)
    disable_time_shift(pipe)
    enable_time_shift(pipe, window_size=40, cutoff=0)
    spy = Spy(pipe.unet.unet)
    out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()
    assert all(t.shape == (4,) and torch.equal(t[:2], t[2:]) for t in spy.seen)  # CFG halves share t_s


# -- our pipeline ------------------------------------------------------------------------------
def test_time_shift_pipeline_window_zero_equals_ddim_pipeline():
    ref = _ddim_pipe()(batch_size=2, num_inference_steps=5, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images
    pipe = TimeShiftPipeline(unet=tiny_unet(), scheduler=TimeShiftScheduler(clip_sample=False, window_size=0))
    got = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(ref, got)
    converted = TimeShiftPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=False, steps_offset=1))
    assert isinstance(converted.scheduler, TimeShiftScheduler) and converted.scheduler.config.steps_offset == 1


def test_time_shift_pipeline_class_conditional_contract(tmp_path):
    pipe = TimeShiftPipeline(unet=tiny_unet(num_class_embeds=3),
                             scheduler=TimeShiftScheduler(clip_sample=False, window_size=40, cutoff=200, eta=1.0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1, 2)]  # noqa: E731
    out = pipe(batch_size=3, num_inference_steps=5, class_labels=[0, 1, 2], output_type="np", generator=gens())
    assert out.images.shape == (3, 8, 8, 3) and np.isfinite(out.images).all()
    tup = pipe(batch_size=3, num_inference_steps=5, class_labels=[0, 1, 2], output_type="np", generator=gens(),
               return_dict=False)
    assert np.array_equal(tup[0], out.images)
    one = pipe(batch_size=1, num_inference_steps=5, class_labels=[1], output_type="np",
               generator=[torch.Generator().manual_seed(1)]).images
    assert np.abs(one[0] - out.images[1]).max() < 1e-4  # batch of one equals its batch element
    pil = pipe(batch_size=1, class_labels=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (8, 8)
    pipe.save_pretrained(tmp_path)
    again = TimeShiftPipeline.from_pretrained(tmp_path)
    assert again.scheduler.config.window_size == 40 and again.scheduler.config.eta == 1.0
    re = again(batch_size=3, num_inference_steps=5, class_labels=[0, 1, 2], output_type="np", generator=gens()).images
    assert np.abs(re - out.images).max() < 5e-4

    seen = []

    def cb(p, i, t, tensors):
        seen.append(i)
        return {"latents": torch.zeros_like(tensors["latents"])}

    zero = pipe(batch_size=1, num_inference_steps=4, class_labels=0, output_type="np", callback_on_step_end=cb,
                generator=torch.Generator().manual_seed(0)).images
    assert seen == [0, 1, 2, 3] and np.allclose(zero, 0.5)  # zeroed latents decode to mid-grey
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="latentz")
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(callback_on_step_end_tensor_inputs=["noise"])
