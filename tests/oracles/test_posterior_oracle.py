"""Exact posterior of a Gaussian-mixture prior under y = A x + sigma n, and the samplers against it
(docs/stsl.md, "Oracle results")."""

import math

import numpy as np
import pytest
import torch

from gensample.models.gmm import GaussianMixture
from gensample.models.posterior import GaussianMixturePosterior, posterior_distance
from gensample.samplers.operators import MatrixOperator, random_inpaint
from gensample.samplers.stsl import reconstruct
from gensample.zoo.analytic import gmm2d, gmm2d_mixture

torch.set_num_threads(1)


def grid_posterior(mix, A, y, sigma, lim=9.0, n=601):
    """Brute force on a 2-D grid: density prop. to p(x) N(y; A x, sigma^2 I); returns mean, cov, weights."""
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    xx = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)  # (n^2, 2)
    loglik = -0.5 * ((y[None] - xx @ A.T) ** 2).sum(1) / sigma**2
    logp = mix.log_prob(xx) + loglik
    p = torch.softmax(logp, 0)
    mean = (p[:, None] * xx).sum(0)
    d = xx - mean
    cov = (p[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
    w = (p[:, None] * mix.responsibilities(xx)).sum(0)
    return mean, cov, w


@pytest.mark.parametrize("A", [[[1.0, 0.0]], [[0.6, 0.8]], [[1.0, 0.5], [-0.3, 1.0]]])
def test_closed_form_matches_grid(A):
    mix = gmm2d_mixture()
    A = torch.tensor(A, dtype=torch.float64)
    y = A @ torch.tensor([0.5, 3.2], dtype=torch.float64) + 0.1
    post = GaussianMixturePosterior(mix, A, y, 0.5)
    mean, cov, w = grid_posterior(mix, A, y, 0.5)
    torch.testing.assert_close(post.mean(), mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(post.covariance(), cov, atol=1e-6, rtol=0)
    torch.testing.assert_close(post.weights, w, atol=1e-6, rtol=0)


def test_gaussian_prior_formula():
    """Single component: Sigma_post = (Sigma^-1 + A^T A / s^2)^-1, mu_post = Sigma_post (Sigma^-1 mu + A^T y / s^2)."""
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture([1.0], torch.randn(1, 6, generator=g, dtype=torch.float64), [0.7])
    A = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.randn(4, generator=g, dtype=torch.float64)
    post = GaussianMixturePosterior(mix, A, y, 0.3)
    prec = torch.eye(6, dtype=torch.float64) / 0.49 + A.T @ A / 0.09
    cov = torch.linalg.inv(prec)
    torch.testing.assert_close(post.covariance(), cov)
    torch.testing.assert_close(post.mean(), cov @ (mix.means[0] / 0.49 + A.T @ y / 0.09))


def test_noised_posterior_eps_is_exact_score():
    """eps(x, ab) = -sqrt(1 - ab) grad log p_t(x | y), checked against autograd of log_prob."""
    post = GaussianMixturePosterior(gmm2d_mixture(), torch.tensor([[0.6, 0.8]], dtype=torch.float64), torch.tensor([2.9]), 0.4)
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    ab = 0.3
    (grad,) = torch.autograd.grad(post.log_prob(x, ab).sum(), x)
    torch.testing.assert_close(post.eps(x.detach(), ab), -math.sqrt(1 - ab) * grad)


def test_user_errors():
    mix = gmm2d_mixture()
    with pytest.raises(ValueError, match="A must have shape"):
        GaussianMixturePosterior(mix, torch.ones(1, 3), torch.ones(1), 0.1)
    with pytest.raises(ValueError, match="y must have 1 entries"):
        GaussianMixturePosterior(mix, torch.ones(1, 2), torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="sigma must be"):
        GaussianMixturePosterior(mix, torch.ones(1, 2), torch.ones(1), 0.0)


# -- gold sampler: DDPM on the posterior's analytic denoiser ----------------------------------
def gold_run(n, steps, tmp_path):
    import gensample

    a = np.array([[0.6, 0.8]])
    path = tmp_path / "A.npy"
    np.save(path, a)
    res = gensample.run("gold", model="gmm2d", task=f"matrix:{path}", noise_std=0.5, from_sample=3,
                        num_samples=n, steps=steps, progress=False, device="cpu")
    post = GaussianMixturePosterior(gmm2d_mixture(), torch.from_numpy(a), torch.from_numpy(res.samples["y"][0]).double(), 0.5)
    return torch.from_numpy(res.x).double(), post


@pytest.mark.parametrize("n, steps", [(800, 200), pytest.param(4000, 1000, marks=pytest.mark.slow)])
def test_gold_matches_exact_posterior(n, steps, tmp_path):
    x, post = gold_run(n, steps, tmp_path)
    se = post.variance().sqrt() / math.sqrt(n)
    # 4 SE per coordinate (2 coordinates): a false failure has probability < 2e-4
    z_mean = ((x.mean(0) - post.mean()).abs() / se).max().item()
    assert z_mean < 4.0, f"gold mean off by {z_mean:.2f} SE"
    # sample covariance: relative SE ~ sqrt(2 / n); allow 4 SE (20 % at n = 800, 9 % at n = 4000)
    rel = (torch.cov(x.T) - post.covariance()).norm() / post.covariance().norm()
    assert rel < 4 * math.sqrt(2 / n), f"gold covariance relative Frobenius error {rel:.3f}"
    d = posterior_distance(x, post)
    assert d.weight_z < 4.0, f"gold mixture weights off by {d.weight_z:.2f} SE"
    # power: the prior (what ignoring y gives) fails the same mean check
    prior = gmm2d_mixture().sample(n, torch.Generator().manual_seed(0))
    z_prior = ((prior.mean(0) - post.mean()).abs() / se).max().item()
    assert z_prior > 4.0


# -- DPS / PSLD / STSL: loose checks at equal paper NFE ----------------------------------------
CASES = {
    "matrix": (MatrixOperator((2,), [[0.6, 0.8]]), torch.tensor([[-4.0, 0.0]], dtype=torch.float64)),
    "inpaint": (random_inpaint((2,), missing=0.5, seed=1), torch.tensor([[0.3, 3.5]], dtype=torch.float64)),
}
METHODS = {  # equal paper NFE (100)
    "stsl": dict(steps=20, inner_steps=5),
    "dps": dict(steps=100, zeta=1.0, ddim_eta=1.0),
    "psld": dict(steps=100, omega=1.0, gamma=0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", sorted(METHODS) + ["unconditional"])
def test_methods_land_near_the_posterior(method, case):
    """Mean along the measured directions within 0.25 prior std of the exact posterior mean, and the
    top-weight posterior mode holds the plurality of samples. Unconditional DDIM must fail."""
    op, x_true = CASES[case]
    sigma = 0.3
    y = op.measure(x_true, sigma, [torch.Generator().manual_seed(0)])
    post = GaussianMixturePosterior(gmm2d_mixture(), op.matrix(), y.reshape(-1), sigma)
    if method == "unconditional":
        x, _ = reconstruct(gmm2d(), op, y, "stsl", list(range(200)), steps=20, inner_steps=1, data_weight=0.0,
                           trace_weight=0.0, init="gaussian")
    else:
        x, _ = reconstruct(gmm2d(), op, y, method, list(range(200)), **METHODS[method])
    d = posterior_distance(x, post)
    ok = d.mean_err_measured < 0.25 and d.top_mode_plurality
    assert ok == (method != "unconditional"), f"{method}/{case}: {d.as_dict()}"


@pytest.mark.slow
def test_gold_on_gmm_digits_random_inpainting():
    import gensample

    res = gensample.run("gold", model="gmm-digits", task="inpaint-random", missing=0.5, noise_std=0.1, from_sample=1,
                        num_samples=2000, steps=1000, progress=False, device="cpu")
    op = random_inpaint((1, 8, 8), missing=0.5, seed=0)
    from gensample.zoo.analytic import gmm_digits_mixture

    post = GaussianMixturePosterior(gmm_digits_mixture(), op.matrix(), torch.from_numpy(res.samples["y"][0]).double().reshape(-1), 0.1)
    x = torch.from_numpy(res.x).double().reshape(2000, -1)
    se = post.variance().sqrt() / math.sqrt(2000)
    z = ((x.mean(0) - post.mean()) / se).abs().max().item()
    assert z < 4.5, f"mean off by {z:.2f} SE (64 coordinates)"
    assert posterior_distance(x.reshape(2000, 1, 8, 8), post).weight_z < 4.5


def test_gold_on_gmm_digits_random_inpainting_fast():
    """Default-run version of the slow gmm-digits gold check: n = 300 draws, 100 DDPM steps. Mean of
    all 64 coordinates within 4.5 SE (Bonferroni over 64: false-fail < 5e-4) and mixture weights
    within 4.5 SE. Power: the prior's mean fails the same mean check."""
    import gensample
    from gensample.zoo.analytic import gmm_digits_mixture

    n = 300
    res = gensample.run("gold", model="gmm-digits", task="inpaint-random", missing=0.5, noise_std=0.1, from_sample=1,
                        num_samples=n, steps=100, progress=False, device="cpu")
    op = random_inpaint((1, 8, 8), missing=0.5, seed=0)
    post = GaussianMixturePosterior(gmm_digits_mixture(), op.matrix(), torch.from_numpy(res.samples["y"][0]).double().reshape(-1), 0.1)
    x = torch.from_numpy(res.x).double().reshape(n, -1)
    se = post.variance().sqrt() / math.sqrt(n)
    z = ((x.mean(0) - post.mean()) / se).abs().max().item()
    assert z < 4.5, f"mean off by {z:.2f} SE (64 coordinates)"
    assert posterior_distance(x.reshape(n, 1, 8, 8), post).weight_z < 4.5
    prior = gmm_digits_mixture().sample(n, torch.Generator().manual_seed(0)).reshape(n, -1)
    assert ((prior.mean(0) - post.mean()) / se).abs().max().item() > 4.5
