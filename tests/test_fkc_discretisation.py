"""FKC's discretisation bias, measured exactly: the infinite-K Gaussian recursion of the implemented
scheme (gensample.eval.fkc_gaussian; docs/fkc.md "Discretisation bias"), its agreement with Monte
Carlo, the weight rule chosen by it, zero-terminal-SNR schedules, and the last increment.
"""

import math

import pytest
import torch

from gensample.core.schedule import alphas_cumprod_from_config
from gensample.eval.fkc_gaussian import gaussian_eps_affine, gaussian_x0_affine, infinite_k_anneal
from gensample.models.gmm import GaussianMixture
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG
from gensample.samplers import fkc
from gensample.samplers.fkc import DEFAULTS, FKCConfig, sample_fkc, spaced_timesteps
from gensample.schedulers.fkc import FKCScheduler

AB = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)
ZSNR = dict(DEFAULT_SCHEDULER_CONFIG, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
AB_Z = alphas_cumprod_from_config(ZSNR)
M, S2, BETA = 1.0, 0.25, 3.0  # data N(1, 0.25), target p^3 = N(1, 0.25 / 3)


def _rec(steps, rule="euler", ab=AB, spacing="leading", **kw):
    return infinite_k_anneal(M, S2, BETA, ab, spaced_timesteps(1000, steps, spacing), rule=rule, **kw)


def test_recursion_reproduces_the_euler_scheme_values():
    # The implemented Euler rule (scores at x_k, DDPM move) converges slowly: its K -> inf target
    # variance at 100 / 250 / 1000 steps (target 0.0833). Computed in closed form, no sampling.
    got = [_rec(s)["var"] for s in (100, 250, 1000)]
    assert got == pytest.approx([0.0523, 0.0677, 0.0787], abs=6e-4)
    assert _rec(250)["mean"] == pytest.approx(M, abs=0.02)
    # beta = 1 is plain DDPM on exact scores: the recursion is the sampler's own variance deficit
    plain = infinite_k_anneal(M, S2, 1.0, AB, spaced_timesteps(1000, 250))
    assert 0.23 < plain["var"] < S2


def test_affine_exact_predictions_match_the_mixture_model():
    g = GaussianMixture([1.0], [[M]], [S2**0.5])
    x = torch.linspace(-2, 3, 7, dtype=torch.float64)[:, None]
    for ab in (0.0, 0.3, 0.97):
        a, b = gaussian_eps_affine(M, S2, ab)
        torch.testing.assert_close(g.eps(x, torch.tensor(ab, dtype=torch.float64)), a * x + b)
        a0, b0 = gaussian_x0_affine(M, S2, ab)
        eps = a * x + b
        if ab > 0:
            torch.testing.assert_close((x - (1 - ab) ** 0.5 * eps) / ab**0.5, a0 * x + b0)


def _monte_carlo(rule, steps, K=6000, G=4, ab=AB, spacing="leading", v_model=False, seed=0):
    """Weighted variance of G independent FKC groups (seeds) on the exact Gaussian model."""
    g = GaussianMixture([1.0], [[M]], [S2**0.5])
    ts = spaced_timesteps(1000, steps, spacing)

    def expert(x, t):
        a = ab[int(t)]
        eps = g.eps(x.double(), a)
        if not v_model:
            return eps.float()[None]
        x0 = M + (a.sqrt() * S2 / (a * S2 + 1 - a)) * (x.double() - a.sqrt() * M)  # E[x0 | x_t], exact
        return eps.float()[None], x0.float()[None]

    cfg = FKCConfig(betas=(BETA,), final="weighted", resample="every", quadrature=rule)
    gen = torch.Generator().manual_seed(seed)
    res = sample_fkc(expert, torch.randn(G * K, 1, generator=gen), cfg, ab, ts, group_size=K, noise_generators=gen,
                     resample_generators=[torch.Generator().manual_seed(seed + 1 + i) for i in range(G)])
    assert torch.isfinite(res.x).all() and torch.isfinite(res.log_w).all()
    x, w = res.x[:, 0].double().reshape(G, K), res.weights.reshape(G, K)
    mean = (w * x).sum(1, keepdim=True)
    return (w * (x - mean) ** 2).sum(1)  # (G,)


def _tolerance(var_groups, v):
    # 4 standard errors of the mean over groups: the larger of the observed group spread and the
    # iid Gaussian bound v sqrt(2 / K) per group (resampling only adds variance)
    G, K = var_groups.numel(), 6000
    sd = max(float(var_groups.std()), v * math.sqrt(2 / K))
    return 4 * sd / math.sqrt(G)


def test_monte_carlo_agrees_with_the_recursion_and_resolves_the_rules():
    # 8 groups (seeds) x K = 6000 particles x 50 steps, resampling every step, per rule
    rec = {rule: _rec(50, rule)["var"] for rule in ("euler", "logsnr")}
    tol = {}
    for rule in rec:
        mc = _monte_carlo(rule, 50, G=8)
        tol[rule] = _tolerance(mc, rec[rule])
        assert abs(float(mc.mean()) - rec[rule]) < tol[rule], (rule, float(mc.mean()), rec[rule], tol[rule])
    # power: the rules' K -> inf values differ by more than the two Monte Carlo tolerances together
    assert abs(rec["logsnr"] - rec["euler"]) > tol["logsnr"] + tol["euler"], (rec, tol)


def test_default_rule_is_the_best_converging_one():
    # the default weight rule was chosen by this measurement: closest to the target at every step count
    target = S2 / BETA
    for steps in (50, 100, 250):
        err = {rule: abs(_rec(steps, rule)["var"] - target) for rule in fkc.QUADRATURES}
        assert min(err, key=err.get) == DEFAULTS["quadrature"] == "logsnr", (steps, err)
    assert _rec(250, "logsnr")["var"] == pytest.approx(0.0725, abs=6e-4)


# -- zero terminal SNR ----------------------------------------------------------------------
def test_zero_snr_schedule_sample_fkc_is_finite_and_matches_its_recursion():
    assert AB_Z[-1] == 0.0
    rec = _rec(50, "logsnr", ab=AB_Z, spacing="trailing", x0_form=True)
    assert rec["normalisable"] and 0.03 < rec["var"] < S2 / BETA
    mc = _monte_carlo("logsnr", 50, ab=AB_Z, spacing="trailing", v_model=True)
    assert abs(float(mc.mean()) - rec["var"]) < _tolerance(mc, rec["var"])


def test_zero_snr_first_step_is_plain_ddim_for_one_expert():
    # B = 1: zero_snr_move is exactly DDIM(eta) from alpha_bar = 0 with x0 from the model
    g = torch.Generator().manual_seed(0)
    x, x0, z = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    ab_s = torch.tensor(0.01, dtype=torch.float64)
    for eta in (0.0, 0.5, 1.0):
        ours = fkc.zero_snr_move(x, x0[None], [1.0], ab_s, eta, z)
        sig = eta * (1 - ab_s).sqrt()
        ref = ab_s.sqrt() * x0 + (1 - ab_s - sig**2).sqrt() * x + sig * z  # eps = x at alpha_bar = 0
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("betas", [[3.0], [2.0, -1.0], [1.0, 1.0]])
def test_zero_snr_scheduler_step_is_finite(betas):
    s = FKCScheduler(**{k: v for k, v in ZSNR.items() if k != "clip_sample"}, fkc_betas=betas)
    s.set_timesteps(10)
    assert float(s._ab64[int(s.timesteps[0])]) == 0.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 4, 4, generator=g) * s.init_noise_sigma
    lw = torch.zeros(4, dtype=torch.float64)
    for t in s.timesteps:
        v = 0.3 * torch.randn(len(betas), 4, 2, 4, 4, generator=g)
        out = s.step(v if len(betas) > 1 else v[0], t, x, generator=g)
        assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.pred_original_sample).all()
        assert torch.isfinite(out.log_weight_increment).all()
        x, lw = out.prev_sample, lw + out.log_weight_increment
    assert torch.isfinite(lw).all()


def test_eps_and_x0_from_v_at_zero_alpha_bar():
    x, v = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps, x0 = fkc.eps_and_x0(v, x, 0.0, "v_prediction")
    torch.testing.assert_close(eps, x)
    torch.testing.assert_close(x0, -v)
    eps, x0 = fkc.eps_and_x0(x0, x, 0.0, "sample")
    assert torch.isfinite(eps).all()


# -- the last increment -------------------------------------------------------------------------
def test_last_increment_vanishes_only_when_the_grid_ends_at_t0_with_final_alpha_bar_ab0():
    sd = dict(DEFAULT_SCHEDULER_CONFIG, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ab = alphas_cumprod_from_config(sd)
    final = float(ab[0])  # set_alpha_to_one=False
    ts0 = spaced_timesteps(1000, 50, "leading", 0)  # ... 20, 0
    ts1 = spaced_timesteps(1000, 50, "leading", 1)  # SD's steps_offset=1: ... 21, 1
    ab_t, ab_s = fkc.alpha_bar_pairs(ab, ts0, final)
    assert fkc.node_coefficients(ab_t, ab_s, "euler")[-1] == 0.0
    ab_t, ab_s = fkc.alpha_bar_pairs(ab, ts1, final)
    assert int(ts1[-1]) == 1 and fkc.node_coefficients(ab_t, ab_s, "euler")[-1] > 0.1


def test_infinite_k_gaussian_generalises_the_anneal_recursion_and_matches_cfg_monte_carlo():
    """``infinite_k_gaussian`` (any prod_i N(m_i, s2_i)^beta_i; used by benchmarks/bench_compose.py for the
    K -> inf law of FKC-CFG) equals ``infinite_k_anneal`` for one expert to 1e-12, and for CFG (w = 2 on
    N(0.3, 0.02) | N(0, 0.05)) agrees with the sampler's weighted variance and mean: 4 groups x K = 4000,
    50 steps, resampling every step, within 4 standard errors over groups (group sd, floored at the iid
    bound v sqrt(2 / K) for the variance and sqrt(v / K) for the mean)."""
    from gensample.eval.fkc_gaussian import infinite_k_gaussian

    ts = spaced_timesteps(1000, 50)
    for rule in ("euler", "logsnr"):
        a, b = _rec(50, rule), infinite_k_gaussian([(M, S2)], [BETA], AB, ts, rule=rule)
        assert b["var"] == pytest.approx(a["var"], rel=1e-12) and b["mean"] == pytest.approx(a["mean"], rel=1e-12)
    experts, betas, G, K = [(0.3, 0.02), (0.0, 0.05)], (2.0, -1.0), 4, 4000
    lim = infinite_k_gaussian(experts, betas, AB, ts, rule=DEFAULTS["quadrature"])
    assert lim["target_var"] == pytest.approx(1 / (2 / 0.02 - 1 / 0.05)) and lim["var"] < 0.9 * lim["target_var"]

    def eps(x, t):
        a = AB[int(t)].double()
        xd = x.double()
        return torch.stack([(xd - a.sqrt() * m) * (1 - a).sqrt() / (a * s2 + 1 - a) for m, s2 in experts]).float()

    gen = torch.Generator().manual_seed(0)
    res = sample_fkc(eps, torch.randn(G * K, 1, generator=gen), FKCConfig(betas=betas, final="weighted", resample="every"),
                     AB, ts, group_size=K, noise_generators=gen,
                     resample_generators=[torch.Generator().manual_seed(1 + i) for i in range(G)])
    x, w = res.x[:, 0].double().reshape(G, K), res.weights.reshape(G, K)
    mean = (w * x).sum(1)
    var = (w * (x - mean[:, None]) ** 2).sum(1)
    tol_v = 4 * max(float(var.std()), lim["var"] * math.sqrt(2 / K)) / math.sqrt(G)
    tol_m = 4 * max(float(mean.std()), math.sqrt(lim["var"] / K)) / math.sqrt(G)
    assert abs(float(var.mean()) - lim["var"]) < tol_v, (float(var.mean()), lim["var"], tol_v)
    assert abs(float(mean.mean()) - lim["mean"]) < tol_m, (float(mean.mean()), lim["mean"], tol_m)
