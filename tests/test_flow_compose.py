"""The compositions on flow-matching models (docs/flow_matching.md "Compositions on flows"): FKC over
``--proposal ddim|ddpm`` and ``--time-shift``, ``--time-shift`` as the step rule of dps / psld / stsl,
and smc-post with an FKC target, on the exact flow form of the analytic mixtures (``--flow``).

Every loop runs on the VP twin from sigma = 1 (alpha_bar = 0). The identities say that each composed
sampler is its parts: FKC with one expert at beta = 1 over a proposal is that proposal's sampler, the
unguided inverse loop with the Time-Shift step rule is ``ts-ddim``, and a window-0 rule is the plain
loop; the mass check says that smc-post's tempered posterior on the flow is the exact law."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gensample
from gensample.cli import main

KW = dict(model="gmm-digits", flow=True, flow_shift=3.0, num_samples=8, steps=20, progress=False)


def _run(**kw):
    return gensample.run(**{**KW, **kw})


def _gap(a, b) -> float:
    return float(np.abs(a.x - b.x).max())


# -- FKC over the twin proposals ----------------------------------------------------------------
@pytest.mark.parametrize("target", [dict(beta=2.0), dict(fkc_target="cfg", guidance_scale=2.0, experts="3")])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_fkc_proposal_ddim_on_a_flow_is_fkc_own_move(target, eta, recwarn):
    """--proposal ddim is DDIM(--eta) on the twin stepped by ``FlowTwinEpsDDIM`` (the ddim sampler's step
    on flows), FKC's own move is the same DDIM(eta) in float64: same noise, same weights, same draws."""
    from gensample.samplers import baseline

    calls = []
    step = baseline.FlowTwinEpsDDIM.step

    def counting(self, model_output, timestep, sample, eta=None, generator=None, return_dict=True,
                 pred_original_sample=None):
        calls.append(pred_original_sample is not None)  # the x0 of the experts' velocities, not of eps
        return step(self, model_output, timestep, sample, eta, generator, return_dict, pred_original_sample)

    own = _run(sampler="fkc", particles=4, eta=eta, **target)
    baseline.FlowTwinEpsDDIM.step = counting
    try:
        prop = _run(sampler="fkc", particles=4, eta=eta, proposal="ddim", **target)
    finally:
        baseline.FlowTwinEpsDDIM.step = step
    assert len(calls) == KW["steps"] - 1 and all(calls)  # every step but the first (sigma = 1) is the proposal's
    assert prop.record["stats"]["fkc"]["proposal"] == "ddim"
    assert _gap(own, prop) < 1e-5


def test_fkc_proposal_ddpm_on_a_flow_is_the_sde_move_whatever_eta():
    own = _run(sampler="fkc", particles=4, beta=2.0, eta=1.0)
    for eta in (1.0, 0.3):  # --proposal ddpm moves with eta = 1 (the DDPM posterior draw of the twin)
        assert _gap(own, _run(sampler="fkc", particles=4, beta=2.0, eta=eta, proposal="ddpm")) < 1e-5


@pytest.mark.parametrize("window", [10, 40])
def test_fkc_beta_one_over_time_shift_on_a_flow_is_ts_ddim(window):
    """One expert at beta = 1 carries no weight: FKC over the Time-Shift proposal (``TwinFlowTimeShift``,
    selection on the flow state, the model called at that flow state with the shifted label) is the
    ``ts-ddim`` sampler on the flow (``FlowTimeShift``, velocity in), with the shift active."""
    a = _run(sampler="fkc", beta=1.0, particles=4, time_shift=True, eta=1.0, window=window)
    b = _run(sampler="ts-ddim", eta=1.0, window=window)
    c = _run(sampler="ddim", eta=1.0)
    assert _gap(a, b) < 1e-5
    assert _gap(b, c) > 1e-2  # the shift changed the samples
    assert a.record["stats"]["fkc"]["ts_window_cutoff"] == [window, 300]


def test_time_shift_window_zero_inside_fkc_cfg_on_a_flow_is_the_ddim_proposal():
    kw = dict(sampler="fkc", fkc_target="cfg", guidance_scale=2.0, experts="3", particles=4)
    a = _run(time_shift=True, window=0, **kw)
    b = _run(proposal="ddim", **kw)
    assert _gap(a, b) < 1e-6
    assert a.record["stats"]["fkc_resample_events"] == b.record["stats"]["fkc_resample_events"]
    c = _run(time_shift=True, window=40, cutoff=0, **kw)
    assert _gap(a, c) > 1e-2


def test_time_shift_inside_fkc_on_a_flow_refuses_tempered_targets():
    r = CliRunner().invoke(main, ["run", "--sampler", "fkc", "--time-shift", "--beta", "2", "--model", "gmm2d", "--flow",
                                  "-n", "16", "--steps", "6", "--no-progress"])
    assert r.exit_code == 2 and "--time-shift needs exponents summing to 1" in r.output


def test_twin_flow_time_shift_is_flow_time_shift_on_the_twin():
    """The twin face, unit level: same model times, and the step mapped back by c(sigma_s) is
    ``FlowTimeShift.step`` (eps in at the relabelled twin state vs velocity in at the flow state)."""
    from gensample.core.flow import eps_x0_from_velocity, flow_to_twin, twin_scale
    from gensample.models.gmm import flow_scheduler_config
    from gensample.samplers.time_shift import FlowTimeShift, TwinFlowTimeShift

    cfg = flow_scheduler_config(3.0)
    flow, twin = FlowTimeShift(cfg, window_size=60, cutoff=0, eta=1.0), TwinFlowTimeShift(cfg, window_size=60, cutoff=0, eta=1.0)
    flow.set_timesteps(8)
    twin.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g, dtype=torch.float64) * torch.linspace(0.6, 1.4, 6, dtype=torch.float64)[:, None]
    v = torch.randn(6, 64, generator=g, dtype=torch.float64)
    k = 3
    t = flow.timesteps[k]
    t_m = flow.model_timesteps(x, t)
    z = flow_to_twin(x, float(flow.sigmas[k]))
    assert torch.equal(twin.model_timesteps(z, t), t_m) and (t_m != t).any()
    z_m = twin.model_input(z, t, t_m)
    sigma_m = flow._schedule.sigma_of(t_m)
    eps, x0 = eps_x0_from_velocity(v, x, sigma_m)
    torch.testing.assert_close(z_m * twin_scale(sigma_m)[:, None], x, rtol=1e-12, atol=1e-12)  # the same flow point
    a = flow.step(v, t, x, generator=torch.Generator().manual_seed(1), model_timesteps=t_m).prev_sample
    b = twin.step(eps, t, z, generator=torch.Generator().manual_seed(1), model_timesteps=t_m).prev_sample
    c = twin.step(eps, t, z, generator=torch.Generator().manual_seed(1), model_timesteps=t_m, pred_original_sample=x0).prev_sample
    s = float(flow.sigmas[k + 1])
    torch.testing.assert_close(b * twin_scale(s), a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c * twin_scale(s), a, rtol=1e-10, atol=1e-10)


# -- Time-Shift as the step rule of the inverse loop ----------------------------------------------
INV = dict(num_samples=4, steps=10, from_sample=0)


@pytest.mark.parametrize("sampler, extra", [("dps", {}), ("psld", {}), ("stsl", {"inner_steps": 2})])
def test_time_shift_window_zero_in_the_inverse_loop_on_a_flow_is_the_plain_loop(sampler, extra):
    plain = _run(sampler=sampler, **INV, **extra)
    a = _run(sampler=sampler, time_shift=True, window=0, **INV, **extra)
    b = _run(sampler=sampler, time_shift=True, window=20, cutoff=0, **INV, **extra)
    assert np.array_equal(a.x, plain.x)
    assert _gap(b, plain) > 1e-3 and np.isfinite(b.x).all()
    assert b.record["stats"]["ts_window_cutoff"] == [[20, 0]]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_unguided_dps_with_time_shift_on_a_flow_is_ts_ddim(eta):
    """zeta = 0: the inverse loop is its step rule alone, so with --time-shift it is ts-ddim on the flow
    (the model called at the relabelled twin state, the step from alpha_bar of the shifted time)."""
    a = _run(sampler="dps", zeta=0.0, ddim_eta=eta, time_shift=True, window=20, cutoff=0, **INV)
    b = _run(sampler="ts-ddim", eta=eta, window=20, cutoff=0, num_samples=4, steps=10)
    c = _run(sampler="ddim", eta=eta, num_samples=4, steps=10)
    assert _gap(a, b) < 1e-5
    assert _gap(b, c) > 1e-2


# -- smc-post with an FKC target on a flow --------------------------------------------------------
def _two_mode():
    from gensample.models.gmm import GaussianMixture
    from gensample.models.loading import gmm_model
    from gensample.samplers.operators import MatrixOperator

    mix = GaussianMixture([0.5, 0.5], [[1.5, 1.5], [-1.5, -1.5]], [0.5, 0.5])
    return gmm_model("two-mode", mix), MatrixOperator((2,), [[1.0, 0.0]]), torch.tensor([[0.2]]), 0.3


def _exact_top(beta: float, sy: float) -> float:
    """Mass of the top mode (x1 + x2 > 0) of p(x)^beta N(0.2; x1, sy^2) by quadrature on a grid."""
    g = np.linspace(-5, 5, 801)
    X1, X2 = np.meshgrid(g, g, indexing="ij")
    logmix = np.logaddexp(*[np.log(0.5) - ((X1 - m) ** 2 + (X2 - m) ** 2) / (2 * 0.25) for m in (1.5, -1.5)])
    logp = beta * logmix - (0.2 - X1) ** 2 / (2 * sy**2)
    p = np.exp(logp - logp.max())
    return float(p[(X1 + X2) > 0].sum() / p.sum())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_annealed_posterior_on_a_flow_matches_the_exact_tempered_posterior(shift):
    """The VP test (tests/test_compose.py) on the flow form of the prior: p(x)^2 N(y; x_1, 0.3^2) puts the
    exact top-mode mass within 3 binomial standard errors of n draws (measured: 0.9425 (shift 1), 0.9375
    (shift 3) against 0.9422, SE 0.012); the untempered posterior is another law. The steps of the zero-SNR
    start (from sigma = 1 while alpha_bar <= 1e-3: one at shift 1, five at shift 3) sample the tempered path,
    N(sqrt(ab') x0_bar, (1 - ab') / beta), with no FK weight, as FKC's direct steps do."""
    from gensample.models.gmm import as_flow_model
    from gensample.runs.fkc import _expert_fn
    from gensample.samplers.smc_posterior import SMCPosteriorConfig, posterior_samples

    model, op, y, sy = _two_mode()
    model = as_flow_model(model, shift)
    beta, K, n = 2.0, 64, 400

    def top(betas):
        cfg = SMCPosteriorConfig(particles=K, steps=50, noise_std=sy, betas=betas)
        fn = _expert_fn(model.denoiser(), model, [None], n * K, "cpu") if betas != (1.0,) else None
        x = posterior_samples(model, op, y, list(range(n)), cfg, experts=fn).x.double()
        return float(((x[:, 0] + x[:, 1]) > 0).double().mean())

    truth = _exact_top(beta, sy)
    se = np.sqrt(truth * (1 - truth) / n)
    tempered, plain = top((beta,)), top((1.0,))
    assert abs(tempered - truth) < 3 * se, (tempered, truth, se)
    assert abs(plain - truth) > 3 * se, (plain, truth, se)


def test_smc_post_beta_one_target_on_a_flow_is_the_plain_posterior_sampler():
    kw = dict(sampler="smc-post", model="gmm2d", num_samples=4, steps=10, particles=4, from_sample=0)
    a = _run(**kw)
    b = _run(fkc_target="anneal", beta=1.0, **kw)
    c = _run(fkc_target="cfg", guidance_scale=2.0, experts="0", **kw)
    assert np.array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x) and np.isfinite(c.x).all()
    assert c.record["stats"]["fkc_target"]["betas"] == [2.0, -1.0]
