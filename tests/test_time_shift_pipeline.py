"""Time-Shift in diffusers pipelines: stock DDPM/DDIM/Stable Diffusion pipelines via
`enable_time_shift`, the `from_config` idiom, and our `TimeShiftPipeline` (docs/time_shift.md
"Python / diffusers"). SD pipelines are tiny random ones built offline (tests/sd_fixtures.py)."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)

from gensample.pipelines.time_shift import TimeShiftPipeline, disable_time_shift, enable_time_shift
from gensample.samplers.time_shift import reference_variance, sample_variance, time_shift_times
from gensample.schedulers.time_shift import TimeShiftScheduler
from sd_models import build_pixel_unet


def tiny_unet(num_class_embeds=None) -> UNet2DModel:
    return build_pixel_unet(num_class_embeds=num_class_embeds).eval()


class Spy:
    """Records the timestep tensors a UNet receives (after the Time-Shift hook)."""

    def __init__(self, unet):
        self.seen = []
        self.handle = unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.seen.append(torch.as_tensor(t).clone())


def _ddim_pipe():
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_window_zero_is_stock_bit_for_bit(eta):
    ref = _ddim_pipe()(batch_size=2, num_inference_steps=5, eta=eta, output_type="np", generator=_gen()).images
    pipe = enable_time_shift(_ddim_pipe(), window_size=0)
    got = pipe(batch_size=2, num_inference_steps=5, eta=eta, output_type="np", generator=_gen()).images
    assert np.array_equal(ref, got)


def test_ddim_pipeline_time_shift_passes_per_sample_timesteps():
    pipe = enable_time_shift(_ddim_pipe(), window_size=40, cutoff=200)
    assert type(pipe.unet) is UNet2DModel  # the pipeline's unet stays the model (hook, no wrapper)
    spy = Spy(pipe.unet)
    out = pipe(batch_size=3, num_inference_steps=5, output_type="np", generator=_gen())
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
    spy.seen.clear()
    pipe(batch_size=3, num_inference_steps=5, output_type="np", generator=_gen())
    assert all(t.numel() == 1 for t in spy.seen)  # the hook is gone


def test_ddpm_pipeline_time_shift_runs_ddpm_like():
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    enable_time_shift(pipe, window_size=30, cutoff=300)
    assert isinstance(pipe.scheduler, TimeShiftScheduler) and pipe.scheduler.config.eta == 1.0
    a = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen(0)).images
    c = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen(1)).images
    assert not np.array_equal(a, c) and np.isfinite(a).all()  # stochastic (seeded: contract tests)
    with pytest.raises(ValueError, match="already enabled"):
        enable_time_shift(pipe)


# -- issue: clip_sample default, the from_config idiom ------------------------------------------
@pytest.mark.parametrize("source,expected", [
    (PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), False),  # no clip_sample key
    (EulerDiscreteScheduler(), False),
    (DDIMScheduler(clip_sample=True), True),
    (DDIMScheduler(clip_sample=False), False),
])
def test_clip_sample_comes_from_the_source_config_else_false(source, expected):
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=source)  # keeps the scheduler it is given
    enable_time_shift(pipe, window_size=0)
    assert pipe.scheduler.config.clip_sample is expected
    assert TimeShiftScheduler.from_config(source.config).config.clip_sample is expected


def test_from_config_swap_in_a_stock_pipeline_fails_loudly():
    """`pipe.scheduler = TimeShiftScheduler.from_config(...)` leaves the UNet at the grid time:
    the step that would shift raises with the fix instead of mixing DDIM and TS."""
    pipe = _ddim_pipe()
    pipe.scheduler = TimeShiftScheduler.from_config(pipe.scheduler.config, window_size=40, cutoff=0)
    with pytest.raises(ValueError, match="enable_time_shift"):
        pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen())
    # configurations that never move the model time are correct as they are
    ref = _ddim_pipe()(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen()).images
    pipe.scheduler = TimeShiftScheduler.from_config(pipe.scheduler.config, window_size=0)
    assert np.array_equal(pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen()).images, ref)
    pipe.scheduler = TimeShiftScheduler.from_config(pipe.scheduler.config, window_size=40, cutoff=0,
                                                    variant="reference_pnm")
    out = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen()).images
    assert np.isfinite(out).all() and not np.array_equal(out, ref)


def test_scheduler_swap_after_enable_works():
    pipe = enable_time_shift(_ddim_pipe(), window_size=40, cutoff=0)
    ref = _ddim_pipe()(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen()).images
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # back to stock DDIM
    assert np.array_equal(pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen()).images, ref)
    pipe.scheduler = TimeShiftScheduler.from_config(pipe.scheduler.config, window_size=40, cutoff=0)
    spy = Spy(pipe.unet)
    out = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen()).images
    assert np.isfinite(out).all() and any((t != g).any() for t, g in zip(spy.seen, pipe.scheduler.timesteps))


def test_window_wider_than_stride_with_eta_is_refused_and_steps_stay_finite():
    pipe = enable_time_shift(_ddim_pipe(), window_size=40, cutoff=0)
    with pytest.raises(ValueError, match=r"window_size 40 .* must be in \[0, 19\]"):
        pipe(batch_size=2, num_inference_steps=100, eta=1.0, output_type="np", generator=_gen())


# -- issue 25 item 1: Time-Shift is per pipeline, whatever the pipelines share -----------------
KW = dict(batch_size=2, num_inference_steps=5, output_type="np")


def _own(pipe_cls, unet, scheduler):
    pipe = pipe_cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, seed=0, **kw):
    return pipe(generator=_gen(seed), **{**KW, **kw}).images


def test_from_pipe_copy_that_did_not_enable_runs_stock():
    """`q = DDIMPipeline.from_pipe(p)` shares p's UNet (and with it the hook). q did not enable
    Time-Shift: it must see the grid times and give stock DDIM images, before and after p runs."""
    unet = tiny_unet()
    ref = _images(_own(DDIMPipeline, copy.deepcopy(unet), DDIMScheduler(clip_sample=False)))
    p = enable_time_shift(_own(DDIMPipeline, unet, DDIMScheduler(clip_sample=False)), window_size=40, cutoff=0)
    q = DDIMPipeline.from_pipe(p)
    q.set_progress_bar_config(disable=True)
    assert q.unet is p.unet and type(q.scheduler) is DDIMScheduler
    shifted = _images(p)
    assert not np.array_equal(shifted, ref)  # p does shift
    spy = Spy(unet)
    assert np.array_equal(_images(q), ref)
    assert all(t.numel() == 1 for t in spy.seen)  # q's UNet calls carry the grid time, untouched
    assert np.array_equal(_images(p), shifted)  # and p is unaffected by q


def test_from_pipe_sharing_our_scheduler_object_fails_loudly_until_enabled():
    """DDPMPipeline keeps the scheduler it is given, so `DDPMPipeline.from_pipe(p)` shares p's
    TimeShiftScheduler object. q did not enable Time-Shift: its UNet gets the grid time and the
    step that would shift raises (no silent DDIM/TS mix); enable_time_shift(q) makes it right."""
    unet = tiny_unet()
    p = enable_time_shift(_own(DDPMPipeline, unet, DDPMScheduler(clip_sample=False)), window_size=30, cutoff=0)
    a = _images(p)
    q = DDPMPipeline.from_pipe(p)
    q.set_progress_bar_config(disable=True)
    assert q.scheduler is p.scheduler
    with pytest.raises(ValueError, match="enable_time_shift"):
        _images(q)
    enable_time_shift(q)  # keeps the TS keys of the scheduler it had (window 30, cutoff 0, eta 1)
    assert q.scheduler is not p.scheduler and q.scheduler.config.window_size == 30
    assert np.array_equal(_images(q), a) and np.array_equal(_images(p), a)


@pytest.mark.parametrize("order", ["p-first", "q-first"])
def test_two_enabled_pipelines_sharing_a_unet_each_use_their_own_scheduler(order):
    """Enabling on a second pipeline must not break the first (it did: 'timestep 580 is not on the
    grid'): each pipeline gives what it gives with a UNet of its own, in any order of calls."""
    unet = tiny_unet()
    p = enable_time_shift(_own(DDIMPipeline, unet, DDIMScheduler(clip_sample=False)), window_size=40, cutoff=0)
    q = enable_time_shift(DDIMPipeline.from_pipe(p), window_size=20, cutoff=100)
    q.set_progress_bar_config(disable=True)
    alone_p = _images(enable_time_shift(_own(DDIMPipeline, copy.deepcopy(unet), DDIMScheduler(clip_sample=False)),
                                        window_size=40, cutoff=0))
    alone_q = _images(enable_time_shift(_own(DDIMPipeline, copy.deepcopy(unet), DDIMScheduler(clip_sample=False)),
                                        window_size=20, cutoff=100))
    assert not np.array_equal(alone_p, alone_q)  # the two settings differ, so a mix-up would show
    calls = [(p, alone_p), (q, alone_q)] if order == "p-first" else [(q, alone_q), (p, alone_p)]
    for pipe, expected in calls * 2:
        assert np.array_equal(_images(pipe), expected)
    assert len([h for h in unet._forward_pre_hooks.values() if type(h).__name__ == "_TimeShiftHook"]) == 1
    disable_time_shift(p)  # q keeps shifting; p is stock again
    ref = _images(_own(DDIMPipeline, copy.deepcopy(unet), DDIMScheduler(clip_sample=False)))
    assert np.array_equal(_images(p), ref) and np.array_equal(_images(q), alone_q)
    disable_time_shift(q)
    assert not unet._forward_pre_hooks  # the last one out removes the hook


# -- issue 25 item 2: save -> load -> enable keeps the saved window / cutoff ----------------------
def test_ddim_pipeline_save_load_enable_gives_identical_images(tmp_path):
    """A saved TS DDIMPipeline loads with a stock DDIMScheduler (DDIMPipeline converts it) that
    keeps window_size/cutoff/... as hidden config; enable_time_shift(loaded) with no arguments
    must use them (not the per-step defaults), so the images are identical."""
    p = enable_time_shift(_ddim_pipe(), window_size=12, cutoff=100)
    a = _images(p)
    p.save_pretrained(tmp_path)
    loaded = DDIMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DDIMScheduler and loaded.scheduler.config.window_size == 12
    enable_time_shift(loaded)
    assert (loaded.scheduler.config.window_size, loaded.scheduler.config.cutoff) == (12, 100)
    assert np.array_equal(_images(loaded), a)
    defaults = _images(enable_time_shift(_ddim_pipe()))
    assert not np.array_equal(defaults, a)  # the per-step defaults give other images: the test has power
    again = enable_time_shift(DDIMPipeline.from_pretrained(tmp_path), window_size=0)  # an explicit value wins
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(_images(again), _images(_ddim_pipe()))


# -- issue 25 item 5: flow-matching schedulers are refused ---------------------------------------
def test_enable_time_shift_refuses_a_flow_matching_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _ddim_pipe()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="flow-matching schedulers are not supported by TimeShiftScheduler"):
        enable_time_shift(pipe)
    assert getattr(pipe, "_ts_state", None) is None and not pipe.unet._forward_pre_hooks

    class SD3Like:  # what StableDiffusion3Pipeline offers: a transformer, no unet, a flow scheduler
        transformer = torch.nn.Identity()
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    with pytest.raises(ValueError, match="flow-matching"):
        enable_time_shift(SD3Like())


# -- Stable Diffusion -------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from sd_fixtures import LATENT, PIXELS, inpaint_inputs, tiny_sd_pipeline  # noqa: E402

SD_KW = dict(prompt=["a cat", "a dog"], negative_prompt=["red", "red"], num_inference_steps=4, guidance_scale=5.0,
             num_images_per_prompt=2, output_type="np")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_enable_save_load_same_images(tmp_path, prediction_type):
    pipe = tiny_sd_pipeline(tmp_path, prediction_type)
    with pytest.warns(UserWarning, match="latent pipeline"):
        enable_time_shift(pipe, window_size=40, cutoff=0)
    spy = Spy(pipe.unet)
    steps_seen = []
    cb = lambda p, i, t, tensors: steps_seen.append(i) or {}  # noqa: E731
    a = pipe(generator=_gen(), callback_on_step_end=cb, **SD_KW).images
    assert a.shape == (4, PIXELS, PIXELS, 3) and np.isfinite(a).all() and steps_seen == [0, 1, 2, 3]
    assert all(t.shape == (8,) and torch.equal(t[:4], t[4:]) for t in spy.seen)  # CFG halves share t_s
    assert any((t != g).any() for t, g in zip(spy.seen, pipe.scheduler.timesteps))
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"][1] == "TimeShiftScheduler"
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None,
                                                     requires_safety_checker=False)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is UNet2DConditionModel and loaded.scheduler.config.window_size == 40
    with pytest.warns(UserWarning):
        enable_time_shift(loaded)  # keeps the saved window / cutoff / variant
    assert np.array_equal(loaded(generator=_gen(), **SD_KW).images, a)
    lat = loaded(generator=_gen(), **{**SD_KW, "output_type": "latent"}).images
    assert tuple(lat.shape) == (4, 4, LATENT, LATENT)


def test_sd_scheduler_swap_after_enable(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    ref = pipe(generator=_gen(), **SD_KW).images
    with pytest.warns(UserWarning):
        enable_time_shift(pipe, window_size=40, cutoff=0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert np.array_equal(pipe(generator=_gen(), **SD_KW).images, ref)
    pipe.scheduler = TimeShiftScheduler.from_config(pipe.scheduler.config, window_size=40, cutoff=0)
    out = pipe(generator=_gen(), **SD_KW).images
    assert np.isfinite(out).all() and not np.array_equal(out, ref)


def test_sd_inpaint_selects_on_the_latent_channels(tmp_path):
    """SD inpaint feeds the UNet 9 channels (latents, mask, masked-image latents): t_s must be
    picked from the 4 latent channels that `step` updates; step raises on any disagreement."""
    pipe = tiny_sd_pipeline(tmp_path, kind="inpaint")
    with pytest.warns(UserWarning):
        enable_time_shift(pipe, window_size=40, cutoff=0)
    spy = Spy(pipe.unet)
    states = [torch.randn(1, 4, LATENT, LATENT, generator=_gen(3))]  # latents before each step
    cb = lambda p, i, t, tensors: states.append(tensors["latents"].clone()) or {}  # noqa: E731
    out = pipe(prompt="a cat", num_inference_steps=4, guidance_scale=3.0, generator=_gen(), output_type="np",
               latents=states[0].clone(), callback_on_step_end=cb, **inpaint_inputs()).images
    assert out.shape == (1, PIXELS, PIXELS, 3) and np.isfinite(out).all()
    sched = pipe.scheduler
    grid = sched.timesteps.tolist()
    ref = reference_variance(sched.alphas_cumprod)
    for k, seen in enumerate(spy.seen):  # Algorithm 3 on the latents the step updates
        expect, _ = time_shift_times(states[k], k, grid, ref, sched.window_size_eff, sched.cutoff_eff)
        assert seen.shape == (2,) and (seen == expect).all(), (k, seen, expect)
    assert any((t != g).any() for t, g in zip(spy.seen, grid))
    # the selection on all 9 channels is a different time: the scheduler would refuse it
    sched.set_timesteps(4)
    t = sched.timesteps[1]
    x = torch.randn(1, 9, LATENT, LATENT, generator=_gen(1))
    lat = x[:, :4]
    x[:, :4] = lat * ((1 - sched.alphas_cumprod[t].double()) / sample_variance(lat)).sqrt().float()  # var = 1 - ab_t
    x[:, 4:] = x[:, 4:] * 3.0 + 1.0  # mask / image channels: other statistics
    full = sched.model_timesteps(x, t)
    assert not torch.equal(full, sched.model_timesteps(x[:, :4], t))
    with pytest.raises(ValueError, match="model_timesteps differs"):
        sched.step(torch.zeros_like(x[:, :4]), t, x[:, :4], model_timesteps=full)


# -- our pipeline ------------------------------------------------------------------------------
def test_time_shift_pipeline_window_zero_equals_ddim_pipeline():
    ref = _ddim_pipe()(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen()).images
    pipe = TimeShiftPipeline(unet=tiny_unet(), scheduler=TimeShiftScheduler(clip_sample=False, window_size=0))
    got = pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=_gen()).images
    assert np.array_equal(ref, got)
    converted = TimeShiftPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=False, steps_offset=1))
    assert isinstance(converted.scheduler, TimeShiftScheduler) and converted.scheduler.config.steps_offset == 1


def test_time_shift_pipeline_class_conditional_contract(tmp_path):
    pipe = TimeShiftPipeline(unet=tiny_unet(num_class_embeds=3),
                             scheduler=TimeShiftScheduler(clip_sample=False, window_size=40, cutoff=200, eta=1.0))
    pipe.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1, 2)]  # noqa: E731
    out = pipe(batch_size=3, num_inference_steps=5, class_labels=[0, 1, 2], output_type="np", generator=gens())
    assert out.images.shape == (3, 8, 8, 3) and np.isfinite(out.images).all()
    tup = pipe(batch_size=3, num_inference_steps=5, class_labels=[0, 1, 2], output_type="np", generator=gens(),
               return_dict=False)
    assert np.array_equal(tup[0], out.images)
    lat = pipe(batch_size=3, num_inference_steps=5, class_labels=[0, 1, 2], output_type="latent", generator=gens()).images
    assert torch.allclose((lat / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), torch.from_numpy(out.images))
    one = pipe(batch_size=1, num_inference_steps=5, class_labels=[1], output_type="np",
               generator=[torch.Generator().manual_seed(1)]).images
    assert np.abs(one[0] - out.images[1]).max() < 1e-4  # batch of one equals its batch element
    pil = pipe(batch_size=1, class_labels=2, num_inference_steps=5, generator=_gen()).images
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
                generator=_gen()).images
    assert seen == [0, 1, 2, 3] and np.allclose(zero, 0.5)  # zeroed latents decode to mid-grey
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="latentz")
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(callback_on_step_end_tensor_inputs=["noise"])
