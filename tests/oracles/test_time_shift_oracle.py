"""Exact-score oracles for Time-Shift (docs/time_shift.md "Measured", oracle items).

Data: x0 = c 1_D with c ~ 1/2 N(-0.5, 0.1^2) + 1/2 N(0.5, 0.1^2). The exact eps depends on x_t
only through m = mean(x_t) (docs/time_shift.md), and x0_hat is constant over pixels, so the centred
part of x_t is pure noise: DDIM keeps v_hat / (1 - alpha_bar_t) fixed, and TS should drive it
back to 1 when the start is mis-scaled. Runs in float64.
"""

import pytest
import torch

from diffusers import DDIMScheduler

from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG
from gensample.samplers.time_shift import sample_time_shift, sample_variance
from gensample.schedulers.time_shift import TimeShiftScheduler

CFG = dict(DEFAULT_SCHEDULER_CONFIG)
AB = alphas_cumprod_from_config(CFG)  # (1000,) float64
MU = torch.tensor([-0.5, 0.5], dtype=torch.float64)
S2 = 0.1**2


def exact_eps(x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """Exact eps for the two-level constant-image mixture at per-sample times t (docs/time_shift.md)."""
    B, D = x.shape[0], x[0].numel()
    ab = AB[torch.as_tensor(t).reshape(-1).expand(B)].reshape(B, 1)  # (B, 1)
    m = x.reshape(B, -1).double().mean(1, keepdim=True)  # (B, 1)
    var_m = ab * S2 + (1 - ab) / D  # (B, 1): Var(m | k)
    r = torch.softmax(-0.5 * (m - ab.sqrt() * MU) ** 2 / var_m, 1)  # (B, 2) equal priors
    c_hat = (r * (MU + ab.sqrt() * S2 * (m - ab.sqrt() * MU) / var_m)).sum(1, keepdim=True)  # E[c | m]
    eps = (x.reshape(B, -1).double() - ab.sqrt() * c_hat) / (1 - ab).sqrt()
    return eps.reshape(x.shape).to(x.dtype)


def scaled_start(B: int, D: int, S: float, t0: int, seed: int = 0) -> torch.Tensor:
    """x_T whose centred part is rescaled so that v_hat = S (1 - alpha_bar_t0) for every sample."""
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = x.mean(1, keepdim=True)
    return m + (x - m) * (S * (1 - AB[t0]) / sample_variance(x)).sqrt()[:, None]


def ratio_trace(sched, x, **set_kw):
    """v_hat(x_t) / (1 - alpha_bar_t) before every step (batch mean), plus the TS loop trace."""
    sched.set_timesteps(**set_kw)
    ratios = {}

    def den(x_t, t, cond=None):
        return exact_eps(x_t, t)

    x_cur = x
    for t in sched.timesteps:
        ratios[int(t)] = (sample_variance(x_cur) / (1 - AB[t])).mean().item()
        x_cur = sched.step(den(x_cur, sched.model_timesteps(x_cur, t)), t, x_cur).prev_sample
    return x_cur, ratios


def test_exact_model_paper_ts_is_ddim_bit_for_bit():
    """Spec 7.3: correctly scaled start, w = 40, t_c = 300, 10 steps, D = 1024: t_s = tau_k at
    every step and the output equals stock diffusers DDIM exactly."""
    x_T = scaled_start(8, 1024, 1.0, 900)
    ts = TimeShiftScheduler.from_config(CFG, window_size=40, cutoff=300)
    ts.set_timesteps(10)
    x_ts, trace = sample_time_shift(lambda x, t, c: exact_eps(x, t), x_T, ts)
    assert trace["ts_min"] == trace["timestep"] and trace["ts_max"] == trace["timestep"]
    ddim = DDIMScheduler.from_config(CFG)
    ddim.set_timesteps(10)
    x = x_T
    for t in ddim.timesteps:
        x = ddim.step(exact_eps(x, t), t, x).prev_sample
    assert torch.equal(x_ts, x)


@pytest.mark.parametrize("S,settled_by", [(1.05, 400), (0.95, 500)])
def test_ts_corrects_injected_variance_error(S, settled_by):
    """Spec 7.4: v_hat(x_T) = S (1 - ab), w = 200, t_c = 100, D = 3072, grid 900..0. DDIM keeps the
    ratio at S; TS brings it to 1 +- 1e-3 by t = 400 (S = 1.05) / t = 500 (S = 0.95)."""
    grid = list(range(900, -1, -100))
    x_T = scaled_start(8, 3072, S, 900)
    _, r_ts = ratio_trace(TimeShiftScheduler.from_config(CFG, window_size=200, cutoff=100), x_T, timesteps=grid)
    _, r_ddim = ratio_trace(TimeShiftScheduler.from_config(CFG, window_size=200, cutoff=100, enabled=False), x_T, timesteps=grid)
    # DDIM with the exact model preserves the ratio analytically; 2e-4 covers float64 round-off
    # and the t = 0 entry where alpha_bar_0 Var(x0) = 1e-4 * 0.01 is no longer negligible.
    assert all(abs(r - S) < 2e-4 for r in r_ddim.values()), r_ddim
    settled = {t: r for t, r in r_ts.items() if t <= settled_by}
    assert all(abs(r - 1) < 1e-3 for r in settled.values()), r_ts
    # the published trace for S = 1.05 (spec 7.4): 1.05, 1.05, 1.049, 1.043, 1.023, 1.000
    if S == 1.05:
        expected = [1.05, 1.05, 1.049, 1.043, 1.023, 1.000]
        got = [r_ts[t] for t in grid[:6]]
        assert all(abs(a - b) < 1.5e-3 for a, b in zip(got, expected)), got


def test_reference_pnm_picks_noisy_edge_with_exact_model():
    """Spec 7.5: stride 100 > h = 20, so the PNMSolver rule always takes j + h for the target."""
    x_T = scaled_start(8, 1024, 1.0, 900)
    sched = TimeShiftScheduler.from_config(CFG, window_size=40, cutoff=300, variant="reference_pnm")
    sched.set_timesteps(10)
    x = x_T
    offsets = []
    for k, t in enumerate(sched.timesteps):
        t_model = sched.model_timesteps(x, t)
        assert (t_model == t).all()  # the model always runs at the grid time
        out = sched.step(exact_eps(x, t_model), t, x)
        j = int(t) - 100
        if k >= 1 and j > 300:
            offsets.append((out.target_timesteps - j).unique().tolist())
        else:
            assert (out.target_timesteps == max(j, -1)).all()
        x = out.prev_sample
    assert offsets == [[20]] * 4  # j = 700, 600, 500, 400


# -- gmm-digits: the exact 8x8 mixture (D = 64) ----------------------------------------------
def _gmm_digits_run(n, steps, seed=1, **ts_kw):
    """TS/DDIM with the exact gmm-digits eps from a correctly scaled start; returns (x0, trace)."""
    from gensample.models.loading import load_model
    from gensample.schedulers.time_shift import make_time_shift_scheduler

    model = load_model("gmm-digits")
    sched = make_time_shift_scheduler(model.scheduler_config, **ts_kw)
    sched.set_timesteps(steps)
    ab0 = model.alphas_cumprod[int(sched.timesteps[0])]
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = x.mean(1, keepdim=True)
    x = (m + (x - m) * ((1 - ab0) / sample_variance(x)).sqrt()[:, None]).reshape(n, 1, 8, 8)
    out, trace = sample_time_shift(model.denoiser(), x, sched)
    return out, trace, model.extras["mixture"]


def _class_freq(mix, x):
    K = int(mix.labels.max()) + 1
    r = mix.responsibilities(x)  # (n, components)
    per_class = torch.zeros(x.shape[0], K, dtype=torch.float64).index_add_(1, mix.labels, r)
    return per_class.argmax(1).bincount(minlength=K).double() / x.shape[0]  # (K,)


def test_gmm_digits_paper_ts_is_near_neutral_and_large_window_is_not():
    """Exact model on gmm-digits, 10 steps, default w = 40, t_c = 200: at high t (alpha_bar Var(x0)
    negligible) the mean shift is near 0, and the output keeps the exact class law as DDIM does.
    The spec-7.4 setting w = 200, t_c = 100 must fail the same check: on real data the statistic
    ignores alpha_bar Var(x0) (docs/time_shift.md "Data-aware statistic"), so large windows shift far from the truth."""
    n = 1000
    x_ddim, _, mix = _gmm_digits_run(n, 10, enabled=False)
    x_ts, trace, _ = _gmm_digits_run(n, 10)
    x_big, _, _ = _gmm_digits_run(n, 10, window_size=200, cutoff=100)
    offsets = {t: m - t for t, m in zip(trace["timestep"], trace["ts_mean"])}
    # per-sample offsets lie in [-20, 20]: their mean has SE <= 20 / sqrt(n) = 0.63, so 5 is
    # > 4 SE above the drift the convexity of 1 - alpha_bar gives at t = 800 (~2 measured).
    assert abs(offsets[800]) <= 5.0, offsets
    K = int(mix.labels.max()) + 1
    p = torch.zeros(K, dtype=torch.float64).index_add_(0, mix.labels, mix.weights)  # exact class law
    # count_k ~ Binomial(n, p_k); z = 5 over 10 classes keeps a false failure under 1e-5
    # (Bonferroni); n p_k >= 70 here, so the normal approximation holds.
    tol = 5.0 * (p * (1 - p) / n).sqrt()
    worst = {name: ((_class_freq(mix, x.double()) - p).abs() / tol).max().item()
             for name, x in (("ddim", x_ddim), ("ts", x_ts), ("w200", x_big))}
    assert worst["ddim"] <= 1.0 and worst["ts"] <= 1.0, worst
    assert worst["w200"] > 1.0, f"w=200, t_c=100 should distort the class law: {worst}"


# -- the data-aware statistic (docs/time_shift.md "Data-aware statistic") ----------------------
# Data x0 = c 1_D + d0 p: p a fixed pattern with mean 0 and unbiased variance 1, c the two-level
# mixture above. E[x0 | x_t] = E[c | mean(x_t)] 1 + d0 p, so the exact eps leaves the centred noise
# e (orthogonal to 1 and p) untouched under DDIM, and var_hat(x_t) = ab_t d0^2 + (1 - ab_t) var_hat(e)
# exactly: the reference (1 - ab) + ab Var_data with Var_data = d0^2 is met at every grid time.
D0 = 0.8  # Var_data = 0.64: far from negligible at small t


def _pattern(D: int) -> torch.Tensor:
    p = torch.sin(torch.arange(D, dtype=torch.float64) * 0.37) + 0.3 * torch.cos(torch.arange(D, dtype=torch.float64) * 1.9)
    p = p - p.mean()
    return p / sample_variance(p[None]).sqrt()  # (D,), mean 0, unbiased variance 1


def patterned_eps_fn(ab_table: torch.Tensor, D: int):
    p = _pattern(D)

    def eps(x, t, cond=None):
        B = x.shape[0]
        ab = ab_table[torch.as_tensor(t).reshape(-1).expand(B)].reshape(B, 1)
        flat = x.reshape(B, -1).double()
        m = flat.mean(1, keepdim=True)
        var_m = ab * S2 + (1 - ab) / D
        r = torch.softmax(-0.5 * (m - ab.sqrt() * MU) ** 2 / var_m, 1)
        c_hat = (r * (MU + ab.sqrt() * S2 * (m - ab.sqrt() * MU) / var_m)).sum(1, keepdim=True)
        x0 = c_hat + D0 * p[None, :]
        return ((flat - ab.sqrt() * x0) / (1 - ab).sqrt()).reshape(x.shape).to(x.dtype)

    return eps, p


def patterned_start(B: int, D: int, S: float, ab0: float, seed: int = 0) -> torch.Tensor:
    """x_t0 = sqrt(ab0) (c 1 + d0 p) + sqrt(1 - ab0) e with e orthogonal to 1 and p, var_hat(e) = S."""
    g = torch.Generator().manual_seed(seed)
    p = _pattern(D)
    e = torch.randn(B, D, generator=g, dtype=torch.float64)
    e = e - e.mean(1, keepdim=True)
    e = e - (e @ p)[:, None] * p[None, :] / (p @ p)
    e = e * (S / sample_variance(e)).sqrt()[:, None]
    c = MU[torch.randint(0, 2, (B,), generator=g)] + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)
    return ab0**0.5 * (c[:, None] + D0 * p[None, :]) + (1 - ab0) ** 0.5 * e


def test_data_aware_never_shifts_an_exact_sampler():
    """Correct start, w = 40, t_c = 0 (shift everywhere): with Var_data = d0^2 every selection
    is the grid time and the output equals DDIM bit for bit; the paper statistic shifts."""
    sched = TimeShiftScheduler.from_config(CFG, window_size=40, cutoff=0, data_var=D0**2)
    sched.set_timesteps(10)
    ab = sched.alphas_cumprod.double()
    eps, _ = patterned_eps_fn(ab, 1024)
    x_T = patterned_start(8, 1024, 1.0, float(ab[sched.timesteps[0]]))
    x_ts, trace = sample_time_shift(eps, x_T, sched)
    assert trace["ts_min"] == trace["timestep"] and trace["ts_max"] == trace["timestep"], trace
    ddim = TimeShiftScheduler.from_config(CFG, enabled=False)
    ddim.set_timesteps(10)
    x_ddim, _ = sample_time_shift(eps, x_T, ddim)
    assert torch.equal(x_ts, x_ddim)
    paper = TimeShiftScheduler.from_config(CFG, window_size=40, cutoff=0)
    paper.set_timesteps(10)
    _, trace_p = sample_time_shift(eps, x_T, paper)
    # the paper's 1 - ab misses ab d0^2: it reads the samples as too noisy and shifts them up
    offsets = [m - t for m, t in zip(trace_p["ts_mean"], trace_p["timestep"])]
    assert offsets[0] == 0 and all(o > 0 for o in offsets[1:-1]) and offsets[-1] == 0, offsets  # t = 0 is not > t_c


def _injected_run(delta: int, data_var, enabled=True, D=3072):
    """Grid 900..0, w = 80, t_c = 0. The error: after the first step the state is replaced by an
    exact sample of q(x_{800 + delta}) while the grid says 800 (the state is "at the wrong time",
    the error Time-Shift is meant to detect). Returns {t: (var_hat / reference, t_model rows)}."""
    grid = list(range(900, -1, -100))
    sched = TimeShiftScheduler.from_config(CFG, window_size=80, cutoff=0, data_var=data_var, enabled=enabled)
    sched.set_timesteps(timesteps=grid)
    ab = sched.alphas_cumprod.double()
    eps, _ = patterned_eps_fn(ab, D)
    x = patterned_start(8, D, 1.0, float(ab[900]))
    out = {}
    for k, t in enumerate(grid):
        if k == 1:
            x = patterned_start(8, D, 1.0, float(ab[800 + delta]), seed=1)
        ref = (1 - ab[t]) + ab[t] * D0**2
        t_s = sched.model_timesteps(x, t)
        out[t] = ((sample_variance(x) / ref).mean().item(), t_s)
        x = sched.step(eps(x, t_s), t, x, model_timesteps=t_s).prev_sample
    return out


@pytest.mark.parametrize("delta", [30, -30])
def test_data_aware_corrects_an_injected_error(delta):
    """The data-aware TS finds the true time at the injected step (t_s = 800 + delta for every
    sample) and from then on is exact: var_hat / reference = 1 at every later step and no further
    shift. DDIM carries the error on; the paper's statistic misreads the data term and keeps
    shifting (its variance ratio drifts away from 1)."""
    ts = _injected_run(delta, D0**2)
    ddim = _injected_run(delta, D0**2, enabled=False)
    paper = _injected_run(delta, None)
    assert (ts[800][1] == 800 + delta).all()
    later = [t for t in ts if t < 800]
    assert all((ts[t][1] == t).all() for t in later)
    # float64 state, float32 alpha_bar tables: 1e-6 is round-off
    assert all(abs(ts[t][0] - 1) < 1e-6 for t in later), {t: r for t, (r, _) in ts.items()}
    assert max(abs(ddim[t][0] - 1) for t in later) > 1e-3, ddim
    assert max(abs(paper[t][0] - 1) for t in later) > 1e-2, paper
    assert all((paper[t][1] != t).all() for t in later if t > 0)
