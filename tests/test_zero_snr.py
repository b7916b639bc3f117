"""Zero-terminal-SNR schedules (``rescale_betas_zero_snr=True``, v-prediction: SD 2.x / SDXL fine-tunes).

alpha_bar_T = 0 at the first grid time of a trailing grid, as at a flow's sigma = 1: eps carries no information
on x0 there, so every step from it takes x0 from the model's own output (v: x0 = -v, eps = x). Before, ddpm,
dpm, euler, ts-ddim, ts-ddpm and the inverse samplers stopped with NaN at step 0 (alpha_bar_at gave
log(0) * 0 = NaN, and eps steps divided by sqrt(alpha_bar_T) = 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import gensample  # noqa: E402
from gensample.core.denoiser import Denoiser  # noqa: E402
from gensample.core.schedule import alpha_bar_at, alphas_cumprod_from_config  # noqa: E402
from gensample.samplers.registry import sample_seed  # noqa: E402

from sd_models import LATENT, PIXELS, build_sd_pipeline  # noqa: E402

SD2_ZSNR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                timestep_spacing="trailing", prediction_type="v_prediction")


def _save(folder: Path, prediction_type: str) -> Path:
    from diffusers import DDIMScheduler

    pipe = build_sd_pipeline(folder.parent, 2)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                               timestep_spacing="trailing", prediction_type=prediction_type)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zsnr_dir(tmp_path_factory):
    """A tiny random SD 2.x pipeline (v-prediction) whose scheduler is a zero-terminal-SNR fine-tune's."""
    return _save(tmp_path_factory.mktemp("zsnr") / "sd2-zsnr", "v_prediction")


def test_alpha_bar_at_is_exactly_zero_at_the_terminal_time():
    """alpha_bar_at(T - 1) = 0 (before: NaN from log(0) * 0); every other time as before (the table itself)."""
    ab = alphas_cumprod_from_config(SD2_ZSNR)
    assert float(ab[-1]) == 0.0
    t = torch.tensor([0.0, 500.0, 998.0, 999.0])
    got = alpha_bar_at(ab, t)
    assert float(got[-1]) == 0.0 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ab[[0, 500, 998, 999]], rtol=1e-13, atol=0)  # exp(log ab), as always
    mid = alpha_bar_at(ab, torch.tensor([998.5]))  # exp(0.5 log ab_998 + 0.5 log 0) = 0, not NaN
    assert float(mid) == 0.0


def test_v_denoiser_is_finite_at_alpha_bar_zero():
    """A v-prediction Denoiser at t = T - 1 (alpha_bar = 0): eps = x and x0 = -v, both finite (before: NaN)."""
    ab = alphas_cumprod_from_config(SD2_ZSNR).float()
    v = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    den = Denoiser(lambda x, t, c: v, ab, "v_prediction")
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(999)
    torch.testing.assert_close(den(x, t), x)
    eps, x0 = den.eps_x0(x, t)
    torch.testing.assert_close(eps, x)
    torch.testing.assert_close(x0, -v)
    eps_g, x0_g = den.guided_eps_x0(x, t, None, 1.0)
    assert torch.equal(x0_g, x0) and torch.equal(eps_g, eps)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm", "euler"])
def test_stock_schedulers_equal_the_stock_pipeline_on_zero_snr(zsnr_dir, sampler):
    """ddpm / dpm / euler on the zero-SNR model == StableDiffusionPipeline with the same stock scheduler class
    (its own alpha_bar_T: 0 for DDPM, the 2**-24 floor of Euler / DPM), text CFG w = 5 with a negative prompt,
    the same per-sample x_T and DDPM noise streams; float32 paths, tolerance as the SD identity tests."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    prompts, neg, w, steps = ["a cat", "a dog"], "red", 5.0, 4
    res = gensample.run(sampler, str(zsnr_dir), prompt=prompts, negative_prompt=neg, guidance_scale=w, steps=steps,
                        num_samples=2, progress=False, device="cpu")
    x = res.samples["x"]
    assert np.isfinite(x).all()
    pipe = StableDiffusionPipeline.from_pretrained(zsnr_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cls = {"ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}[sampler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(2)]
    x_T = torch.stack([torch.randn((4, LATENT, LATENT), generator=g) for g in gens])  # the pipeline scales it
    out = pipe(prompt=prompts, negative_prompt=[neg] * 2, latents=x_T, num_inference_steps=steps, guidance_scale=w,
               generator=gens, output_type="latent").images
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(x, out.numpy(), atol=2e-4, rtol=1e-4)


def _png(folder: Path) -> Path:
    from PIL import Image

    f = folder / "truth.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)).save(f)
    return f


@pytest.mark.parametrize("sampler, kw", [
    ("ddpm", {}), ("ddim", {}), ("dpm", {}), ("euler", {}), ("ts-ddim", {}), ("ts-ddpm", {}),
    ("fkc", {"particles": 2}), ("dps", {"image": True}), ("psld", {"image": True}),
    ("stsl", {"image": True, "inner_steps": 2}), ("smc-post", {"image": True, "particles": 2}),
])
def test_every_sampler_runs_on_a_zero_snr_model(zsnr_dir, tmp_path, sampler, kw):
    """Every image sampler (the ones that stopped with NaN at step 0 included) gives finite samples on the
    zero-terminal-SNR v model, 3 trailing steps from alpha_bar = 0."""
    kw = dict(kw)
    if kw.pop("image", False):
        kw["from_image"] = str(_png(tmp_path))
    w = {} if sampler == "smc-post" else {"guidance_scale": 2.0}
    res = gensample.run(sampler, str(zsnr_dir), prompt="a cat", steps=3, num_samples=2, progress=False, **w, **kw)
    assert np.isfinite(res.samples["x"]).all()


def test_ts_ddim_window_zero_is_ddim_on_zero_snr(zsnr_dir):
    """ts-ddim --window 0 == ddim (DDIMScheduler fed v, the path that always ran): the first step from
    alpha_bar = 0 reads x0 = -v, eps = x off the guided output, as DDIM's v branch does; later steps convert v
    to eps (float32 round-off only)."""
    common = dict(prompt="a cat", negative_prompt="red", guidance_scale=3.0, steps=4, num_samples=2, progress=False)
    ddim = gensample.run("ddim", str(zsnr_dir), **common).samples["x"]
    ts0 = gensample.run("ts-ddim", str(zsnr_dir), window=0, **common).samples["x"]
    np.testing.assert_allclose(ts0, ddim, atol=1e-4, rtol=1e-4)


def test_enable_time_shift_window_zero_is_the_stock_pipeline_on_zero_snr(zsnr_dir):
    """The diffusers face on a zero-terminal-SNR v pipeline: ``TimeShiftScheduler.step`` forms x0 and eps
    from v directly (x0 = -v, eps = x at alpha_bar = 0, DDIMScheduler's float32 formulas), so window 0 is the
    stock DDIM pipeline bit for bit (before: FloatingPointError at the first step, x0 of eps being 0/0)."""
    import warnings

    from diffusers import StableDiffusionPipeline

    from gensample.pipelines.time_shift import disable_time_shift, enable_time_shift

    pipe = StableDiffusionPipeline.from_pretrained(zsnr_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", negative_prompt="red", num_inference_steps=4, guidance_scale=5.0, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the latent-pipeline statistic warning
        enable_time_shift(pipe, window_size=0)
    assert np.array_equal(pipe(generator=torch.Generator().manual_seed(0), **kw).images, ref)
    disable_time_shift(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enable_time_shift(pipe, window_size=40, cutoff=0)
    assert np.isfinite(pipe(generator=torch.Generator().manual_seed(0), **kw).images).all()


def test_ddim_eta_one_from_alpha_bar_zero_is_finite():
    """ddim --eta 1 on a zero-SNR v model: DDIMScheduler's float32 sigma^2 at alpha_bar_t = 0 rounds above
    1 - alpha_bar_prev and its sqrt(1 - alpha_bar_prev - sigma^2) is NaN (before: stopped at step 1); the step
    from alpha_bar = 0 is taken in float64 with the clamp, and equals FKC at beta = 1 over the ddim proposal."""
    kw = dict(model="digits-flawed-zsnr", num_samples=4, steps=10, progress=False)
    ddim = gensample.run(sampler="ddim", eta=1.0, **kw)
    assert np.isfinite(ddim.x).all()
    fkc = gensample.run(sampler="fkc", beta=1.0, particles=4, proposal="ddim", eta=1.0, **kw)
    np.testing.assert_allclose(fkc.x, ddim.x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("proposal, twin", [("ddpm", dict(sampler="ddpm")),
                                            ("ts", dict(sampler="ts-ddim", eta=1.0, window=10))])
def test_fkc_proposals_start_from_alpha_bar_zero(proposal, twin):
    """FKC over a scheduler proposal on a zero-SNR schedule (before: refused): the first step is FKC's direct
    draw at the proposal's eta, the rest the proposal's; at beta = 1 that is the proposal's own sampler."""
    kw = dict(model="digits-flawed-zsnr", num_samples=4, steps=10, progress=False)
    extra = dict(proposal="ddpm") if proposal == "ddpm" else dict(time_shift=True, eta=1.0, window=10)
    a = gensample.run(sampler="fkc", beta=1.0, particles=4, **extra, **kw)
    b = gensample.run(**twin, **kw)
    np.testing.assert_allclose(a.x, b.x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "euler", "ts-ddim"])
def test_epsilon_model_on_a_zero_snr_grid_is_refused(tmp_path, sampler):
    """An eps-prediction model whose grid starts at alpha_bar = 0: refused with the reason (eps is singular)."""
    folder = _save(tmp_path / "eps-zsnr", "epsilon")
    with pytest.raises(ValueError, match="zero.terminal.SNR.*(v or x0|predict v)"):
        gensample.run(sampler, str(folder), prompt="a cat", steps=3, num_samples=1, progress=False)


# -- SDXL: the zero-terminal-SNR v fine-tune (tests/sdxl_models.py "v_zero_snr") ---------------------------
@pytest.fixture(scope="module")
def xl_zsnr_dir(tmp_path_factory):
    from sdxl_models import save_sdxl_pipeline

    return save_sdxl_pipeline(tmp_path_factory.mktemp("xlz") / "v_zero_snr", "v_zero_snr")


@pytest.mark.parametrize("sampler", ["ddpm", "dpm", "euler"])
def test_sdxl_zero_snr_stock_schedulers_equal_the_stock_pipeline(xl_zsnr_dir, sampler):
    """ddpm / dpm / euler on the tiny SDXL zero-SNR v fine-tune == StableDiffusionXLPipeline with the same
    scheduler class, x_T and per-sample generators (guidance 5, negative prompt); the tolerance of the SDXL
    identity tests (fp32: latents 1e-5)."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sdxl_models import LATENT as XL_LATENT

    res = gensample.run(sampler, str(xl_zsnr_dir), prompt="a cat", negative_prompt="red", guidance_scale=5.0, steps=4,
                        num_samples=2, progress=False, device="cpu")
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_zsnr_dir)
    pipe.set_progress_bar_config(disable=True)
    cls = {"ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}[sampler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(2)]
    x_T = torch.stack([torch.randn((4, XL_LATENT, XL_LATENT), generator=g) for g in gens])
    out = pipe(prompt="a cat", negative_prompt="red", num_images_per_prompt=2, latents=x_T, generator=gens,
               num_inference_steps=4, guidance_scale=5.0, output_type="latent").images
    assert np.isfinite(res.samples["x"]).all()
    np.testing.assert_allclose(res.samples["x"], out.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ts-ddim", "ts-ddpm"])
def test_sdxl_zero_snr_time_shift_runs(xl_zsnr_dir, sampler):
    res = gensample.run(sampler, str(xl_zsnr_dir), prompt="a cat", negative_prompt="red", guidance_scale=5.0, steps=3,
                        num_samples=2, progress=False, device="cpu")
    assert np.isfinite(res.samples["x"]).all()
