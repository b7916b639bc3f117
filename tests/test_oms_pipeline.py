"""OMSModule architecture and OMSPipeline with tiny random components (docs/oms.md "Python")."""

import pytest
import torch

from gensample.models.oms import OMS_B_CONFIG, OMSModule, small_oms_module
from gensample.pipelines.oms import OMSPipeline


TINY_OMS = dict(OMS_B_CONFIG, block_out_channels=[8, 16, 16], attention_head_dim=[2, 2, 2], cross_attention_dim=8,
                norm_num_groups=4, sample_size=8, layers_per_block=1)


def test_released_layout_is_unet2dcondition_minus_time_embedding():
    """State-dict keys/shapes = UNet2DConditionModel's minus time_embedding.* and *.time_emb_proj.*."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    oms, unet = OMSModule(**TINY_OMS), UNet2DConditionModel(**TINY_OMS)
    ref = {k: v.shape for k, v in unet.state_dict().items()
           if not k.startswith("time_embedding.") and ".time_emb_proj." not in k}
    got = {k: v.shape for k, v in oms.state_dict().items()}
    assert got == ref
    assert any(".time_emb_proj." in k for k in unet.state_dict())  # the filter did something


def test_oms_b_parameter_count():
    """OMS-B: about 154.0M parameters (the released fp16 file is 308,083,816 B = 2 bytes each)."""
    with torch.device("meta"):
        m = OMSModule(**OMS_B_CONFIG)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 154.0e6) < 0.1e6, n


def test_load_released_style_checkpoint_by_path(tmp_path):
    """A folder with a UNet2DConditionModel-style config.json (foreign _class_name and extra
    keys such as time_embedding_type) and time-free weights loads with from_pretrained."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = OMSModule(**TINY_OMS)
    cfg = dict(TINY_OMS, _class_name="UNet2DConditionWoCTModel", time_embedding_type="positional", flip_sin_to_cos=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = OMSModule.from_pretrained(tmp_path)
    x = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 3, 8)
    torch.testing.assert_close(loaded(x, encoder_hidden_states=ehs).sample, src(x, encoder_hidden_states=ehs).sample)


def test_small_variant_round_trip_and_class_errors(tmp_path):
    torch.manual_seed(0)
    m = small_oms_module(in_channels=1, num_classes=3).eval()
    m.save_pretrained(tmp_path)
    m2 = OMSModule.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 1, 16, 16)
    lab = torch.tensor([0, 1, 3])
    torch.testing.assert_close(m(x, class_labels=lab).sample, m2(x, class_labels=lab).sample)
    assert m2.null_class == 3
    with pytest.raises(ValueError, match="class_labels must be in"):
        m(x, class_labels=torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        m(x)
    with pytest.raises(ValueError, match="num_class_embeds"):
        OMSModule(**dict(TINY_OMS, num_class_embeds=1))


# -- Stable Diffusion-shaped pipeline -----------------------------------------------------------
class Spy(torch.nn.Module):
    """Wraps an OMS module and records what psi is fed."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    @property
    def config(self):
        return self.inner.config

    @property
    def null_class(self):
        return self.inner.null_class

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def forward(self, sample, **kw):
        self.seen.append((sample.clone(), {k: v.clone() for k, v in kw.items()}))
        return self.inner(sample, **kw)


def tiny_sd(scheduler="ddim"):
    """A tiny SD pipeline as diffusers' fast tests build one (no tokenizer: prompt embeddings are passed)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2, attention_head_dim=2)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=2)
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
              set_alpha_to_one=False, steps_offset=1)
    if scheduler == "ddim":
        sched = DDIMScheduler(**sd)
    else:
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _oms_for_sd():
    torch.manual_seed(1)
    return OMSModule(**TINY_OMS).eval()


def _embeds(n, seed):
    return torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(seed))


def test_sd_shaped_pipeline_end_to_end_and_oms_off_is_bare():
    sd = tiny_sd()
    pipe = OMSPipeline(oms_module=_oms_for_sd(), base_pipeline=sd)
    kw = dict(prompt_embeds=_embeds(2, 0), negative_prompt_embeds=_embeds(2, 1), guidance_scale=3.0,
              num_inference_steps=4, output_type="np", height=16, width=16)
    out = pipe(oms_prompt_embeds=_embeds(2, 2), oms_negative_embeds=_embeds(2, 3), oms_guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (2, 16, 16, 3) and torch.isfinite(torch.as_tensor(out)).all()
    off = pipe(oms_flag=False, generator=torch.Generator().manual_seed(0), **kw).images
    bare = sd(generator=torch.Generator().manual_seed(0), **kw).images
    assert (off == bare).all()  # property 5: bit-identical
    assert abs(out - bare).max() > 1e-3  # and OMS does change the sample


def test_euler_oms_input_has_unit_variance_and_vp_latents():
    """psi sees unit-variance noise even with init_noise_sigma ~ 14.6 (Euler-leading), and the
    latents handed to the base pipeline are VP-scale: exactly the OMS step's x_T (eta = 0:
    sqrt(a) x0_hat + sqrt(1 - a) x_T'), which the base then multiplies by init_noise_sigma itself."""
    import math

    from gensample.samplers.oms import first_alpha_bar, oms_step

    sd = tiny_sd("euler")
    spy = Spy(_oms_for_sd())
    captured = {}
    prepare = sd.prepare_latents

    def record(*args, **kwargs):  # StableDiffusionPipeline.prepare_latents(..., latents=given)
        given = kwargs["latents"] if "latents" in kwargs else args[7]
        captured["given"] = given.clone()
        captured["scaled"] = prepare(*args, **kwargs).clone()
        return captured["scaled"]

    sd.prepare_latents = record
    pipe = OMSPipeline(oms_module=spy, base_pipeline=sd)
    n = 8
    pipe(prompt_embeds=_embeds(1, 0).expand(n, 5, 8), oms_prompt_embeds=_embeds(1, 2), num_inference_steps=20,
         guidance_scale=1.0, output_type="latent", height=64, width=64, generator=torch.Generator().manual_seed(0), oms_eta=0.0)
    sd.scheduler.set_timesteps(20)
    sigma = float(sd.scheduler.init_noise_sigma)
    assert sigma > 10
    a = first_alpha_bar(sd.scheduler)
    x_in = spy.seen[0][0]
    # N = n * 4 * 32 * 32 = 32768 entries: a sample sd of N draws has relative sd 1 / sqrt(2 N)
    # (0.4 %); 5 of those bound a false failure by 6e-7 (two-sided normal tail).
    N = x_in.numel()
    assert N == n * 4 * 32 * 32
    tol = 5 / math.sqrt(2 * N)
    assert abs(x_in.std().item() - 1) < tol, (x_in.std().item(), tol)
    with torch.no_grad():
        v = spy.inner(x_in, **spy.seen[0][1]).sample
    expect = oms_step(v, None, x_in, a, eta=0.0)
    given = captured["given"]
    assert given.shape == x_in.shape
    torch.testing.assert_close(given, expect.to(given.dtype))  # exactly the OMS step's x_T
    # VP scale, judged on the latents alone: x_T = sqrt(a) x0_hat + sqrt(1 - a) x_T' has variance
    # 1 - a + a Var(x0_hat) up to the sample sd's relative sd 1 / sqrt(2 N) and the cross term
    # 2 sqrt(a (1 - a)) Cov(x0_hat, x_T'), bounded by Cauchy-Schwarz with the measured sds.
    var_x0 = v.double().var().item()
    expect_var = 1 - a + a * var_x0
    cross = 2 * math.sqrt(a * (1 - a)) * math.sqrt(var_x0) * x_in.double().std().item() / expect_var
    ratio = given.double().std().item() / math.sqrt(expect_var)
    assert abs(ratio - 1) < tol + cross, (ratio, tol, cross)  # |sqrt(1 + e) - 1| <= |e| for |e| <= 1
    # sigma scale (what handing over sigma * x_T would give) is more than 10x away
    assert abs((given * sigma).double().std().item() / math.sqrt(expect_var) - 1) > 10 * (tol + cross)
    torch.testing.assert_close(captured["scaled"], given * sigma)  # the base did the init_noise_sigma multiply


def test_negative_batch_is_prompt_batch_times_images_per_prompt():
    """Pitfall: reference sizes the OMS negative batch as len(prompt) // n; ours has one row per image."""
    sd = tiny_sd()
    spy = Spy(_oms_for_sd())
    pipe = OMSPipeline(oms_module=spy, base_pipeline=sd)
    cond, neg = _embeds(2, 2), _embeds(1, 3)
    pipe(prompt_embeds=_embeds(2, 0), oms_prompt_embeds=cond, oms_negative_embeds=neg, oms_guidance_scale=2.0,
         guidance_scale=1.0, num_images_per_prompt=3, num_inference_steps=2, output_type="latent", height=16, width=16,
         generator=torch.Generator().manual_seed(0))
    x_in, kw = spy.seen[0]
    ehs = kw["encoder_hidden_states"]
    assert x_in.shape[0] == 12 and ehs.shape[0] == 12  # 6 conditional + 6 unconditional rows
    torch.testing.assert_close(ehs[:6], cond.repeat_interleave(3, 0))
    torch.testing.assert_close(ehs[6:], neg.expand(6, 5, 8))
    # w = 1 skips the unconditional branch (OMS, arXiv 2311.15744: guidance on the OMS module with w = 1 is the conditional branch alone)
    spy.seen.clear()
    pipe(prompt_embeds=_embeds(2, 0), oms_prompt_embeds=cond, num_images_per_prompt=3, num_inference_steps=2, guidance_scale=1.0,
         output_type="latent", height=16, width=16)
    assert spy.seen[0][0].shape[0] == 6


def test_pipeline_errors():
    sd = tiny_sd()
    pipe = OMSPipeline(oms_module=_oms_for_sd(), base_pipeline=sd)
    with pytest.raises(ValueError, match="oms_text_encoder"):
        pipe(prompt="a cat", num_inference_steps=2, output_type="latent")  # no encoder, no embeds
    with pytest.raises(ValueError, match="oms_prompt_embeds"):
        pipe(prompt_embeds=_embeds(2, 0), oms_prompt_embeds=_embeds(3, 0), num_inference_steps=2, guidance_scale=1.0,
             output_type="latent")
    with pytest.raises(ValueError, match="eta"):
        pipe(prompt_embeds=_embeds(1, 0), oms_prompt_embeds=_embeds(1, 0), oms_eta=2.0, num_inference_steps=2,
             guidance_scale=1.0)


def test_pixel_ddim_pipeline_with_class_oms():
    """DDIMPipeline (no `latents` argument): OMS runs the same loop from x_T; oms_flag=False is bare."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    base = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.006))
    base.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipe = OMSPipeline(oms_module=small_oms_module(in_channels=1, num_classes=3).eval(), base_pipeline=base)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=3, num_inference_steps=5, output_type="np")
    out = pipe(oms_class_labels=torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (3, 16, 16, 1)
    off = pipe(oms_flag=False, generator=torch.Generator().manual_seed(0), **kw).images
    bare = base(generator=torch.Generator().manual_seed(0), **kw).images
    assert (off == bare).all()
