"""Time-Shift sampler: selection rule, identities with DDIM, run.json trace, epsilon scaling, errors
(the selection rule of Algorithm 3 in arXiv 2305.15583 and its identities with DDIM)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample import api
from gensample.cli import main
from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG
from gensample.samplers.baseline import epsilon_scale
from gensample.runs.time_shift import parse_data_var
from gensample.samplers.time_shift import (
    TimeShiftParams,
    default_window_cutoff,
    reference_variance,
    sample_variance,
    select_shift,
    window_candidates,
)
from gensample.schedulers.time_shift import TimeShiftScheduler

ONE_MINUS_AB = 1 - alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)  # (1000,) float64
T = ONE_MINUS_AB.numel()


# -- the selection rule (Algorithm 3) --- -------------------------------------------------------
def test_sample_variance_is_unbiased_per_sample():
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = np.var(x.reshape(5, -1).numpy().astype(np.float64), axis=1, ddof=1)
    got = sample_variance(x)
    assert got.dtype == torch.float64 and got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("centre,window,tau_star,expected", [
    (500, 40, 512, 512),    # inside the window: exact match
    (500, 40, 480, 480),    # lower edge is inside
    (500, 40, 560, 520),    # above the window: nearest (upper) edge
    (500, 40, 300, 480),    # below the window: nearest (lower) edge
    (5, 40, 0, 0),          # window clipped at 0
    (995, 40, 999, 999),    # window clipped at T - 1
    (999, 200, 999, 999),
])
def test_select_shift_finds_exact_variance(centre, window, tau_star, expected):
    var_hat = ONE_MINUS_AB[[tau_star]]  # (1,) exactly 1 - alpha_bar at tau*
    t_s = select_shift(var_hat, ONE_MINUS_AB, centre, window)
    assert t_s.dtype == torch.long and t_s.shape == (1,)
    assert t_s.item() == expected
    cand = window_candidates(centre, window, T)
    assert cand.min() <= t_s.item() <= cand.max()


def test_select_shift_ties_go_to_smallest_tau():
    table = torch.tensor([0.125, 0.25, 0.5, 0.5, 0.75, 0.875], dtype=torch.float64)  # exact binary values
    assert select_shift(torch.tensor([0.5], dtype=torch.float64), table, 3, 4).item() == 2
    # exactly equidistant between 0.25 (tau 1) and 0.5 (tau 2): the smaller tau wins
    assert select_shift(torch.tensor([0.375], dtype=torch.float64), table, 2, 4).item() == 1


def test_select_shift_is_per_sample():
    g = torch.Generator().manual_seed(3)
    var_hat = torch.rand(64, generator=g, dtype=torch.float64)
    t_s = select_shift(var_hat, ONE_MINUS_AB, 600, 200)
    perm = torch.randperm(64, generator=g)
    assert torch.equal(select_shift(var_hat[perm], ONE_MINUS_AB, 600, 200), t_s[perm])
    assert ((t_s >= 500) & (t_s <= 700)).all()


def test_window_below_two_has_one_candidate():
    for w in (0, 1):
        assert window_candidates(400, w, T).tolist() == [400]


def test_default_windows_follow_spec_table():
    assert default_window_cutoff(5) == (40, 200)
    assert default_window_cutoff(10) == (40, 200)
    assert default_window_cutoff(20) == (30, 300)
    assert default_window_cutoff(50) == (8, 300)
    assert default_window_cutoff(100) == (2, 300)
    assert default_window_cutoff(1000) == (2, 300)
    assert default_window_cutoff(10, 2000) == (80, 400)  # scaled by T / 1000


# -- identities with plain DDIM (bit for bit, same seed) ----------------------
def _run(sampler, **kw):
    kw.setdefault("model", "gmm-digits")
    kw.setdefault("num_samples", 6)
    kw.setdefault("steps", 10)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return api.run(sampler=sampler, **kw)


@pytest.fixture(scope="module")
def ddim_ref():
    return {eta: _run("ddim", eta=eta).x for eta in (0.0, 1.0)}


@pytest.mark.parametrize("opts", [
    {"window": 0}, {"window": 1}, {"cutoff": 900}, {"cutoff": 5000},
    {"window": 1, "variant": "reference_pnm"}, {"cutoff": 900, "variant": "reference_pnm"},
])
@pytest.mark.parametrize("sampler,eta", [("ts-ddim", 0.0), ("ts-ddpm", 1.0)])
def test_no_shift_configs_reproduce_ddim_bit_for_bit(ddim_ref, sampler, eta, opts):
    x = _run(sampler, **opts).x
    assert np.array_equal(x, ddim_ref[eta]), f"{sampler} {opts}: max diff {np.abs(x - ddim_ref[eta]).max()}"


def test_disabled_scheduler_matches_stock_ddim_float32():
    from diffusers import DDIMScheduler

    cfg = dict(DEFAULT_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    for eta in (0.0, 1.0):
        xs = []
        for sched in (DDIMScheduler.from_config(cfg), TimeShiftScheduler.from_config(cfg, enabled=False)):
            sched.set_timesteps(10)
            x, gen = x0.clone(), torch.Generator().manual_seed(1)
            for t in sched.timesteps:
                x = sched.step(0.3 * x * (t + 1) / 1000, t, x, eta=eta, generator=gen).prev_sample
            xs.append(x)
        assert torch.equal(xs[0], xs[1])


def test_cutoff_zero_is_not_an_identity(ddim_ref):
    x = _run("ts-ddim", cutoff=0, window=40).x
    assert not np.array_equal(x, ddim_ref[0.0])


# -- chosen t_s inside the window, recorded in run.json ---------------------------------------
@pytest.mark.parametrize("variant", ["paper", "reference_pnm"])
def test_ts_in_window_and_recorded(tmp_path, variant):
    steps, w, c = 10, 40, 200
    res = _run("ts-ddim", steps=steps, window=w, cutoff=c, variant=variant, num_samples=32, batch_size=16,
               output=str(tmp_path / "out"))
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    stats = rec["stats"]
    assert rec["nfe"] == steps and len(stats["ts_mean"]) == stats["batches"] >= 2  # one trace per batch
    grid = np.arange(900, -1, -100)
    for b in range(2):
        assert stats["timestep"][b] == grid.tolist()
        lo, hi, mean = (np.asarray(stats[k][b]) for k in ("ts_min", "ts_max", "ts_mean"))
        # the time the model saw (paper) or the step's target (reference_pnm)
        centre = grid if variant == "paper" else np.maximum(grid - 100, -1)
        assert (lo <= mean).all() and (mean <= hi).all()
        assert (lo >= np.maximum(centre - w // 2, -1)).all() and (hi <= centre + w // 2).all()
        shifted = (np.arange(steps) >= 1) & (centre > c)
        assert (lo[~shifted] == centre[~shifted]).all() and (hi[~shifted] == centre[~shifted]).all()
        assert (hi[shifted] > lo[shifted]).any()  # D = 64: the selection is noisy (docs/time_shift.md)
    assert all(wc == [w, c] for wc in rec["stats"]["ts_window_cutoff"])
    assert res.x.shape == (32, 1, 8, 8)


def test_defaults_run_on_demo_model():
    res = api.run(sampler="ts-ddim", num_samples=4, progress=False, device="cpu")
    assert res.record["config"]["steps"] == 10 and res.record["stats"]["ts_window_cutoff"] == [[40, 200]]
    assert np.isfinite(res.x).all()


# -- epsilon scaling baseline (arXiv 2308.15321) --------------------------------------------------
def test_eps_scale_one_is_ddim_and_lambda_divides_eps(ddim_ref):
    assert np.array_equal(_run("ddim", eps_scale=1.0).x, ddim_ref[0.0])
    from diffusers import DDIMScheduler

    from gensample.models.loading import load_model

    model = load_model("gmm-digits")
    res = _run("ddim", eps_scale=1.02, eps_scale_slope=1e-5, num_samples=3)
    sched = DDIMScheduler.from_config({**model.scheduler_config, "prediction_type": "epsilon"})
    sched.set_timesteps(10)
    from gensample.samplers.registry import RunContext, sample_seed

    ctx = RunContext("ddim")
    x = ctx.randn(ctx.generators([sample_seed(0, i) for i in range(3)]), model.event_shape)
    den = model.denoiser()
    for t in sched.timesteps:
        x = sched.step(den(x, t) / (1.02 + 1e-5 * int(t)), t, x).prev_sample
    np.testing.assert_allclose(res.x, x.numpy(), rtol=0, atol=1e-6)
    assert np.abs(res.x - ddim_ref[0.0][:3]).max() > 1e-3


def test_epsilon_scale_rejects_nonpositive():
    assert epsilon_scale(100, 1.0, 0.001) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="must be > 0"):
        epsilon_scale(900, 1.0, -0.01)


# -- user errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"window_size": -1, "cutoff": 0}, "window_size"),
    ({"window_size": 2.5, "cutoff": 0}, "window_size"),
    ({"window_size": 4, "cutoff": -3}, "cutoff"),
    ({"window_size": 4, "cutoff": 3, "variant": "pnm"}, "variant must be one of"),
    ({"window_size": 4, "cutoff": 3, "eta": -1.0}, "eta"),
])
def test_params_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimeShiftParams(**kwargs)
    with pytest.raises(ValueError, match=match):
        TimeShiftScheduler(**kwargs)


@pytest.mark.parametrize("args,match", [
    (["--window", "-2"], "--window must be >= 0"),
    (["--cutoff", "-1"], "--cutoff must be >= 0"),
    (["--variant", "pnm"], "pnm"),
    (["--steps", "2000"], "--steps"),
])
def test_cli_user_errors_exit_2(args, match, tmp_path):
    r = CliRunner().invoke(main, ["run", "--sampler", "ts-ddim", "-n", "2", "-o", str(tmp_path / "unused-ts"), *args])
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output


def test_cli_eps_scale_errors_and_scope():
    r = CliRunner().invoke(main, ["run", "--sampler", "ddim", "--eps-scale", "0", "-n", "2"])
    assert r.exit_code == 2 and "--eps-scale must be >=" in r.output
    r = CliRunner().invoke(main, ["run", "--sampler", "ddpm", "--eps-scale", "1.01", "-n", "2"])
    assert r.exit_code == 2 and "does not apply" in r.output
    r = CliRunner().invoke(main, ["run", "--sampler", "ddim", "--window", "4", "-n", "2"])
    assert r.exit_code == 2 and "does not apply" in r.output


def test_cli_runs_ts_ddim(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--sampler", "ts-ddim", "--model", "gmm-digits", "-n", "4", "--steps", "5", "--window", "30",
                                  "--cutoff", "300", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["window"] == 30 and rec["stats"]["ts_window_cutoff"] == [[30, 300]]


def test_scheduler_misuse_raises():
    s = TimeShiftScheduler(window_size=40, cutoff=200)
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.model_timesteps(x, 900)
    s.set_timesteps(10)  # step before set_timesteps and a non-descending custom grid: test_scheduler_contract.py
    with pytest.raises(ValueError, match="not on the grid"):
        s.model_timesteps(x, 905)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    ts = s.model_timesteps(x, 800)
    with pytest.raises(ValueError, match="model_timesteps differs"):
        s.step(torch.zeros_like(x), 800, x, model_timesteps=ts - 1)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(2, 1, 4, 5), 800, x)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()


def test_cfg_batch_shares_ts_per_sample():
    """Under CFG the Denoiser makes one [x; x] call per step; both halves get the sample's t_s."""
    from gensample.models.loading import load_model
    from gensample.samplers.time_shift import sample_time_shift
    from gensample.schedulers.time_shift import make_time_shift_scheduler

    model = load_model("gmm-digits")
    seen = []
    unet = model.unet
    unet.register_forward_pre_hook(lambda mod, args: seen.append(torch.as_tensor(args[1]).clone()))
    sched = make_time_shift_scheduler(model.scheduler_config, window_size=40, cutoff=200)
    sched.set_timesteps(5)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.8, 1.0, 1.1, 1.3]).reshape(4, 1, 1, 1)
    cond = model.cond_for(3, 4, "cpu")
    x, trace = sample_time_shift(model.denoiser(), x_T, sched, cond=cond, guidance_scale=2.0)
    assert torch.isfinite(x).all() and len(seen) == 5
    assert all(t.shape == (8,) and torch.equal(t[:4], t[4:]) for t in seen)
    assert any(len(set(t[:4].tolist())) > 1 for t in seen)  # per-sample shifts differ


# -- issue items: grid targets, window vs stride, finiteness, data-aware statistic ---------------
@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("trailing", 7), ("leading", 7)])
def test_every_step_targets_the_next_grid_entry(spacing, steps):
    """linspace 10 steps: 999, 888, ...: 999 -> 888, not 999 - T // N = 899 (DDIMScheduler's rule)."""
    from gensample.core.ddim import ddim_sigma
    from gensample.samplers.time_shift import predict_x0

    s = TimeShiftScheduler(timestep_spacing=spacing, window_size=0)
    s.set_timesteps(steps)
    grid = s.timesteps.tolist()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = 0.5 * x
    for k, t in enumerate(grid):
        out = s.step(eps, t, x)
        n = grid[k + 1] if k + 1 < len(grid) else -1
        assert (out.target_timesteps == n).all(), (k, t, out.target_timesteps)
        ab_t = s.alphas_cumprod[t]
        ab_n = s.alphas_cumprod[n] if n >= 0 else s.final_alpha_cumprod
        x0 = predict_x0(x, eps, ab_t)
        assert ddim_sigma(ab_t, ab_n, 0.0) == 0
        torch.testing.assert_close(out.prev_sample, ab_n.sqrt() * x0 + (1 - ab_n).sqrt() * eps)


def test_window_at_least_stride_with_eta_is_a_clear_error():
    s = TimeShiftScheduler(window_size=40, cutoff=0, eta=1.0)
    with pytest.raises(ValueError, match=r"window_size 40 \(half-width 20\) must be in \[0, 19\]"):
        s.set_timesteps(100)
    s = TimeShiftScheduler(window_size=40, cutoff=0)  # eta = 0 is fine; eta given to step is checked there
    s.set_timesteps(100)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"must be in \[0, 19\]"):
        s.step(x, s.timesteps[0], x, eta=1.0)
    s = TimeShiftScheduler(cutoff=0, eta=1.0)  # default window: capped inside the allowed range
    s.set_timesteps(100)
    assert s.window_size_eff < 2 * 10


def test_cli_window_wider_than_stride_exits_2(tmp_path):
    r = CliRunner().invoke(main, ["run", "--sampler", "ts-ddpm", "--model", "gmm-digits", "--steps", "100",
                                  "--window", "40", "-n", "2", "-o", str(tmp_path / "unused-ts")])
    assert r.exit_code == 2, r.output
    assert "must be in [0, 19]" in r.output and "Traceback" not in r.output


def test_non_finite_step_raises():
    s = TimeShiftScheduler(window_size=0)
    s.set_timesteps(10)
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(FloatingPointError, match="non-finite"):
        s.step(torch.full_like(x, float("nan")), s.timesteps[0], x)


def test_return_dict_false_is_diffusers_pair():
    s = TimeShiftScheduler(window_size=40, cutoff=0)
    s.set_timesteps(10)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[2]
    t_s = s.model_timesteps(x, t)
    out = s.step(0.1 * x, t, x, return_dict=False)  # the handed-over model time is used
    full = s.step(0.1 * x, t, x, model_timesteps=t_s)
    assert len(out) == 2 and torch.equal(out[0], full.prev_sample) and torch.equal(out[1], full.pred_original_sample)


def test_scheduler_is_a_shell_around_algorithm_3():
    """model_timesteps is `time_shift_times` (a pure function of the sample), no memo on objects."""
    from gensample.samplers.time_shift import reference_variance, time_shift_times

    s = TimeShiftScheduler(window_size=40, cutoff=200, data_var=0.3)
    s.set_timesteps(10)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.9
    ref = reference_variance(s.alphas_cumprod, 0.3)
    for k, t in enumerate(s.timesteps.tolist()):
        expect, _ = time_shift_times(x, k, s.timesteps.tolist(), ref, 40, 200)
        assert torch.equal(s.model_timesteps(x.clone(), t), expect)
    assert not any("memo" in name for name in vars(s))


def test_no_import_circle_between_baseline_and_time_shift():
    import ast
    from pathlib import Path

    import gensample.samplers.baseline as baseline

    tree = ast.parse(Path(baseline.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any("time_shift" in m for m in names), names


# -- issue 25 item 15: Var_data > 1 is allowed, V = 1 refused with the reason ----------------------
def test_data_var_one_is_refused_with_the_reason_and_above_one_accepted(tmp_path):
    for bad in (1.0, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"data_var must be None or a finite number >= 0 other than 1"):
            TimeShiftScheduler(data_var=bad)
    for ok in (0.0, 0.5, 1.03, 2.0):  # digits-ldm's latents have Var_data = 1.03
        assert TimeShiftScheduler(data_var=ok).config.data_var == ok
    assert parse_data_var("1.03") == 1.03 and parse_data_var("auto") == "auto"
    for bad, why in (("1", "cannot choose a shifted time"), ("-0.5", ">= 0"), ("foo", "'auto' or a finite number")):
        r = CliRunner().invoke(main, ["run", "--sampler", "ts-ddim", "--model", "gmm-digits", "--data-var", bad,
                                      "-n", "2", "-o", str(tmp_path / "unused-ts")])
        assert r.exit_code == 2 and "--data-var" in r.output and why in r.output, r.output
        assert "Traceback" not in r.output
    res = _run("ts-ddim", num_samples=2, steps=10, data_var=1.5, window=40, cutoff=0)
    assert res.record["stats"]["ts_data_var"] == [[1.5]]


@pytest.mark.parametrize("data_var,direction", [(0.0, +1), (0.5, +1), (1.03, -1), (2.0, -1)])
def test_reference_rises_with_t_below_one_and_falls_above(data_var, direction):
    """r(t) = (1 - ab_t) + ab_t V = 1 - ab_t (1 - V); ab_t falls with t, so dr/dt has the sign of
    1 - V: up for V < 1, down for V > 1 (docs/time_shift.md "Data-aware statistic")."""
    ab = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)
    assert (torch.diff(ab) < 0).all()
    ref = reference_variance(ab, data_var)
    assert (direction * torch.diff(ref) > 0).all()
    assert torch.allclose(ref, 1 - ab * (1 - data_var), rtol=0, atol=1e-15)


@pytest.mark.parametrize("data_var", [0.5, 2.0])
def test_data_aware_statistic_locates_the_true_time_on_either_side_of_one(data_var):
    """x0 with iid N(0, V) entries noised exactly to t_star: the data-aware reference finds t_star
    for V < 1 and V > 1 alike; the paper's 1 - ab (V ignored) picks a later time.
    Tolerance: var_hat of D iid Gaussian entries has sd r sqrt(2 / (D - 1)); divided by |dr/dt|
    at t_star that is the time error's sd; z = 5 over 16 rows keeps a false failure below 1e-5."""
    ab = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)
    t_star, window = 250, 400
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 64, 64, generator=g, dtype=torch.float64) * data_var ** 0.5
    eps = torch.randn(16, 3, 64, 64, generator=g, dtype=torch.float64)
    x_t = ab[t_star].sqrt() * x0 + (1 - ab[t_star]).sqrt() * eps
    D = x_t[0].numel()
    ref = 1 - ab * (1 - data_var)  # E[var_hat(x_t)], derived in the docstring of reference_variance
    slope = (ref[t_star + 1] - ref[t_star - 1]).abs() / 2
    tol = 5 * ref[t_star] * (2 / (D - 1)) ** 0.5 / slope
    assert tol < window // 2 - 10  # the test can tell the true time from a window edge

    def chosen(v):  # the scheduler's model time at grid time t_star (step 1 of a custom grid)
        sched = TimeShiftScheduler.from_config(DEFAULT_SCHEDULER_CONFIG, window_size=window, cutoff=0, data_var=v)
        sched.set_timesteps(timesteps=[999, t_star, 0])
        return sched.model_timesteps(x_t.float(), t_star)

    t_s = chosen(data_var)
    assert ((t_s - t_star).abs() <= tol).all(), (t_s.tolist(), float(tol))
    # the paper's 1 - ab is below the true variance 1 - ab (1 - V) for any V > 0: it picks later times
    paper = chosen(None)
    assert ((paper - t_star) > tol).all(), paper.tolist()


def test_latent_model_warns_on_the_paper_statistic():
    with pytest.warns(UserWarning, match="latent model"):
        res = _run("ts-ddim", model="digits-ldm", num_samples=2, steps=4)
    assert "ts_data_var" not in res.record["stats"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = _run("ts-ddim", model="digits-ldm", num_samples=2, steps=4, data_var=0.4)
    assert res.record["stats"]["ts_data_var"] == [[0.4]]  # one entry per batch


def test_get_variance_matches_ddim_scheduler():
    """DDIMScheduler's ``_get_variance`` helper (called by diffusers' own DDIM tests) on our class:
    (1 - ab_s)/(1 - ab_t) (1 - ab_t/ab_s), the final alpha_bar for s < 0."""
    from diffusers import DDIMScheduler

    ours, stock = TimeShiftScheduler(), DDIMScheduler()
    for t, s in [(0, 0), (420, 400), (980, 960), (487, 486), (999, 998), (10, -1)]:
        assert abs(float(ours._get_variance(t, s)) - float(stock._get_variance(t, s))) < 1e-7, (t, s)
