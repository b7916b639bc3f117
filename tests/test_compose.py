"""Composition of the methods (docs/compose.md): start x Step rule x guidance x reweighting.

The identities hold bit for bit because a composition reuses each part's own code: FKC over a
diffusers scheduler calls that scheduler's ``step`` with the same per-sample generators, and a
Time-Shift step rule with window 0 is the DDIM scheduler exactly.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gensample
from gensample.cli import main
from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG
from gensample.samplers.baseline import make_scheduler
from gensample.samplers.fkc import FKCConfig, check_proposal, sample_fkc
from gensample.schedulers.time_shift import make_time_shift_scheduler

KW = dict(num_samples=8, steps=20, progress=False, model="digits-ddpm")
AB = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- FKC over any proposal step ----------------------------------------------------------------
def test_fkc_beta_one_over_ddim_scheduler_is_ddim_bit_for_bit():
    a = gensample.run(sampler="fkc", beta=1.0, particles=4, final="weighted", resample="every", proposal="ddim", **KW)
    b = gensample.run(sampler="ddim", eta=1.0, **KW)
    assert np.array_equal(a.x, b.x)
    assert a.record["stats"]["fkc"]["proposal"] == "ddim"


def test_fkc_beta_one_over_ddpm_scheduler_is_ddpm_bit_for_bit():
    a = gensample.run(sampler="fkc", beta=1.0, particles=4, proposal="ddpm", **KW)
    b = gensample.run(sampler="ddpm", **KW)
    assert np.array_equal(a.x, b.x)


def test_fkc_beta_one_over_time_shift_is_time_shift_bit_for_bit():
    a = gensample.run(sampler="fkc", beta=1.0, particles=4, time_shift=True, eta=1.0, window=10, **KW)
    b = gensample.run(sampler="ts-ddim", eta=1.0, window=10, **KW)
    c = gensample.run(sampler="ddim", eta=1.0, **KW)
    assert np.array_equal(a.x, b.x)
    assert not np.allclose(b.x, c.x, atol=1e-3)  # the shift is active: the identity is not the DDIM one
    assert a.record["stats"]["fkc"]["ts_window_cutoff"] == [10, 300]


def test_fkc_over_time_shift_ddpm_steps_with_eta_one_whatever_eta():
    """--proposal ddpm --time-shift is the Time-Shift DDPM step: the scheduler keeps its own eta = 1 (before,
    --eta overrode it: --eta 0.5 gave a different chain); at beta = 1 it is ts-ddpm."""
    kw = dict(KW, beta=1.0, particles=4, proposal="ddpm", time_shift=True, window=10)
    a = gensample.run(sampler="fkc", eta=0.5, **kw)
    b = gensample.run(sampler="fkc", eta=1.0, **kw)
    c = gensample.run(sampler="ts-ddpm", window=10, **KW)
    assert np.array_equal(a.x, b.x) and np.array_equal(b.x, c.x)


def test_the_ode_move_warning_reads_the_move_eta():
    """FKC warns that an eta = 0 move with resampling duplicates particles: for the move that runs, so
    --proposal ddpm (eta 1) with --eta 0 does not warn, --proposal ddim with --eta 0 does."""
    import warnings

    kw = dict(KW, beta=2.0, particles=4, eta=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gensample.run(sampler="fkc", proposal="ddpm", **kw)
    with pytest.warns(RuntimeWarning, match="eta=0"):
        gensample.run(sampler="fkc", proposal="ddim", **kw)


def test_time_shift_window_zero_inside_fkc_is_fkc_bit_for_bit():
    # CFG w = 2 (sum of exponents 1): weights and resampling are active, only the step rule differs
    kw = dict(KW, fkc_target="cfg", guidance_scale=2.0, experts="3", particles=4)
    a = gensample.run(sampler="fkc", time_shift=True, window=0, **kw)
    b = gensample.run(sampler="fkc", proposal="ddim", **kw)
    assert np.array_equal(a.x, b.x)
    assert a.record["stats"]["fkc_resample_events"] == b.record["stats"]["fkc_resample_events"]
    c = gensample.run(sampler="fkc", time_shift=True, window=10, **kw)  # and the shift changes it
    assert not np.array_equal(a.x, c.x)


def test_fkc_own_move_and_ddim_scheduler_agree_to_rounding():
    a = gensample.run(sampler="fkc", beta=2.0, particles=4, **KW)
    b = gensample.run(sampler="fkc", beta=2.0, particles=4, proposal="ddim", **KW)
    # float64 (own move) vs the scheduler's float32 arithmetic; same noise, same resampling decisions
    np.testing.assert_allclose(a.x, b.x, atol=1e-3)


def test_check_proposal_refuses_multistep_and_non_eps_schedulers():
    cfg = FKCConfig()
    dpm = make_scheduler("dpm", DEFAULT_SCHEDULER_CONFIG)
    dpm.set_timesteps(10)
    with pytest.raises(ValueError, match="one-step scheduler"):
        check_proposal(dpm, dpm.timesteps, cfg)
    v = make_scheduler("ddim", DEFAULT_SCHEDULER_CONFIG, prediction_type="v_prediction")
    v.set_timesteps(10)
    with pytest.raises(ValueError, match="epsilon"):
        check_proposal(v, v.timesteps, cfg)
    d = make_scheduler("ddim", DEFAULT_SCHEDULER_CONFIG)
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="set_timesteps"):
        check_proposal(d, torch.arange(20).flip(0), cfg)


def test_time_shift_inside_fkc_refuses_tempered_targets():
    ts = make_time_shift_scheduler(DEFAULT_SCHEDULER_CONFIG, window_size=10, eta=1.0)
    ts.set_timesteps(10)
    x = torch.randn(4, 1, 8, 8)

    def experts(x, t):
        return torch.zeros(1, *x.shape)

    with pytest.raises(ValueError, match="sum\\(betas\\) = 1"):
        sample_fkc(experts, x, FKCConfig(betas=(2.0,)), AB, ts.timesteps, group_size=4,
                   noise_generators=torch.Generator(), resample_generators=[torch.Generator()], proposal=ts)
    with pytest.raises(ValueError, match="quadrature euler or logsnr"):  # per-particle times: one-step rules only
        sample_fkc(experts, x, FKCConfig(betas=(2.0, -1.0), quadrature="trapezoid"), AB, ts.timesteps, group_size=4,
                   noise_generators=torch.Generator(), resample_generators=[torch.Generator()], proposal=ts)
    r = _cli("run", "--sampler", "fkc", "--time-shift", "--beta", "2", "--model", "digits-ddpm", "--num-samples", 16,
             "--steps", 10, "--no-progress")
    assert r.exit_code == 2 and "--time-shift needs exponents summing to 1" in r.output and "Traceback" not in r.output


def test_fkc_time_shift_flags_need_time_shift():
    r = _cli("run", "--sampler", "fkc", "--window", 10, "--model", "digits-ddpm", "--num-samples", 16, "--steps", 10)
    assert r.exit_code == 2 and "--window applies with --time-shift only" in r.output


def _log_snr(ab):
    ab = torch.as_tensor(ab, dtype=torch.float64)
    return torch.log(ab) - torch.log1p(-ab)


class _Cfg(dict):
    __getattr__ = dict.__getitem__


class TimeShiftScheduler:
    """A stand-in Time-Shift proposal (same class name, so ``check_proposal`` takes it as one): it
    hands FKC random per-particle model times t_k + shift (the shifts drawn from a seeded generator,
    up to +-max_shift) and leaves x in place; only the weights are under test."""

    def __init__(self, grid, max_shift, seed, final_alpha_cumprod):
        self.timesteps = grid
        self.config = _Cfg(prediction_type="epsilon", window_size=2 * max_shift + 1, eta=1.0)
        self.final_alpha_cumprod = final_alpha_cumprod
        self.gen = torch.Generator().manual_seed(seed)
        self.max_shift = max_shift
        self.seen = []

    def model_timesteps(self, x, t):
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (x.shape[0],), generator=self.gen)
        out = (int(t) + shift).clamp(0, len(AB) - 1)
        self.seen.append(out)
        return out

    def step(self, eps, t, x, generator=None, return_dict=True, eta=None, model_timesteps=None):
        return type("Out", (), {"prev_sample": x})()


def _shifted_log_w(experts, cfg, grid, proposal, N):
    return sample_fkc(experts, torch.zeros(N, 1, 4, 4), cfg, AB, grid, group_size=N,
                      noise_generators=[torch.Generator().manual_seed(i) for i in range(N)],
                      resample_generators=[torch.Generator()], proposal=proposal).log_w[0]


@pytest.mark.parametrize("seed,max_shift,steps", [(0, 15, 20), (1, 40, 50), (2, 3, 7)])
def test_fkc_time_shift_weights_integrate_the_path_once(seed, max_shift, steps):
    """Issue 25 item 12. Under Time-Shift each particle's step still traverses the grid interval
    [t_k, t_{k+1}], so the FK coefficients (logsnr rule) sum to 1/2 (lambda_end - lambda_start) of the
    path whatever the per-particle model times (docs/compose.md "Time-Shift inside FKC"). Experts
    whose eps gap is fixed per particle make the rate r_b constant, so
    log w_b - log w_0 = 1/2 Delta lambda (r_b - r_0) exactly (1e-12)."""
    N = 6
    g = torch.Generator().manual_seed(100 + seed)
    e_c = torch.randn(N, 1, 4, 4, generator=g) * 0.3  # float32, the dtype of x
    experts = lambda x, t: torch.stack([e_c, torch.zeros_like(e_c)])  # noqa: E731
    cfg = FKCConfig(betas=(2.0, -1.0), resample="never", final="weighted", quadrature="logsnr")
    grid = torch.linspace(999, 0, steps).round().long()
    final_ab = float(AB[0])  # set_alpha_to_one=False: the path ends at a finite log-SNR
    prop = TimeShiftScheduler(grid, max_shift, seed, final_ab)
    log_w = _shifted_log_w(experts, cfg, grid, prop, N)
    seen = torch.stack(prop.seen)  # (S, N)
    assert (seen != grid[:, None]).float().mean() > 0.5  # most particles were shifted, differently
    rate = (2.0 * e_c.double().flatten(1) ** 2).sum(1)  # w (w - 1) ||eps_c - eps_u||^2, w = 2
    half_span = 0.5 * float(_log_snr(final_ab) - _log_snr(AB.double()[grid[0]]))
    torch.testing.assert_close(log_w - log_w[0], half_span * (rate - rate[0]), rtol=1e-12, atol=1e-12)
    # any rule: the coefficients are the grid's, the same as with no shift at all (Euler here)
    cfg_e = FKCConfig(betas=(2.0, -1.0), resample="never", final="weighted", quadrature="euler")
    shifted = _shifted_log_w(experts, cfg_e, grid, TimeShiftScheduler(grid, max_shift, seed, final_ab), N)
    unshifted = _shifted_log_w(experts, cfg_e, grid, TimeShiftScheduler(grid, 0, seed, final_ab), N)
    torch.testing.assert_close(shifted, unshifted, rtol=1e-12, atol=1e-12)


def test_fkc_time_shift_weights_take_the_rate_at_the_model_times():
    """The real Time-Shift scheduler: the experts are called at each particle's model time (recorded),
    the coefficient of step k is the grid's node_coefficients c_k for every particle. Experts with
    constant eps make log w_b - log w_0 = sum_k c_k (r_b - r_0)."""
    from gensample.samplers.fkc import alpha_bar_pairs, node_coefficients, weight_rate

    ts = make_time_shift_scheduler(DEFAULT_SCHEDULER_CONFIG, window_size=30, cutoff=0, eta=1.0)
    ts.set_timesteps(10)
    seen = []
    original = ts.model_timesteps

    def recording(x, t):
        out = original(x, t)
        seen.append(out.clone())
        return out

    ts.model_timesteps = recording
    N = 4
    g = torch.Generator().manual_seed(0)
    e_c = torch.randn(N, 1, 8, 8, generator=g) * 0.1
    e_u = torch.zeros(N, 1, 8, 8)
    x = torch.randn(N, 1, 8, 8, generator=g) * 1.3  # too much variance: the shift is active
    cfg = FKCConfig(betas=(2.0, -1.0), resample="never", final="weighted", quadrature="logsnr")
    res = sample_fkc(lambda x, t: torch.stack([e_c, e_u]), x, cfg, AB, ts.timesteps, group_size=N,
                     noise_generators=[torch.Generator().manual_seed(i) for i in range(N)],
                     resample_generators=[torch.Generator()], proposal=ts)
    times = torch.stack(seen)  # (S, N)
    assert (times != ts.timesteps[:, None]).any()  # some particles were shifted
    rate = weight_rate(torch.stack([e_c, e_u]), cfg.betas)  # (N,)
    coef = node_coefficients(*alpha_bar_pairs(AB, ts.timesteps, 1.0), "logsnr")  # (S,) the grid's
    expected = coef.sum() * rate
    torch.testing.assert_close(res.log_w[0] - res.log_w[0, 0], expected - expected[0], rtol=1e-10, atol=1e-10)


# -- One More Step before any image sampler ---------------------------------------------------
OMS_KW = dict(num_samples=4, steps=10, progress=False, model="digits-flawed", oms_module="default")


def test_oms_then_fkc_beta_one_is_oms_then_ddpm_bit_for_bit():
    a = gensample.run(sampler="fkc", beta=1.0, particles=4, proposal="ddpm", **OMS_KW)
    b = gensample.run(sampler="ddpm", **OMS_KW)
    c = gensample.run(sampler="ddpm", **dict(OMS_KW, oms_module=None))
    assert np.array_equal(a.x, b.x)
    assert not np.allclose(b.x, c.x, atol=1e-2)  # the OMS start is in effect
    assert a.record["stats"]["oms"]["t0"] == b.record["stats"]["oms"]["t0"] == 901.0


def test_oms_start_on_ddim_and_ts_ddim_is_the_oms_sampler():
    ref = gensample.run(sampler="oms", skip_compare=True, **OMS_KW).x
    assert np.array_equal(gensample.run(sampler="ddim", **OMS_KW).x, ref)
    assert np.array_equal(gensample.run(sampler="ts-ddim", window=0, **OMS_KW).x, ref)  # TS off: DDIM exactly
    assert not np.array_equal(gensample.run(sampler="ts-ddim", **OMS_KW).x, ref)


@pytest.mark.parametrize("sampler, extra", [("dps", {}), ("psld", {}), ("stsl", {"init": "gaussian"}),
                                            ("smc-post", {"particles": 2})])
def test_oms_start_on_inverse_samplers_changes_only_the_start(sampler, extra):
    kw = dict(OMS_KW, from_sample=0, **extra)
    a = gensample.run(sampler=sampler, **kw)
    b = gensample.run(sampler=sampler, **dict(kw, oms_module=None))
    assert a.x.shape == b.x.shape and np.isfinite(a.x).all()
    assert not np.array_equal(a.x, b.x)
    assert np.array_equal(a.samples["y"], b.samples["y"])  # same measurement


def test_oms_start_errors_are_clean():
    r = _cli("run", "--sampler", "stsl", "--model", "digits-flawed", "--oms-module", "default", "--num-samples", 1,
             "--steps", 3, "--from-sample", 0)
    assert r.exit_code == 2 and "pass --init gaussian" in r.output and "Traceback" not in r.output
    r = _cli("run", "--sampler", "ddim", "--model", "gmm2d", "--oms-module", "default", "--num-samples", 1, "--steps", 3)
    assert r.exit_code == 2 and "needs an image diffusion model" in r.output
    r = _cli("run", "--sampler", "ddim", "--model", "digits-flawed", "--oms-module", "default", "--offset-noise", 0.1,
             "--num-samples", 1, "--steps", 3)
    assert r.exit_code == 2 and "excludes --offset-noise" in r.output


# -- Time-Shift as the step rule of the inverse loop -------------------------------------------
INV_KW = dict(num_samples=4, steps=10, progress=False, model="digits-ddpm", from_digit=0)


@pytest.mark.parametrize("sampler, extra", [("dps", {}), ("psld", {}), ("stsl", {})])
def test_time_shift_window_zero_in_inverse_loop_is_the_plain_loop(sampler, extra):
    plain = gensample.run(sampler=sampler, **INV_KW, **extra)
    a = gensample.run(sampler=sampler, time_shift=True, window=0, **INV_KW, **extra)
    b = gensample.run(sampler=sampler, time_shift=True, window=20, cutoff=0, **INV_KW, **extra)
    assert np.array_equal(a.x, plain.x)
    assert not np.array_equal(b.x, plain.x)
    assert b.record["stats"]["ts_window_cutoff"] == [[20, 0]]


def test_time_shift_flags_need_time_shift_on_inverse_samplers():
    r = _cli("run", "--sampler", "dps", "--model", "digits-ddpm", "--window", 10, "--num-samples", 1, "--steps", 3)
    assert r.exit_code == 2 and "--window applies with --time-shift only" in r.output
    r = _cli("run", "--sampler", "dps", "--model", "digits-flawed", "--from-digit", 0, "--num-samples", 1, "--steps", 3)
    assert r.exit_code == 2 and "--from-digit takes the held-out 8x8 digits" in r.output


# -- FKC targets with a measurement (smc-post) -------------------------------------------------
def test_smc_post_beta_one_target_is_the_plain_posterior_sampler():
    kw = dict(num_samples=4, steps=10, progress=False, model="digits-ddpm", particles=4, from_digit=0)
    a = gensample.run(sampler="smc-post", **kw)
    b = gensample.run(sampler="smc-post", fkc_target="cfg", guidance_scale=1.0, experts="3", **kw)
    # CFG with w = 1 is p(x | 3): not the unconditional prior, so it differs; beta = 1 anneal is the prior itself
    c = gensample.run(sampler="smc-post", fkc_target="anneal", beta=1.0, **kw)
    assert np.array_equal(a.x, c.x)
    assert not np.array_equal(a.x, b.x)
    assert "fkc_target" in b.record["stats"] and b.record["stats"]["fkc_target"]["betas"] == [1.0, 0.0]


def test_annealed_posterior_matches_the_exact_tempered_posterior():
    """p(x)^2 N(y; x_1, 0.3^2) on the 2-D two-mode mixture: the exact law by quadrature on a grid.
    smc-post with the FKC target puts the exact mass on the top mode (within 3 binomial standard
    errors of n draws); the untempered smc-post (the plain posterior) does not."""
    from gensample.models.gmm import GaussianMixture
    from gensample.models.loading import gmm_model
    from gensample.runs.fkc import _expert_fn
    from gensample.samplers.operators import MatrixOperator
    from gensample.samplers.smc_posterior import SMCPosteriorConfig, posterior_samples

    mix = GaussianMixture([0.5, 0.5], [[1.5, 1.5], [-1.5, -1.5]], [0.5, 0.5])
    model = gmm_model("two-mode", mix)
    op, y, sy, beta, K, n = MatrixOperator((2,), [[1.0, 0.0]]), torch.tensor([[0.2]]), 0.3, 2.0, 64, 400
    g = np.linspace(-5, 5, 801)
    X1, X2 = np.meshgrid(g, g, indexing="ij")
    logmix = np.logaddexp(*[np.log(0.5) - ((X1 - m) ** 2 + (X2 - m) ** 2) / (2 * 0.25) for m in (1.5, -1.5)])

    def exact_top(b):
        logp = b * logmix - (0.2 - X1) ** 2 / (2 * sy**2)
        p = np.exp(logp - logp.max())
        return float(p[(X1 + X2) > 0].sum() / p.sum())

    def top(betas):
        cfg = SMCPosteriorConfig(particles=K, steps=50, noise_std=sy, betas=betas)
        fn = _expert_fn(model.denoiser(), model, [None], n * K, "cpu") if betas != (1.0,) else None
        x = posterior_samples(model, op, y, list(range(n)), cfg, experts=fn).x.double()
        return float(((x[:, 0] + x[:, 1]) > 0).double().mean())

    truth = exact_top(beta)
    se = np.sqrt(truth * (1 - truth) / n)
    tempered, plain = top((beta,)), top((1.0,))
    assert abs(tempered - truth) < 3 * se, (tempered, truth, se)
    assert abs(plain - truth) > 3 * se, (plain, truth, se)  # the untempered posterior is another law
    assert abs(plain - exact_top(1.0)) < 3 * np.sqrt(0.15 * 0.85 / n)


@pytest.mark.parametrize("args", [
    ["--sampler", "dps", "--time-shift", "--model", "digits-ddpm", "--from-digit", 0],
    ["--sampler", "fkc", "--fkc-target", "cfg", "--guidance-scale", 2, "--experts", 3, "--time-shift", "--particles", 4,
     "--model", "digits-ddpm"],
    ["--sampler", "smc-post", "--fkc-target", "cfg", "--guidance-scale", 2, "--experts", 3, "--particles", 2,
     "--model", "digits-ddpm", "--task", "inpaint-box", "--from-digit", 3],
    ["--sampler", "fkc", "--oms-module", "default", "--proposal", "ddpm", "--beta", 1, "--particles", 4,
     "--model", "digits-flawed"],
])
def test_compositions_run_through_the_cli(tmp_path, args):
    r = _cli("run", *args, "--num-samples", 4, "--steps", 6, "--no-progress", "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    npz = np.load(tmp_path / "run" / "samples.npz")
    assert npz["x"].shape[0] == 4 and np.isfinite(npz["x"]).all()


def test_time_shift_step_rule_takes_the_data_aware_statistic_on_latents():
    """The step rule is the ts-ddim scheduler with all its options: on a latent model the paper's
    statistic warns (it would shift to the noisiest edge), --data-var removes the warning."""
    kw = dict(num_samples=2, steps=10, progress=False, model="digits-ldm", from_sample=0, time_shift=True)
    with pytest.warns(UserWarning, match="latent model"):
        gensample.run(sampler="dps", **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        r = gensample.run(sampler="dps", data_var=0.5, **kw)
    assert np.isfinite(r.x).all()
    bad = _cli("run", "--sampler", "fkc", "--data-var", "0.5", "--model", "digits-ddpm", "--num-samples", 16, "--steps", 3)
    assert bad.exit_code == 2 and "--data-var applies with --time-shift only" in bad.output
