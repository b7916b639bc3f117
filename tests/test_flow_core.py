"""Flow-matching core (docs/flow_matching.md): the sigma grid against diffusers'
FlowMatchEulerDiscreteScheduler, the conversion to the VP twin, the exact mixture velocity, and the
methods on a flow model: euler bit for bit, ddim == flow Euler, ddpm's law, the refusals."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import gensample
from gensample.core.denoiser import Denoiser
from gensample.core.flow import (calculate_shift, eps_x0_from_velocity, flow_sigmas, flow_to_twin, sigma_of_alpha_bar,
                                 twin_alpha_bar, twin_to_flow)
from gensample.core.schedule import FlowSchedule, VPSchedule, schedule_for
from gensample.models.gmm import GaussianMixture, as_flow_model, flow_scheduler_config
from gensample.samplers.baseline import make_scheduler, scheduler_loop, set_grid
from gensample.samplers.registry import RunContext
from gensample.zoo.analytic import gmm2d

# -- 1. the grid ------------------------------------------------------------------------------
GRID_CASES = {
    "static_shift_1": ({}, 7, None, None),
    "static_shift_3 (SD3)": ({"shift": 3.0}, 28, None, None),
    "dynamic_exponential (Flux)": ({"use_dynamic_shifting": True}, 9, calculate_shift(1024), None),
    "dynamic_linear": ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 9, 1.3, None),
    "flux_pipeline_sigmas": ({"use_dynamic_shifting": True, "shift": 3.0}, 6, calculate_shift(4096),
                             list(np.linspace(1.0, 1 / 6, 6))),
    "custom_sigmas_static": ({"shift": 2.0}, 5, None, [1.0, 0.7, 0.5, 0.2, 0.05]),
    "shift_terminal (LTX)": ({"use_dynamic_shifting": True, "shift_terminal": 0.1}, 8, 2.05, None),
    "karras": ({"shift": 3.0, "use_karras_sigmas": True}, 10, None, None),
    "exponential": ({"shift": 3.0, "use_exponential_sigmas": True}, 10, None, None),
    "beta": ({"shift": 3.0, "use_beta_sigmas": True}, 10, None, None),
    "invert_sigmas (Mochi)": ({"invert_sigmas": True, "shift": 1.5}, 6, None, None),
    "one_step": ({"shift": 3.0}, 1, None, None),
    "train_steps_100": ({"num_train_timesteps": 100, "shift": 5.0}, 13, None, None),
}


@pytest.mark.parametrize("name", list(GRID_CASES))
def test_flow_sigmas_equal_flow_match_euler_set_timesteps(name):
    """Bit-equal sigmas (with the terminal value) and float timesteps, for every grid option."""
    overrides, steps, mu, sigmas = GRID_CASES[name]
    cfg = {**flow_scheduler_config(), **overrides}
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
    sig, ts = flow_sigmas(cfg, None if sigmas is not None else steps, mu, sigmas)
    assert sig.dtype == ref.sigmas.dtype and ts.dtype == ref.timesteps.dtype
    assert torch.equal(sig, ref.sigmas), (sig - ref.sigmas).abs().max()
    assert torch.equal(ts, ref.timesteps)


def test_flow_sigmas_argument_errors():
    cfg = flow_scheduler_config()
    with pytest.raises(ValueError, match="mu is required"):
        flow_sigmas({**cfg, "use_dynamic_shifting": True}, 4)
    with pytest.raises(ValueError, match="only one of"):
        flow_sigmas({**cfg, "use_karras_sigmas": True, "use_beta_sigmas": True}, 4)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        flow_sigmas(cfg, 0)
    with pytest.raises(ValueError, match="flow_shift must be a finite number > 0"):
        flow_scheduler_config(0.0)


def test_schedule_for_picks_the_implementation_and_vp_is_the_old_table():
    from gensample.core.ddim import alpha_bar_pairs, timestep_grid
    from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG

    vp = schedule_for(DEFAULT_SCHEDULER_CONFIG, "epsilon")
    assert isinstance(vp, VPSchedule)
    ts = timestep_grid(1000, 20)
    assert torch.equal(vp.grid(20), ts)
    for a, b in zip(vp.alpha_bar_pairs(ts), alpha_bar_pairs(vp.alphas_cumprod, ts)):
        assert torch.equal(a, b)  # bit-equal: the VP samplers' old tables
    flow = schedule_for(flow_scheduler_config(3.0), "flow")
    assert isinstance(flow, FlowSchedule)
    t = flow.grid(10)
    ab_t, ab_s = flow.alpha_bar_pairs(t)
    assert ab_t[0] == 0.0 and ab_s[-1] == 1.0  # a flow starts at sigma = 1 (pure noise), ends at the data
    # the model time of a noise level inverts alpha_bar (Time-Shift's search)
    torch.testing.assert_close(flow.time_of_alpha_bar(ab_t[1:]), t[1:].double(), rtol=1e-6, atol=0)


# -- 2. the conversion ------------------------------------------------------------------------
def test_twin_is_the_vp_form_of_the_same_pair():
    """x_VP = x_flow / c = sqrt(ab) x0 + sqrt(1 - ab) eps with the twin alpha_bar, and
    (eps, x0) from v = eps - x0 recover the pair exactly, for sigma in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.01, 0.3, 0.5, 0.97, 1.0], dtype=torch.float64)
    s = sigma[:, None]
    x = (1 - s) * x0 + s * eps
    ab = twin_alpha_bar(s)
    torch.testing.assert_close(flow_to_twin(x, sigma), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(twin_to_flow(flow_to_twin(x, sigma), sigma), x, rtol=0, atol=1e-14)
    e_hat, x0_hat = eps_x0_from_velocity(eps - x0, x, sigma)
    torch.testing.assert_close(e_hat, eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(sigma_of_alpha_bar(twin_alpha_bar(sigma)), sigma, rtol=0, atol=1e-15)


MIX = GaussianMixture([0.3, 0.5, 0.2], [[-3.0, 0.0], [2.0, 1.0], [0.0, -2.5]], [0.5, 1.2, 0.3])


@pytest.mark.parametrize("sigma", [0.02, 0.3, 0.5, 0.8, 0.99])
def test_mixture_velocity_equals_vp_oracle_on_the_twin(sigma):
    """E[eps - x0 | x_sigma] from the flow posterior equals eps - x0 of the (independent) VP oracle on
    the twin: eps = -sqrt(1 - ab) score at x / c, x0 by Tweedie."""
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    ab = twin_alpha_bar(sigma)
    x_vp = flow_to_twin(x, sigma)
    eps = MIX.eps(x_vp, ab)
    x0 = (x_vp - (1 - ab) ** 0.5 * eps) / ab**0.5
    torch.testing.assert_close(MIX.velocity(x, sigma), eps - x0, rtol=0, atol=1e-10)


def test_mixture_velocity_at_the_ends():
    """sigma = 1: x = eps, so v = x - E[x0]; sigma = 0: x = x0 and eps is independent, v = -x."""
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(MIX.velocity(x, 1.0), x - MIX.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(MIX.velocity(x, 0.0), -x, rtol=0, atol=1e-12)


def test_flow_denoiser_gives_the_twin_eps():
    """Denoiser(prediction_type 'flow') at the twin state: the VP oracle's eps at alpha_bar(sigma)."""
    model = as_flow_model(gmm2d(), 3.0)
    den = model.denoiser()
    mix = model.extras["mixture"]
    sched = FlowSchedule(model.scheduler_config)
    t = sched.grid(10)[3]
    ab = float(sched.alpha_bar(t))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(den(x, t).double(), mix.eps(x.double(), ab), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="flow schedule"):
        Denoiser(model.unet, prediction_type="flow", schedule=VPSchedule(torch.ones(10)))



def _cfg_flow_denoiser():
    """A conditional flow Denoiser with a null condition (v = s x, plain callable)."""
    return Denoiser(lambda x, t, c: x * c["s"], prediction_type="flow", null_cond={"s": torch.zeros(1, 1)},
                    schedule=FlowSchedule({"num_train_timesteps": 1000}))


def test_a_flow_denoiser_looks_sigma_up_once_per_call():
    """eps, (eps, x0), guided eps and guided (eps, x0) each form sigma(t) (and x_sigma) once per call."""
    den = _cfg_flow_denoiser()
    seen, sigma = [], den.sigma
    den.sigma = lambda t: seen.append(t) or sigma(t)
    x, t, cond = torch.randn(3, 2), torch.tensor([900.0, 500.0, 100.0]), {"s": torch.ones(3, 1)}
    for call in (lambda: den(x, t, cond), lambda: den.eps_x0(x, t, cond),
                 lambda: den.guided(x, t, cond, 3.0), lambda: den.guided(x, t, cond, 3.0, guidance_rescale=0.5),
                 lambda: den.guided_eps_x0(x, t, cond, 3.0), lambda: den.guided_eps_x0(x, t, cond, 3.0, guidance_rescale=0.5)):
        seen.clear()
        call()
        assert len(seen) == 1


def test_guided_eps_x0_refuses_a_guidance_rescale_outside_0_1_as_guided_does():
    den = _cfg_flow_denoiser()
    x, t, cond = torch.randn(3, 2), torch.tensor(500.0), {"s": torch.ones(3, 1)}
    for method in (den.guided, den.guided_eps_x0):
        with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\], got -0.5"):
            method(x, t, cond, 3.0, guidance_rescale=-0.5)

# -- 3. methods on flows ----------------------------------------------------------------------
def _stock_euler(model, x_T, steps):
    """The SD3 / Flux pipelines' loop: the model's own FlowMatchEulerDiscreteScheduler fed the velocity."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    sched.set_timesteps(steps)
    x = x_T.clone()
    for t in sched.timesteps:
        v = model.unet(x, t.expand(x.shape[0])).sample
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


def _ours(name, model, x_T, steps, gens=None):
    sched = make_scheduler(name, model.scheduler_config)
    set_grid(sched, steps, "cpu", model)
    return scheduler_loop(model.denoiser(), sched, x_T.clone(), None, 1.0, gens, RunContext(name))


def test_euler_is_the_stock_flow_match_loop_bit_for_bit():
    model = as_flow_model(gmm2d(), 3.0)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(_ours("euler", model, x_T, 12), _stock_euler(model, x_T, 12))


def test_ddim_on_the_twin_is_the_flow_euler_step():
    """DDIM(eta = 0) on the VP twin, mapped back, is x + (sigma_s - sigma_t) v: float64 states agree
    with a float64 Euler loop to 1e-6 (measured ~1e-14); float32 states agree with the stock float32
    scheduler to 1e-6 relative to the sample scale (float32 rounding over the steps)."""
    model = as_flow_model(gmm2d(), 3.0)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    steps = 12
    sig, ts = FlowSchedule(model.scheduler_config).sigmas(steps)
    x = x_T.double()
    for k, t in enumerate(ts):
        v = model.unet(x.float(), t.expand(x.shape[0])).sample.double()
        x = x + (float(sig[k + 1]) - float(sig[k])) * v
    ddim64 = _ours("ddim", model, x_T.double(), steps)
    assert (ddim64 - x).abs().max() <= 1e-6
    ddim32, stock = _ours("ddim", model, x_T, steps), _stock_euler(model, x_T, steps)
    assert (ddim32 - stock).abs().max() <= 1e-6 * max(1.0, float(stock.abs().max()))


def test_ddpm_on_the_twin_samples_the_mixture():
    """DDIM(eta = 1) on the twin (the SDE proposal) draws the data law: the component masses of
    n = 2000 draws of a well-separated mixture (modes 10 stds apart, so assignment is exact) are
    within 5 binomial standard errors (z = 5 over 3 components: false failure < 1e-5), 50 steps."""
    from gensample.models.loading import gmm_model

    mix = GaussianMixture([0.3, 0.5, 0.2], [[-5.0, 0.0], [5.0, 0.0], [0.0, 6.0]], [0.5, 0.5, 0.5])
    model = as_flow_model(gmm_model("sep3", mix), 3.0)
    n = 2000
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(n)]
    x_T = torch.cat([torch.randn(1, 2, generator=g) for g in gens])
    x = _ours("ddpm", model, x_T, 50, gens)
    counts = torch.bincount(mix.assign(x.double()), minlength=3).double() / n
    p = mix.weights
    z = ((counts - p).abs() / (p * (1 - p) / n).sqrt()).max()
    assert z <= 5.0, (counts, p)
    # and each mode's spread: per-coordinate variance 0.25 within 5 standard errors (sd of a sample
    # variance of m normal draws: 0.25 sqrt(2 / m))
    for k in range(3):
        xs = x[mix.assign(x.double()) == k].double()
        assert (xs.var(0) - 0.25).abs().max() <= 5 * 0.25 * (2 / xs.shape[0]) ** 0.5, (k, xs.var(0))


def _run(tmp_path, sampler, **kw):
    return gensample.run(sampler=sampler, model="gmm2d", output=str(tmp_path / sampler), progress=False, **kw)


def test_flow_options_through_the_api(tmp_path):
    """--flow --flow-shift S through the run engine: recorded, and ddim (twin) = euler from the same seeds."""
    res = _run(tmp_path, "euler", flow=True, flow_shift=3.0, steps=6, num_samples=8, seed=3)
    assert res.x.shape == (8, 2) and np.isfinite(res.x).all()
    assert res.record["config"]["flow"] is True and res.record["config"]["flow_shift"] == 3.0
    res_ddim = _run(tmp_path, "ddim", flow=True, flow_shift=3.0, steps=6, num_samples=8, seed=3)
    np.testing.assert_allclose(res_ddim.x, res.x, atol=1e-5)  # same seeds: DDIM on the twin = Euler


@pytest.mark.parametrize("kw, match", [
    ({"sampler": "dpm", "flow": True}, "option --flow: sampler 'dpm' does not run on flow-matching models.*euler"),
    ({"sampler": "ddim", "flow_shift": 3.0}, "--flow-shift applies with --flow only"),
    ({"sampler": "ddim", "flow": True, "eps_scale": 1.1}, "Epsilon Scaling"),
    ({"sampler": "ddim", "flow": True, "rescale_zero_snr": True}, "sigma = 1"),
    ({"sampler": "oms", "flow": True}, "option --flow: sampler 'oms' does not run on flow-matching models"),
    ({"sampler": "ddim", "flow": True, "oms_module": "x"}, "--oms-module does not apply.*sigma = 1"),
])
def test_flow_refusals_name_the_reason(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        gensample.run(model="gmm2d", steps=4, num_samples=2, output=str(tmp_path / "r"), progress=False, **kw)


@pytest.mark.parametrize("sampler, match", [("oms", "no terminal-SNR gap|sigma = 1"), ("dpm", "use euler"),
                                            ("disa", "not been ported")])
def test_a_flow_model_is_refused_by_samplers_that_do_not_run_on_flows(sampler, match):
    """A flow LoadedModel (a loaded SD3 / Flux folder, or --flow) meets the spec's declared need
    before any sampling: the reason is named (OMS: a flow starts at sigma = 1)."""
    from gensample import api
    from gensample.samplers import registry

    spec = registry.get(sampler)
    with pytest.raises(ValueError, match=f"sampler '{sampler}' does not run on the flow-matching model.*({match})"):
        api._flow_form({}, as_flow_model(gmm2d(), 3.0), spec)
    assert registry.flow_refusal(registry.get("euler")) is None


def test_oms_spec_carries_its_flow_refusal():
    """The OMS refusal on flows is declared on its own spec (runs/oms.py), with the reason."""
    from gensample.samplers import registry

    spec = registry.get("oms")
    assert not spec.flow and spec.flow_refusal is not None and "sigma = 1" in spec.flow_refusal


def test_stsl_runs_on_the_flow_form(tmp_path):
    """stsl on a flow model (before: refused, its terms divide by alpha_bar = 0 at sigma = 1): the first step
    skips the inner steps and takes x0 from the velocity; every later step is STSL's: finite samples."""
    from gensample.samplers import registry

    assert registry.flow_refusal(registry.get("stsl")) is None
    res = gensample.run(sampler="stsl", model="gmm2d", flow=True, flow_shift=3.0, steps=5, inner_steps=2,
                        num_samples=4, output=str(tmp_path / "stsl"), progress=False)
    assert res.x.shape == (4, 2) and np.isfinite(res.x).all()


def test_ts_ddim_on_a_flow_window_zero_is_ddim(tmp_path):
    """ts-ddim on the flow form: --window 0 is the twin DDIM (= euler) bit for bit from the same seeds;
    reference_pnm is refused."""
    kw = dict(flow=True, flow_shift=3.0, steps=8, num_samples=16, seed=5)
    ddim = _run(tmp_path, "ddim", **kw)
    ts0 = gensample.run(sampler="ts-ddim", model="gmm2d", window=0, output=str(tmp_path / "ts0"), progress=False, **kw)
    np.testing.assert_array_equal(ts0.x, ddim.x)
    with pytest.raises(ValueError, match="only 'paper'"):
        gensample.run(sampler="ts-ddim", model="gmm2d", variant="reference_pnm", output=str(tmp_path / "tsr"),
                      progress=False, **kw)


def test_flow_data_var_pilot_estimates_the_data_variance():
    """--data-var auto on a flow: the pilot's E[var_hat(x0)] from 64 twin-DDIM samples of a one-component
    mixture N(0, 0.3^2 I) in 2-D (var_hat of two iid entries has mean 0.09 and sd 0.09 sqrt(2)), within 5
    standard errors of the mean of 64 draws."""
    from gensample.models.loading import gmm_model
    from gensample.runs.time_shift import flow_data_var

    model = as_flow_model(gmm_model("one", GaussianMixture([1.0], [[0.0, 0.0]], [0.3])), 3.0)
    est = flow_data_var(model, "cpu")
    assert abs(est - 0.09) <= 5 * 0.09 * 2**0.5 / 64**0.5, est


def test_dps_on_a_flow_through_the_api(tmp_path):
    """dps --flow: the run engine builds the twin DDIM on the flow grid and records the measurement
    (--time-shift inside it: tests/test_flow_compose.py)."""
    res = _run(tmp_path, "dps", flow=True, flow_shift=3.0, steps=10, num_samples=4, task="inpaint-random", noise_std=0.3)
    assert res.x.shape == (4, 2) and np.isfinite(res.x).all() and "y" in res.samples


# -- guidance-distilled Flux: --guidance-scale is the embedded guidance, never CFG on top --------------------
def test_embedded_guidance_rule_sets_the_cfg_weight_to_one_and_refuses_cfg_targets():
    """The one sampler-side rule (registry.guidance_opts): on a model with extras['embedded_guidance'] the
    samplers' CFG weight is 1 and a CFG target is refused with the reason; other models are unchanged."""
    from types import SimpleNamespace

    from gensample.samplers.registry import guidance_opts

    dev = SimpleNamespace(name="flux-dev", extras={"embedded_guidance": True})
    plain = SimpleNamespace(name="sd3", extras={"embedded_guidance": False})
    opts = {"guidance_scale": 3.5, "steps": 4}
    assert guidance_opts(dev, opts) == {"guidance_scale": 1.0, "steps": 4} and opts["guidance_scale"] == 3.5
    assert guidance_opts(plain, opts) is opts
    with pytest.raises(ValueError, match="--fkc-target cfg .* true unconditional branch.*guidance-distilled"):
        guidance_opts(dev, {"guidance_scale": 3.5, "fkc_target": "cfg"})


def test_fkc_cfg_is_refused_on_a_guidance_distilled_flux_and_anneal_runs(tmp_path):
    """FKC on a tiny guidance-distilled Flux: --guidance-scale alone implies --fkc-target cfg, refused with the
    reason (no true unconditional branch); --fkc-target anneal with --guidance-scale runs, the scale going to
    the network as its embedded guidance (the run differs from the one at guidance 1)."""
    pytest.importorskip("transformers")
    from flow_models import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(tmp_path, guidance=True)
    common = dict(prompt="a red cat", steps=2, num_samples=2, particles=2, progress=False, seed=0)
    with pytest.raises(ValueError, match="needs a true unconditional branch"):
        gensample.run("fkc", pipe, guidance_scale=3.5, **common)
    a = gensample.run("fkc", pipe, fkc_target="anneal", guidance_scale=3.5, **common).samples["x"]
    b = gensample.run("fkc", pipe, fkc_target="anneal", guidance_scale=1.0, **common).samples["x"]
    assert np.isfinite(a).all() and not np.allclose(a, b)


def test_vp_schedule_reads_a_negative_time_as_past_the_end():
    """VPSchedule.alpha_bar(-1) is 1 (past the clean end) for an integer time as for a float one (before: an
    integer -1 indexed the table from its end, alpha_bar_T); integer grid times stay exact table entries."""
    from gensample.core.schedule import VPSchedule, alphas_cumprod_from_config
    from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG

    table = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG).double()
    s = VPSchedule(table)
    assert float(s.alpha_bar(torch.tensor(-1))) == 1.0 == float(s.alpha_bar(torch.tensor(-1.0)))
    assert torch.equal(s.alpha_bar(torch.tensor([0, 500, 999])), table[[0, 500, 999]])
