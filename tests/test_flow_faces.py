"""The diffusers faces on flow-matching pipelines (SD3 / Flux): issue 27 item 5.

- ``FlowTimeShiftScheduler``: a FlowMatchEulerDiscreteScheduler with Time-Shift's per-sample model time;
  stock grid / ``scale_noise`` / ``step`` when nothing shifts.
- ``enable_time_shift`` on StableDiffusion3Pipeline and FluxPipeline: window 0 = the stock pipeline bit
  for bit; a window > 0 changes the output and feeds the transformer the selected model time in the
  pipeline's own units (SD3: t, Flux: t / 1000); per-pipeline semantics as on SD.
- DDPM-family faces assigned into a flow pipeline work (TimeShiftScheduler.from_config -> the flow
  face) or raise a ValueError naming the fix (FKCScheduler; UNet pipelines' from_pipe).
Tiny pipelines from tests/flow_models.py; every run is a few transformer calls on 8x8 latents.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from flow_models import flux_scheduler, sd3_scheduler, tiny_flux_pipeline, tiny_sd3_pipeline

from gensample.pipelines.time_shift import disable_time_shift, enable_time_shift
from gensample.samplers.time_shift import FlowTimeShift
from gensample.schedulers import FKCScheduler, TimeShiftScheduler
from gensample.schedulers.flow_time_shift import FlowTimeShiftScheduler

STEPS = 4
SD3_KW = dict(height=16, width=16, guidance_scale=3.0, negative_prompt="a dog")  # CFG with a negative prompt
FLUX_KW = dict(height=16, width=16, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow_faces")
    return {"sd3": tiny_sd3_pipeline(tmp / "sd3"), "flux": tiny_flux_pipeline(tmp / "flux")}


def _run(pipe, family, **extra):
    kw = dict(SD3_KW if family == "sd3" else FLUX_KW)
    kw.update(extra)
    return pipe("a cat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent",
                **kw).images


def _record_transformer(pipe):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].clone(), k["timestep"].clone())), with_kwargs=True)
    return seen, handle


# -- the scheduler face ------------------------------------------------------------------------
def test_set_timesteps_signature_is_what_retrieve_timesteps_inspects():
    params = inspect.signature(FlowTimeShiftScheduler.set_timesteps).parameters
    assert list(params)[1:] == ["num_inference_steps", "device", "sigmas", "mu", "timesteps"]
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    sigmas = [1.0, 0.75, 0.5, 0.25]
    ours, stock = FlowTimeShiftScheduler.from_config(flux_scheduler().config), flux_scheduler()
    ts_ours, n_ours = retrieve_timesteps(ours, None, "cpu", sigmas=sigmas, mu=0.7)
    ts_stock, n_stock = retrieve_timesteps(stock, None, "cpu", sigmas=sigmas, mu=0.7)
    assert n_ours == n_stock == 4 and torch.equal(ts_ours, ts_stock) and torch.equal(ours.sigmas, stock.sigmas)
    assert ours.timesteps.dtype == torch.float32 and ours.order == 1 and ours.init_noise_sigma == 1.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_window0_step_and_scale_noise_equal_the_stock_scheduler(family):
    """window_size=0: grid, scale_noise, set_begin_index and every step are FlowMatchEulerDiscreteScheduler's."""
    stock = sd3_scheduler() if family == "sd3" else flux_scheduler()
    ours = FlowTimeShiftScheduler.from_config(stock.config, window_size=0)
    kw = {} if family == "sd3" else {"mu": 0.9}
    for s in (stock, ours):
        s.set_timesteps(6, **kw)
        s.set_begin_index(0)
    assert not ours.shifting and torch.equal(ours.timesteps, stock.timesteps)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = stock.timesteps[2:3]
    assert torch.equal(ours.scale_noise(x0, t, noise), stock.scale_noise(x0, t, noise))
    x_o = x_s = noise
    for t in stock.timesteps:
        v = torch.randn(2, 4, 8, 8, generator=g)
        x_o = ours.step(v, t, x_o, return_dict=False)[0]
        x_s = stock.step(v, t, x_s, return_dict=False)[0]
        assert torch.equal(x_o, x_s)


def test_shifted_step_is_flow_time_shift():
    """A shifted step equals FlowTimeShift's update (the ts-ddim sampler on flows) from the selected
    model time; the first step (k = 0) and steps below the cutoff stay the stock Euler step."""
    cfg = dict(sd3_scheduler().config)
    ours = FlowTimeShiftScheduler.from_config(cfg, window_size=41, data_var=0.5)
    ref = FlowTimeShift(cfg, window_size=41, data_var=0.5)
    ours.set_timesteps(STEPS)
    ref.set_timesteps(STEPS)
    assert ours.shifting and torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g) * 1.2
    shifted = 0
    for t in ours.timesteps:
        v = torch.randn(2, 4, 8, 8, generator=g)
        t_model = ours.model_timesteps(x, t)
        expect = ref.step(v, t, x, model_timesteps=ref.model_timesteps(x, t)).prev_sample
        assert torch.equal(t_model, ref.model_timesteps(x, t))
        out = ours.step(v, t, x, return_dict=False)[0]
        if (t_model != t).any():
            shifted += 1
            torch.testing.assert_close(out, expect, rtol=0, atol=0)
        x = out
    assert shifted >= 1  # the case exercises a shift


def test_assigned_by_hand_a_shifting_face_raises_with_the_fix(pipes):
    pipe = pipes["sd3"]
    stock = pipe.scheduler
    try:
        pipe.scheduler = FlowTimeShiftScheduler.from_config(stock.config, window_size=41)
        with pytest.raises(ValueError, match="enable_time_shift"):
            _run(pipe, "sd3")
    finally:
        pipe.scheduler = stock


# -- enable_time_shift on SD3 / Flux -------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_enable_time_shift_window0_is_the_stock_pipeline(pipes, family):
    pipe = pipes[family]
    stock = _run(pipe, family)
    enable_time_shift(pipe, window_size=0)
    try:
        assert isinstance(pipe.scheduler, FlowTimeShiftScheduler)
        assert torch.equal(_run(pipe, family), stock)
    finally:
        disable_time_shift(pipe)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and not pipe.transformer._forward_pre_hooks


@pytest.mark.parametrize("family,divisor", [("sd3", 1.0), ("flux", 1000.0)])
def test_enable_time_shift_feeds_the_selected_time_in_the_pipelines_units(pipes, family, divisor):
    """window 41: the transformer gets FlowTimeShift's model time for the latents it sees, divided
    by 1000 on Flux (as the pipeline divides its grid time); the output changes."""
    pipe = pipes[family]
    stock = _run(pipe, family)
    enable_time_shift(pipe, window_size=41, data_var=0.5)
    seen, handle = _record_transformer(pipe)
    try:
        out = _run(pipe, family)
        grid = pipe.scheduler.timesteps.clone()
    finally:
        handle.remove()
        disable_time_shift(pipe)
    assert not torch.equal(out, stock)
    calls_per_step = len(seen) // STEPS
    assert calls_per_step * STEPS == len(seen)
    ref = FlowTimeShift(dict(pipe.scheduler.config), window_size=41, data_var=0.5)
    mu = None
    if pipe.scheduler.config.use_dynamic_shifting:  # Flux: the pipeline's mu and base sigmas reproduce its grid
        from gensample.core.flow import mu_for_config

        mu = mu_for_config(pipe.scheduler.config, seen[0][0].shape[1])
    base = (lambda n: list(torch.linspace(1.0, 1.0 / n, n).numpy())) if family == "flux" else None
    ref.set_timesteps(STEPS, mu=mu, base_sigmas=base)
    assert torch.equal(ref.timesteps, grid)
    shifted = 0
    for i, (hidden, received) in enumerate(seen):
        k = i // calls_per_step
        expect = ref.model_timesteps(hidden, grid[k]).to(received.dtype)
        expect = expect / divisor if divisor != 1.0 else expect
        assert torch.equal(received, expect), (k, received, expect)
        shifted += int((received != (grid[k] / divisor if divisor != 1.0 else grid[k])).any())
    assert shifted >= 1


def test_from_pipe_copy_stays_stock_and_a_shared_face_raises(pipes):
    from diffusers import StableDiffusion3Pipeline

    pipe = pipes["sd3"]
    stock_sched = pipe.scheduler
    stock = _run(pipe, "sd3")
    enable_time_shift(pipe, window_size=41, data_var=0.5)
    try:
        copy = StableDiffusion3Pipeline.from_pipe(pipe, scheduler=stock_sched)
        copy.set_progress_bar_config(disable=True)
        assert torch.equal(_run(copy, "sd3"), stock)  # same transformer, hook present: the copy stays stock
        shared = StableDiffusion3Pipeline.from_pipe(pipe)  # shares our scheduler object, did not enable
        shared.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match="enable_time_shift"):
            _run(shared, "sd3")
    finally:
        disable_time_shift(pipe)


def test_save_load_keeps_the_face_and_its_window(pipes, tmp_path):
    """save_pretrained of an enabled pipeline writes our scheduler; from_pretrained loads it back (diffusers
    finds its loadable base class in our module) and enable_time_shift(loaded) keeps the saved window."""
    from diffusers import StableDiffusion3Pipeline

    pipe = pipes["sd3"]
    enable_time_shift(pipe, window_size=41, data_var=0.5)
    try:
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        disable_time_shift(pipe)
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, FlowTimeShiftScheduler) and loaded.scheduler.config.window_size == 41
    explicit = _run(enable_time_shift(loaded, window_size=41, data_var=0.5), "sd3")
    disable_time_shift(loaded)
    stock = _run(enable_time_shift(loaded, window_size=0), "sd3")
    disable_time_shift(loaded)
    enable_time_shift(loaded)  # no arguments: the saved window / data_var
    assert torch.equal(_run(loaded, "sd3"), explicit) and not torch.equal(explicit, stock)


# -- DDPM-family faces assigned into a flow pipeline --------------------------------------------
def test_time_shift_scheduler_from_a_flow_config_is_the_flow_face(pipes):
    sched = TimeShiftScheduler.from_config(pipes["sd3"].scheduler.config, window_size=0)
    assert isinstance(sched, FlowTimeShiftScheduler) and sched.config.shift == 3.0 and sched.config.window_size == 0
    with pytest.raises(ValueError, match="FlowTimeShiftScheduler"):  # DPM-Solver's flow mode is not FlowMatch Euler
        TimeShiftScheduler.from_config(DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                                   prediction_type="flow_prediction").config)


def test_the_flow_face_refuses_configs_whose_grid_it_does_not_rebuild(pipes):
    """FlowTimeShiftScheduler.from_config of DPM-Solver's flow mode (flow_shift 3) would drop flow_shift with a log
    line and run shift 1.0: before, enable_time_shift on such a pipeline silently replaced its sigma grid (even at
    window 0). A betas config is refused with the VP face named."""
    from gensample.pipelines.time_shift import enable_time_shift

    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="the flow mode of .* use_flow_sigmas"):
        FlowTimeShiftScheduler.from_config(dpm.config, window_size=0)
    with pytest.raises(ValueError, match="use gensample.schedulers.TimeShiftScheduler"):
        FlowTimeShiftScheduler.from_config(FKCScheduler().config)
    pipe = pipes["sd3"]
    stock = pipe.scheduler
    try:
        pipe.scheduler = dpm
        with pytest.raises(ValueError, match="switch the pipeline to FlowMatchEulerDiscreteScheduler"):
            enable_time_shift(pipe, window_size=0)
        assert pipe.scheduler is dpm and getattr(pipe, "_ts_state", None) is None
    finally:
        pipe.scheduler = stock


@pytest.mark.parametrize("face,fix", [(FKCScheduler, "--sampler fkc"), (TimeShiftScheduler, "enable_time_shift")])
def test_ddpm_family_face_in_a_flow_pipeline_raises_with_the_fix(pipes, face, fix):
    pipe = pipes["flux"]
    stock = pipe.scheduler
    try:
        pipe.scheduler = face()  # a DDPM-betas object assigned by hand
        with pytest.raises(ValueError, match=fix):
            _run(pipe, "flux")
    finally:
        pipe.scheduler = stock
    with pytest.raises(ValueError, match="--sampler fkc"):
        FKCScheduler.from_config(stock.config)


# -- FKC / STSL / smc-post pipelines from a flow pipeline's components ---------------------------
def test_fkc_pipeline_from_sd3_beta1_over_the_sde_proposal_is_the_flow_ddpm_sampler(pipes):
    """FKCPipeline.from_pipe(sd3) runs the sampler core on the pipeline object: anneal beta = 1 with
    eta = 1 (the SDE proposal) has zero log-weight increments, so its particles are the flow ddpm
    sampler's draws from the same seed (float32 round-off only; the loops differ in op order)."""
    from gensample import api
    from gensample.pipelines.fkc import FKCPipeline, FlowFKCPipeline

    pipe = pipes["sd3"]
    fkc = FKCPipeline.from_pipe(pipe)
    assert isinstance(fkc, FlowFKCPipeline)
    out = fkc("a cat", target="anneal", beta=1.0, eta=1.0, num_particles=2, num_inference_steps=3, seed=0,
              output_type="latent")
    ref = api.run("ddpm", model=pipe, prompt="a cat", steps=3, num_samples=2, seed=0, progress=False).samples["x"]
    torch.testing.assert_close(out.images, torch.as_tensor(ref), rtol=0, atol=1e-5)
    assert out.weights.shape == (2,) and abs(out.weights.sum() - 1) < 1e-9


@pytest.mark.parametrize("target,kw", [("cfg", dict(negative_prompt="a dog", guidance_scale=3.0)),
                                       ("product", dict(experts=["a cat", "a dog"]))])
def test_fkc_pipeline_from_sd3_cfg_and_product(pipes, target, kw):
    from gensample.pipelines.fkc import FKCPipeline

    fkc = FKCPipeline.from_pipe(pipes["sd3"])
    out = fkc("a cat" if target == "cfg" else None, target=target, num_particles=2, num_inference_steps=2, seed=1,
              output_type="pt", **kw)
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
    assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    assert out.ess.shape == (1, 2) and abs(out.weights.sum() - 1) < 1e-9
    with pytest.raises(ValueError, match="experts"):
        fkc("a cat", target="product", experts=["a cat"], num_particles=2, num_inference_steps=2)


def test_cutoff_zero_lets_the_last_step_pick_model_time_zero_without_nan():
    """With cutoff 0 a candidate model time may be 0 (a clean time): the step from it has sigma 0,
    never 0/0 (core.ddim.ddim_sigma); every output stays finite."""
    cfg = dict(sd3_scheduler().config)
    ours = FlowTimeShiftScheduler.from_config(cfg, window_size=41, cutoff=0, data_var=0.5)
    ours.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.timesteps:
        v = torch.randn(2, 4, 8, 8, generator=g) * 0.1
        ours.model_timesteps(x, t)  # the model time the transformer would see
        x = ours.step(v, t, x, return_dict=False)[0]
        assert torch.isfinite(x).all()
