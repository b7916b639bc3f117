"""FK steering (docs/fk_steering.md): potentials, the DDPM proposal, rewards, the exact Gaussian-mixture
oracle (a quadratic reward tilts a mixture into a mixture) and the digits claim against best-of-8."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample.cli import main
from gensample.core.ddim import x0_from_eps
from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.gmm import GaussianMixture
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG
from gensample.rewards import DigitsClassifierReward, QuadraticReward, resolve_reward
from gensample.samplers.fk_steer import FKSteerConfig, log_potential, sample_fk_steer
from gensample.samplers.fkc import spaced_timesteps

AB = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- 1. the configuration and the potentials ---------------------------------------------------
@pytest.mark.parametrize("field,value", [("lam", -1.0), ("lam", float("nan")), ("potential", "mean"), ("resample_every", 0),
                                         ("ess_threshold", 1.5), ("final", "top"), ("scheme", "bogus")])
def test_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        FKSteerConfig(**{field: value})


def test_potentials_follow_their_definitions():
    """diff telescopes: sum_k log G_k = lambda r_S for any path; max / sum / instantaneous by hand."""
    g = torch.Generator().manual_seed(3)
    r = torch.randn(5, 9, generator=g, dtype=torch.float64)  # 5 paths, 9 steps (last = r(x0))
    lam = 2.5
    total = sum(log_potential("diff", lam, r[:, : k + 1]) for k in range(r.shape[1]))
    torch.testing.assert_close(total, lam * r[:, -1], rtol=0, atol=1e-12)
    k = 4
    torch.testing.assert_close(log_potential("max", lam, r[:, : k + 1]), lam * torch.tensor([max(row[: k + 1].tolist()) for row in r], dtype=torch.float64))
    torch.testing.assert_close(log_potential("sum", lam, r[:, : k + 1]), lam * r[:, : k + 1].sum(1))
    torch.testing.assert_close(log_potential("instantaneous", lam, r[:, : k + 1]), lam * r[:, k])
    torch.testing.assert_close(log_potential("diff", lam, r[:, :1]), lam * r[:, 0])  # r_{-1} = 0: G_0 = exp(lambda r_0)


# -- the exact Gaussian-mixture oracle ---------------------------------------------------------
PRIOR = dict(weights=[0.8, 0.2], means=[[-2.0, 0.0], [2.0, 0.0]], stds=[0.5, 0.5])
CENTER, SCALE, LAM = [1.0, 0.0], 1.5, 1.0


def tilted_mixture(weights, means, stds, c, s, lam):
    """p(x) exp(lambda r(x)), r = -||x - c||^2 / (2 s^2), p = sum pi_k N(mu_k, v_k I): a mixture with
    1/v_k' = 1/v_k + lambda / s^2, mu_k' = v_k' (mu_k / v_k + lambda c / s^2),
    pi_k' ~ pi_k N(c; mu_k, (v_k + s^2 / lambda) I) (docs/fk_steering.md "Oracle"). float64."""
    pi = torch.as_tensor(weights, dtype=torch.float64)
    mu = torch.as_tensor(means, dtype=torch.float64)
    v = torch.as_tensor(stds, dtype=torch.float64) ** 2
    c = torch.as_tensor(c, dtype=torch.float64)
    d = mu.shape[1]
    v_new = 1.0 / (1.0 / v + lam / s**2)
    mu_new = v_new[:, None] * (mu / v[:, None] + lam * c / s**2)
    wide = v + s**2 / lam
    log_pi = pi.log() - 0.5 * d * torch.log(2 * math.pi * wide) - ((c - mu) ** 2).sum(1) / (2 * wide)
    return torch.softmax(log_pi, 0), mu_new, v_new.sqrt()


def test_tilted_mixture_formula_matches_quadrature():
    """The closed form checked on a 1-D grid: normalised p(x) exp(lambda r(x)) vs the mixture."""
    w, mu, sd = [0.3, 0.7], [[-1.0], [2.5]], [0.6, 1.1]
    pi2, mu2, sd2 = tilted_mixture(w, mu, sd, [0.5], 0.8, 2.0)
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    prior = GaussianMixture(w, mu, sd).log_prob(x[:, None]).exp()
    unnorm = prior * torch.exp(-2.0 * (x - 0.5) ** 2 / (2 * 0.8**2))
    dens = unnorm / torch.trapezoid(unnorm, x)
    ref = GaussianMixture(pi2, mu2, sd2).log_prob(x[:, None]).exp()
    assert (dens - ref).abs().max() < 1e-6


def _oracle_run(K, potential, particles=8192, steps=250, seed=0):
    mix = GaussianMixture(**PRIOR)

    def model_fn(x, t):
        ab = AB[int(t)].double()
        eps = mix.eps(x.double(), ab)
        return eps, x0_from_eps(x.double(), eps, ab)

    G = particles // K
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(G * K, 2, generator=gen, dtype=torch.float64)
    cfg = FKSteerConfig(lam=LAM, potential=potential, final="weighted")
    res = sample_fk_steer(model_fn, QuadraticReward(CENTER, SCALE), x_T, cfg, AB, spaced_timesteps(1000, steps),
                          group_size=K, noise_generators=gen, resample_generators=gen)
    per_group = (res.weights * (res.x[:, 0] > 0).double()).reshape(G, K).sum(1)  # weighted mass of {x_1 > 0}
    return per_group.mean().item(), (per_group.std() / math.sqrt(G)).item()


def _exact_right_mass():
    pi, mu, sd = tilted_mixture(PRIOR["weights"], PRIOR["means"], PRIOR["stds"], CENTER, SCALE, LAM)
    phi = 0.5 * (1 + torch.erf(mu[:, 0] / (sd * math.sqrt(2))))  # P(x_1 > 0) per component
    return float((pi * phi).sum())


@pytest.mark.parametrize("K,potential,exact", [(64, "diff", True), (1, "diff", False), (64, "max", False),
                                               (64, "instantaneous", False)])
def test_oracle_mode_mass(K, potential, exact):
    """Mass of the right mode under p exp(lambda r): 0.553 exactly (prior 0.2). Groups are independent,
    so the tolerance is 4 standard errors of the mean over the G = 8192 / K group estimates (the seed
    spread); the DDPM discretisation of the prior (250 steps) moves the mass by ~0.003, well inside.
    diff at K = 64 must land inside; K = 1 (no reweighting: the prior), max and instantaneous
    (other targets, docs/fk_steering.md "Measured") must land outside."""
    truth = _exact_right_mass()
    mean, se = _oracle_run(K, potential)
    off = abs(mean - truth) / (4 * se + 1e-3)
    if exact:
        assert off <= 1.0, f"{potential} K={K}: mass {mean:.4f} vs exact {truth:.4f} (SE {se:.4f})"
    else:
        assert off > 1.0, f"{potential} K={K}: mass {mean:.4f} is within tolerance of exact {truth:.4f}: expected it off"


@pytest.mark.slow
@pytest.mark.parametrize("K", [1, 4, 16, 64, 256])
def test_oracle_convergence_table(K):
    """diff: the error shrinks with K; from K = 16 on it is inside 4 SE (docs/fk_steering.md "Measured")."""
    truth = _exact_right_mass()
    mean, se = _oracle_run(K, "diff", particles=32768)
    if K >= 16:
        assert abs(mean - truth) <= 4 * se + 1e-3, (K, mean, truth, se)
    else:
        assert abs(mean - truth) > 4 * se, (K, mean, truth, se)


# -- the proposal, the resampling policy, the final modes -------------------------------------
def _toy_model():
    mix = GaussianMixture(**PRIOR)

    def model_fn(x, t):
        ab = AB[int(t)].double()
        eps = mix.eps(x.double(), ab)
        return eps, x0_from_eps(x.double(), eps, ab)

    return model_fn


def test_lambda_zero_is_the_ddpm_chain():
    """lambda = 0: no reweighting, and the move is the DDPM posterior step (Ho et al. 2020, eq. 7)
    written out here from alpha_bar, with the same per-particle noise."""
    model_fn, ts, N = _toy_model(), spaced_timesteps(1000, 12), 6
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(N)]
    res = sample_fk_steer(model_fn, QuadraticReward(CENTER, SCALE), x_T, FKSteerConfig(lam=0.0, final="weighted"), AB, ts,
                          group_size=3, noise_generators=gens, resample_generators=[torch.Generator()] * 2)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(N)]
    x = x_T.clone()
    for k, t in enumerate(ts):
        ab_t = AB[int(t)].double()
        ab_s = AB[int(ts[k + 1])].double() if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps, x0 = model_fn(x, t)
        beta = 1 - ab_t / ab_s
        mean = beta * ab_s.sqrt() / (1 - ab_t) * x0 + (1 - ab_s) * (1 - beta).sqrt() / (1 - ab_t) * x
        std = (beta * (1 - ab_s) / (1 - ab_t)).sqrt()
        x = mean + std * torch.stack([torch.randn(2, generator=g, dtype=torch.float64) for g in gens])
    torch.testing.assert_close(res.x, x, rtol=1e-9, atol=1e-9)
    assert torch.equal(res.weights, torch.full((N,), 1 / 3, dtype=torch.float64))
    assert not res.resampled.any()


@pytest.mark.parametrize("every,thr", [(5, 1.0), (1, 0.0), (1, 0.5)])
def test_resampling_policy(every, thr):
    model_fn, ts = _toy_model(), spaced_timesteps(1000, 20)
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    cfg = FKSteerConfig(lam=3.0, resample_every=every, ess_threshold=thr, final="weighted")
    res = sample_fk_steer(model_fn, QuadraticReward(CENTER, SCALE), x_T, cfg, AB, ts, group_size=16,
                          noise_generators=gen, resample_generators=gen)
    steps = torch.arange(len(ts) + 1)
    considered = ((steps + 1) % every == 0) & (steps < len(ts))
    assert not res.resampled[:, ~considered].any()
    if thr == 0.0:
        assert not res.resampled.any()
    elif thr >= 1.0:
        assert res.resampled[:, considered].all()  # continuous rewards: weights never all equal
    else:
        assert torch.equal(res.resampled[:, :-1], res.ess[:, :-1] < thr * 16)
        assert res.resampled.any() and not res.resampled.all()


def test_final_modes():
    model_fn, ts = _toy_model(), spaced_timesteps(1000, 10)
    reward = QuadraticReward(CENTER, SCALE)

    def run(final):
        gen = torch.Generator().manual_seed(2)
        x_T = torch.randn(24, 2, generator=gen, dtype=torch.float64)
        return sample_fk_steer(model_fn, reward, x_T, FKSteerConfig(lam=1.0, final=final), AB, ts, group_size=8,
                               noise_generators=gen, resample_generators=torch.Generator().manual_seed(5))

    weighted, best, one = run("weighted"), run("best"), run("one_per_group")
    torch.testing.assert_close(weighted.weights.reshape(3, 8).sum(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(weighted.rewards[:, -1], reward(weighted.x))  # the last column is r(x0)
    rows = weighted.rewards[:, -1].reshape(3, 8).argmax(1) + 8 * torch.arange(3)
    torch.testing.assert_close(best.x, weighted.x[rows])  # the best final reward of each group
    assert one.x.shape == (3, 2) and best.x.shape == (3, 2)
    resampled = run("resample")
    assert resampled.x.shape == (24, 2) and torch.equal(resampled.weights, torch.full((24,), 1 / 8, dtype=torch.float64))


def test_reward_output_is_checked():
    model_fn, ts = _toy_model(), spaced_timesteps(1000, 3)
    x_T = torch.randn(4, 2, dtype=torch.float64)
    gen = torch.Generator()
    for bad, err in [(lambda x: torch.zeros(3), "shape"), (lambda x: torch.full((4,), float("nan")), "NaN"),
                     (lambda x: [0.0] * 4, "torch.Tensor")]:
        with pytest.raises((ValueError, TypeError), match=err):
            sample_fk_steer(model_fn, bad, x_T, FKSteerConfig(), AB, ts, group_size=2, noise_generators=gen, resample_generators=gen)


# -- 2. rewards --------------------------------------------------------------------------------
def test_quadratic_reward_and_parsing():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    r = resolve_reward("quadratic:c=1;-1,s=2")
    torch.testing.assert_close(r(x), -torch.tensor([0.0 + 9.0, 1.0 + 0.0], dtype=torch.float64) / 8)
    torch.testing.assert_close(resolve_reward("quadratic:c=0.5")(x), -((x - 0.5) ** 2).sum(1) / 2)
    for bad in ["quadratic", "quadratic:s=1", "quadratic:c=a", "quadratic:c=1,s=0", "quadratic:z=1", "digits-classifier:11",
                "digits-classifier:x", "nosuchmodule_xyz:fn", "math:nosuchfn", "", "plainname"]:
        with pytest.raises(ValueError):
            resolve_reward(bad)


def test_digits_classifier_reward_is_log_p_of_the_class():
    from gensample.eval.digits import _net, real_digits

    x = torch.from_numpy(real_digits("test")[0][:32])  # (32, 1, 8, 8) float32 in [-1, 1]
    logp = torch.stack([DigitsClassifierReward(c)(x) for c in range(10)], 1)  # (32, 10)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(32, dtype=torch.float64))
    with torch.no_grad():
        ref = torch.log_softmax(_net()(x.clamp(-1, 1)).double(), 1)
    torch.testing.assert_close(logp, ref)
    assert DigitsClassifierReward(3)(3.0 * x).shape == (32,)  # out-of-range x0_hat is clipped, not refused


def test_module_function_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_h8.py").write_text("import torch\ndef first(x0_hat, prompts=None):\n    return x0_hat.flatten(1)[:, 0].double()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve_reward("my_rewards_h8:first")
    torch.testing.assert_close(fn(torch.tensor([[3.0, 1.0]])), torch.tensor([3.0], dtype=torch.float64))
    out = tmp_path / "o"
    r = _invoke(["run", "--sampler", "fk-steer", "--model", "gmm2d", "--reward", "my_rewards_h8:first", "--particles", "4",
                 "-n", "8", "--steps", "6", "--final", "weighted", "--no-progress", "-o", out])
    assert r.exit_code == 0, r.output
    with np.load(out / "samples.npz") as z:
        x, w, rew, ess = z["x"], z["weights"], z["rewards"], z["ess"]
    assert rew.shape == (8, 7) and ess.shape == (8, 7)
    np.testing.assert_allclose(w.reshape(2, 4).sum(1), 1.0)
    np.testing.assert_allclose(rew[:, -1], x[:, 0], rtol=1e-5, atol=1e-6)  # per-step rewards saved; last = r(x0)
    assert (out / "rewards.png").is_file()
    sys.modules.pop("my_rewards_h8", None)


@pytest.mark.parametrize("extra,flag", [([], "--reward"), (["--reward", "quadratic"], "quadratic"),
                                        (["--reward", "quadratic:c=0", "--lambda", "-1"], "--lambda"),
                                        (["--reward", "quadratic:c=0", "--potential", "mean"], "--potential"),
                                        (["--reward", "quadratic:c=0", "--guidance-scale", "3"], "--fkc-target cfg"),
                                        (["--reward", "quadratic:c=0", "--beta", "2"], "--beta"),
                                        (["--reward", "quadratic:c=0", "--eta", "0"], "--eta"),
                                        (["--reward", "quadratic:c=0", "--reward-every", "0"], "--reward-every"),
                                        (["--reward", "quadratic:c=0", "--window", "3"], "--window")])
def test_cli_usage_errors_exit_2(tmp_path, extra, flag):
    r = _invoke(["run", "--sampler", "fk-steer", "--model", "gmm2d", "--steps", "3", "-n", "4", "--particles", "4", *extra,
                 "-o", tmp_path / "o"])
    assert r.exit_code == 2, r.output
    assert flag in r.output and "Traceback" not in r.output


def test_bare_demo_steers_digits_to_three_and_records_the_reward(tmp_path):
    """`gensample run --sampler fk-steer` alone (the demo: digits-ddpm, reward digits-classifier:3) runs;
    a reward that does not take the model's samples is refused before sampling, naming both."""
    r = _invoke(["run", "--sampler", "fk-steer", "--steps", "5", "--no-progress", "-o", tmp_path / "o"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["config"]["reward"] == "digits-classifier:3" and rec["config"]["model"] == "digits-ddpm"
    r = _invoke(["run", "--sampler", "fk-steer", "--model", "gmm2d", "--steps", "3", "-n", "4", "--particles", "4",
                 "-o", tmp_path / "g"])
    assert r.exit_code == 2 and "does not fit model 'gmm2d'" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "g" / "run.json").exists()


def test_fkc_still_accepts_its_own_final(tmp_path):
    """fk-steer declares --final with a superset of fkc's choices: fkc's one_per_group still parses."""
    r = _invoke(["run", "--sampler", "fkc", "--model", "gmm2d", "--steps", "3", "-n", "2", "--particles", "2",
                 "--final", "one_per_group", "--no-progress", "-o", tmp_path / "o"])
    assert r.exit_code == 0, r.output


# -- 4. digits: steering to a class beats best-of-8 at equal NFE -------------------------------
def _class_rate(path, groups=None, reward=None):
    from gensample.eval.digits import classify

    with np.load(path / "samples.npz") as z:
        x = z["x"]
    if groups is not None:  # best-of-K: the highest reward in each group of K consecutive samples
        r = reward(torch.from_numpy(x)).reshape(groups, -1)
        x = x[(r.argmax(1) + r.shape[1] * torch.arange(groups)).numpy()]
    return float((classify(x) == 3).mean())


def test_digits_fk_steer_beats_best_of_8(tmp_path):
    """12 groups of K = 8 particles, 25 steps, for both (equal NFE: 8 model rows per step per group).
    Tolerance: a one-sided two-proportion z-test, z = 3, with the 12 groups as the sample size (the
    particles of a group are not independent), variances floored at p = 1 / (2 * 12)."""
    common = ["--model", "digits-ddpm", "--steps", "25", "-n", "96", "--no-progress"]
    r = _invoke(["run", "--sampler", "fk-steer", "--reward", "digits-classifier:3", "--particles", "8", *common, "-o", tmp_path / "fk"])
    assert r.exit_code == 0, r.output
    r = _invoke(["run", "--sampler", "ddpm", *common, "-o", tmp_path / "ddpm"])
    assert r.exit_code == 0, r.output
    p_fk = _class_rate(tmp_path / "fk")
    p_bo = _class_rate(tmp_path / "ddpm", groups=12, reward=DigitsClassifierReward(3))
    n = 12
    var = lambda p: min(max(p, 1 / (2 * n)), 1 - 1 / (2 * n)) * (1 - min(max(p, 1 / (2 * n)), 1 - 1 / (2 * n))) / n  # noqa: E731
    assert p_fk - p_bo > 3 * math.sqrt(var(p_fk) + var(p_bo)), (p_fk, p_bo)


@pytest.mark.slow
def test_digits_issue_command(tmp_path):
    """The issue's command as written (64 particles, K = 8, 50 steps) against best-of-8 from 64 DDPM samples."""
    r = _invoke(["run", "--sampler", "fk-steer", "--model", "digits-ddpm", "--reward", "digits-classifier:3", "--particles", "8",
                 "-n", "64", "--no-progress", "-o", tmp_path / "fk"])
    assert r.exit_code == 0, r.output
    r = _invoke(["run", "--sampler", "ddpm", "--model", "digits-ddpm", "--steps", "50", "-n", "64", "--no-progress", "-o", tmp_path / "d"])
    assert r.exit_code == 0, r.output
    assert _class_rate(tmp_path / "fk") > _class_rate(tmp_path / "d", groups=8, reward=DigitsClassifierReward(3))


# -- 5. composition with FKC targets: one loop, the sum of FKC's increment and the reward potential ----
def _tempered_tilted_right_mass(beta, lam, c=CENTER, s=SCALE):
    """Mass of {x_1 > 0} under p(x)^beta exp(lambda r(x)) / Z, exactly, by 1-D quadrature: every mean
    of PRIOR has x_2 = 0 and the components share one isotropic std, so p(x) = N(x_2; 0, v) q(x_1) and
    the x_1-marginal of the target is q(x_1)^beta exp(-lambda (x_1 - c_1)^2 / (2 s^2)) (up to Z)."""
    x = torch.linspace(-12, 12, 240001, dtype=torch.float64)
    q = sum(w * torch.exp(-(x - m[0]) ** 2 / (2 * sd**2)) / (sd * math.sqrt(2 * math.pi))
            for w, m, sd in zip(PRIOR["weights"], PRIOR["means"], PRIOR["stds"]))
    dens = q**beta * torch.exp(-lam * (x - c[0]) ** 2 / (2 * s**2))
    return float(torch.trapezoid(dens * (x > 0), x) / torch.trapezoid(dens, x))


def test_tempered_tilted_mass_matches_the_separated_mode_mixture():
    """The quadrature agrees with the closed form of a tempered mixture of far-apart modes (p^beta ~
    sum pi_k^beta N(mu_k, v / beta) up to a common factor) tilted by the Gaussian reward (a mixture,
    ``tilted_mixture``); the modes here are 8 stds apart, the 1e-3 covers the overlap neglected."""
    for beta in (0.5, 2.0):
        pi = torch.tensor(PRIOR["weights"], dtype=torch.float64) ** beta
        w, mu, sd = tilted_mixture(pi / pi.sum(), PRIOR["means"], [0.5 / math.sqrt(beta)] * 2, CENTER, SCALE, 1.0)
        closed = float((w * 0.5 * (1 + torch.erf(mu[:, 0] / (sd * math.sqrt(2))))).sum())
        assert abs(closed - _tempered_tilted_right_mass(beta, 1.0)) < 1e-3, (beta, closed)


def _anneal_oracle_run(K, beta, lam=1.0, particles=4096, steps=100, seed=0):
    from gensample.samplers.fkc import FKCConfig

    G = particles // K
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(G * K, 2, generator=gen, dtype=torch.float64)
    res = sample_fk_steer(_toy_model(), QuadraticReward(CENTER, SCALE), x_T, FKSteerConfig(lam=lam, final="weighted"), AB,
                          spaced_timesteps(1000, steps), group_size=K, noise_generators=gen, resample_generators=gen,
                          target=FKCConfig(betas=(beta,)))
    per_group = (res.weights * (res.x[:, 0] > 0).double()).reshape(G, K).sum(1)
    return per_group.mean().item(), (per_group.std() / math.sqrt(G)).item()


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_anneal_target_times_reward_oracle(beta):
    """p^beta exp(lambda r): beta = 2 moves the right mode's mass from 0.2 to 0.059, the reward back to
    0.252; beta = 0.5 to 0.334, the reward to 0.684. The loop adds FKC's increment and the reward
    potential; K = 64 must land within 4 SE of the exact mass (SE from the spread over the 64
    independent groups; +1e-3 for the chain's discretisation), and K = 1 (no reweighting: the
    tempered move alone) must not."""
    truth = _tempered_tilted_right_mass(beta, 1.0)
    mean, se = _anneal_oracle_run(64, beta)
    assert abs(mean - truth) <= 4 * se + 1e-3, (beta, mean, truth, se)
    mean1, se1 = _anneal_oracle_run(1, beta)
    assert abs(mean1 - truth) > 4 * se1 + 1e-3, (beta, mean1, truth, se1)


@pytest.mark.slow
@pytest.mark.parametrize("K", [1, 4, 16, 64, 256])
def test_anneal_target_times_reward_convergence_table(K):
    """beta = 2, lambda = 1, 16384 particles, 250 steps: K = 1 and 4 outside 4 SE, 16 .. 256 inside."""
    truth = _tempered_tilted_right_mass(2.0, 1.0)
    mean, se = _anneal_oracle_run(K, 2.0, particles=16384, steps=250)
    if K >= 16:
        assert abs(mean - truth) <= 4 * se + 1e-3, (K, mean, truth, se)
    else:
        assert abs(mean - truth) > 4 * se, (K, mean, truth, se)


def test_lambda_zero_over_an_fkc_target_is_fkc_bit_for_bit():
    """With lambda = 0 the reward potential vanishes and the loop is FKC's own (same increments, ESS,
    resampling, move): sample_fkc with resample='every' gives the same particles and weights."""
    from gensample.samplers.fkc import FKCConfig, sample_fkc

    mix = GaussianMixture(**PRIOR)

    def experts(x, t):  # (2, N, 2): a product of the mixture with itself, betas (1.5, 0.5)
        ab = AB[int(t)].double()
        eps = mix.eps(x.double(), ab)
        x0 = x0_from_eps(x.double(), eps, ab)
        return torch.stack([eps, 0.9 * eps]), torch.stack([x0, x0])

    def run(fn):
        gen = torch.Generator().manual_seed(4)
        x_T = torch.randn(32, 2, generator=gen, dtype=torch.float64)
        return fn(x_T, gen, torch.Generator().manual_seed(9))

    target = FKCConfig(betas=(1.5, 0.5), resample="every", final="weighted")
    ts = spaced_timesteps(1000, 15)
    a = run(lambda x_T, g, rg: sample_fkc(experts, x_T, target, AB, ts, group_size=8, noise_generators=g, resample_generators=rg))
    b = run(lambda x_T, g, rg: sample_fk_steer(experts, QuadraticReward(CENTER, SCALE), x_T, FKSteerConfig(lam=0.0, final="weighted"),
                                               AB, ts, group_size=8, noise_generators=g, resample_generators=rg, target=target))
    assert torch.equal(a.x, b.x) and torch.equal(a.weights, b.weights)
    assert b.resampled[:, :-1].any()  # the FKC weights are active: the identity is not a trivial one


def test_reward_every_holds_the_reward_and_keeps_diff_exact():
    """--reward-every 4 over 10 steps scores at k = 0, 4, 8 and the clean end (4 calls); in between a
    path keeps its last reward (log G = 0 for diff), so without resampling the final log-weights are
    lambda r(x0) exactly."""
    calls = []

    def reward(x0):
        calls.append(x0.shape[0])
        return QuadraticReward(CENTER, SCALE)(x0)

    gen = torch.Generator().manual_seed(5)
    x_T = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    cfg = FKSteerConfig(lam=2.0, reward_every=4, ess_threshold=0.0, final="weighted")
    res = sample_fk_steer(_toy_model(), reward, x_T, cfg, AB, spaced_timesteps(1000, 10), group_size=4,
                          noise_generators=gen, resample_generators=gen)
    assert len(calls) == 4 and res.reward_calls == 4 and res.reward_seconds > 0
    r = res.rewards
    for k in (1, 2, 3, 5, 6, 7, 9):
        assert torch.equal(r[:, k], r[:, k - 1])
    assert not torch.equal(r[:, 4], r[:, 3])
    lw = 2.0 * r[:, -1].reshape(3, 4)
    torch.testing.assert_close(res.log_w, lw - lw.max(1, keepdim=True).values, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="reward_every"):
        FKSteerConfig(reward_every=0)


def test_run_json_reports_reward_cost_and_the_target(tmp_path):
    """run.json: reward calls (S + 1 per batch, or fewer with --reward-every) and seconds, apart from
    the wall time; the FKC target and betas used."""
    out = tmp_path / "o"
    r = _invoke(["run", "--sampler", "fk-steer", "--model", "gmm2d", "--reward", "quadratic:c=1;0,s=1.5", "--particles", "4",
                 "-n", "8", "--steps", "9", "--reward-every", "3", "--fkc-target", "anneal", "--beta", "2", "--no-progress",
                 "-o", out])
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "run.json").read_text())["stats"]
    assert stats["reward_calls"] == 4 and 0 < stats["reward_seconds"]
    assert stats["fk_steer"]["target"] == "anneal" and stats["fk_steer"]["betas"] == [2.0]


def test_python_api_takes_a_reward_callable(tmp_path):
    """gensample.run(sampler="fk-steer", reward=fn): the callable is used as is; run.json names it
    (callable:module.qualname), so the same call in the same folder resumes instead of clashing."""
    import gensample

    seen = []

    def first_coordinate(x0_hat, prompts=None):
        seen.append(prompts)
        return x0_hat.flatten(1)[:, 0].double()

    kw = dict(sampler="fk-steer", model="gmm2d", reward=first_coordinate, particles=4, num_samples=8, steps=6,
              final="weighted", progress=False, output=str(tmp_path / "o"))
    res = gensample.run(**kw)
    assert seen and all(p is None for p in seen)
    np.testing.assert_allclose(res.samples["rewards"][:, -1], res.samples["x"][:, 0], rtol=1e-5, atol=1e-6)
    name = f"callable:{__name__}.test_python_api_takes_a_reward_callable.<locals>.first_coordinate"
    assert str(res.record["config"]["reward"]) == name
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["config"]["reward"] == rec["stats"]["fk_steer"]["reward"] == name
    again = gensample.run(**kw)  # complete already: same configuration, nothing redrawn
    assert np.array_equal(again.samples["x"], res.samples["x"])


# -- 6. proposals: FKC's parts (docs/compose.md); lambda = 0 leaves each part's own result bit for bit ----
KW_D = dict(num_samples=8, steps=12, progress=False, model="digits-ddpm")


def test_fk_steer_lambda_zero_over_proposals_is_the_proposal_bit_for_bit():
    import gensample

    a = gensample.run(sampler="fk-steer", **{"lambda": 0.0}, particles=4, proposal="ddpm", **KW_D)
    assert np.array_equal(a.x, gensample.run(sampler="ddpm", **KW_D).x)
    b = gensample.run(sampler="fk-steer", **{"lambda": 0.0}, particles=4, time_shift=True, window=10, **KW_D)
    ts = gensample.run(sampler="ts-ddim", eta=1.0, window=10, **KW_D).x
    assert np.array_equal(b.x, ts)
    assert not np.allclose(ts, gensample.run(sampler="ddim", eta=1.0, **KW_D).x, atol=1e-3)  # the shift is active
    oms = dict(KW_D, model="digits-flawed", oms_module="default", reward="quadratic:c=0")
    c = gensample.run(sampler="fk-steer", **{"lambda": 0.0}, particles=4, proposal="ddpm", **oms)
    d = gensample.run(sampler="ddpm", **{k: v for k, v in oms.items() if k != "reward"})
    assert np.array_equal(c.x, d.x)
    assert c.record["stats"]["oms"]["t0"] == d.record["stats"]["oms"]["t0"] > 0  # the OMS start ran


@pytest.mark.slow
def test_bench_equal_cost_parts_run_at_tiny_size(tmp_path, monkeypatch):
    """benchmarks/bench_fk_steer.py --part equal-nfe / equal-time at a tiny size: the rows carry the
    quality columns, and at equal wall time best-of-M gets M >= 1 samples per output (the timing
    itself is not checked: the machine may be loaded)."""
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    import bench_fk_steer

    out = tmp_path / "t.json"
    assert bench_fk_steer.main(["--part", "equal-time", "--ks", "2", "--groups", "2", "--steps", "2", "--repeats", "2",
                                "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    rows, setup = stored["equal_time"], stored["equal_time_setup"]
    assert [("K" in r, "M" in r) for r in rows] == [(True, False), (False, True)] and rows[1]["M"] >= 1
    for key in ("class3_rate", "mean_reward", "pairwise_l2", "fid_class3", "wall_s", "reward_s", "class3_rate_sd"):
        assert all(math.isfinite(r[key]) for r in rows), key
    # interleaved repeats: one run per repeat and arm (seed = repeat), the spread and the paired ratio, the load
    assert all([x["seed"] for x in r["runs"]] == [0, 1] and r["wall_s_min"] <= r["wall_s"] <= r["wall_s_max"] for r in rows)
    assert rows[0]["wall_ratio_best_of_M_over_fk"]["median"] > 0
    assert setup["repeats"] == 2 and len(setup["load_average"]) == 4  # start, after calibration, after each repeat
    rows = bench_fk_steer.equal_nfe([2], 2, 2)
    assert [r["method"] for r in rows] == ["fk-steer (resample)", "fk-steer (best)", "best-of-2"]
