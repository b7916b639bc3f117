"""The analytic Gaussian mixture is the oracle for every continuous sampler: test it hard."""

import json
import math

import pytest
import torch

from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.gmm import GaussianMixture, GMMUNet
from gensample.zoo.analytic import gmm2d_mixture, gmm_digits_mixture


def _mix3d():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2
    return GaussianMixture([0.2, 0.5, 0.3], means, [0.3, 0.7, 1.1], labels=[0, 1, 1])


@pytest.mark.parametrize("ab", [1.0, 0.7, 0.05])
@pytest.mark.parametrize("mix", [gmm2d_mixture, _mix3d], ids=["gmm2d", "image-shaped"])
def test_score_equals_autograd_of_log_prob(mix, ab):
    m = mix()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *m.event_shape, generator=g, dtype=torch.float64) * 3
    x.requires_grad_(True)
    lp = m.log_prob(x, ab).sum()
    (grad,) = torch.autograd.grad(lp, x)
    torch.testing.assert_close(m.score(x.detach(), ab), grad, rtol=1e-9, atol=1e-10)
    # class-conditional score = grad of the sub-mixture's log density
    labels = torch.ones(16, dtype=torch.long) if m.num_classes > 1 else None
    if labels is not None:
        sub = m.conditional(1)
        (g1,) = torch.autograd.grad(sub.log_prob(x, ab).sum(), x)
        torch.testing.assert_close(m.score(x.detach(), ab, labels), g1, rtol=1e-9, atol=1e-10)


def test_log_prob_normalised_on_grid():
    m = gmm2d_mixture()
    xs = torch.linspace(-10, 10, 801, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    h = (xs[1] - xs[0]).item()
    for ab in (1.0, 0.3):
        mass = m.log_prob(pts, ab).exp().sum().item() * h * h
        assert abs(mass - 1) < 1e-6


@pytest.mark.parametrize("ab", [0.9, 0.2])
def test_noised_moments_match_monte_carlo(ab):
    """q_t = law of sqrt(ab) x0 + sqrt(1-ab) eps: exact mean/cov vs MC, tolerance from n."""
    m = gmm2d_mixture()
    n = 200_000
    g = torch.Generator().manual_seed(3)
    x0 = m.sample(n, g)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    mean_exact = math.sqrt(ab) * m.mean()
    cov_exact = ab * m.covariance() + (1 - ab) * torch.eye(2, dtype=torch.float64)
    se = (cov_exact.diagonal() / n).sqrt()
    assert ((xt.mean(0) - mean_exact).abs() <= 5 * se).all()
    cov_mc = torch.cov(xt.T)
    # SE of a covariance entry ~ sqrt((s_ii s_jj + s_ij^2)/n) (Gaussian approx; 5x margin for tails)
    se_cov = ((cov_exact.diagonal()[:, None] * cov_exact.diagonal()[None] + cov_exact**2) / n).sqrt()
    assert ((cov_mc - cov_exact).abs() <= 5 * se_cov).all()
    # the noised log-density integrates the MC histogram: compare via mean log-likelihood
    ll_exact_model = m.log_prob(xt[:20000], ab).mean()
    ll_wrong_model = m.log_prob(xt[:20000], min(1.0, ab + 0.05)).mean()
    assert ll_exact_model > ll_wrong_model


def test_exact_eps_is_tweedie_consistent():
    """E[eps | x_t] from the oracle equals the MC regression of eps on x_t (binned, 1-D)."""
    m = GaussianMixture([0.5, 0.5], [[-2.0], [2.0]], [0.3, 0.8])
    ab, n = 0.5, 400_000
    g = torch.Generator().manual_seed(0)
    x0 = m.sample(n, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    bins = torch.linspace(-2, 2, 9, dtype=torch.float64)
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (xt[:, 0] >= lo) & (xt[:, 0] < hi)
        centre = xt[sel]
        pred = m.eps(centre, ab).mean()
        mc = eps[sel].mean()
        se = eps[sel].std() / sel.sum().sqrt()
        assert abs(pred - mc) <= 5 * se + 1e-3, (lo.item(), pred.item(), mc.item())


def test_gmm_unet_matches_exact_eps_and_signature():
    m = _mix3d()
    ab = alphas_cumprod_from_config({})
    unet = GMMUNet(m, ab)
    x = torch.randn(4, 1, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    out = unet(x, t, class_labels=torch.tensor([0, 1, 2, 1])).sample
    ref = m.eps(x.double(), ab[t], torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(out, ref.float())
    assert unet(x, 500, return_dict=False)[0].shape == x.shape
    assert unet.config.num_class_embeds == 3 and unet.config.in_channels == 1


def test_sampling_and_conditionals():
    m = gmm2d_mixture()
    g = torch.Generator().manual_seed(0)
    x = m.sample(50_000, g, label=2)
    comp = m.assign(x)
    # class-2 components only; a handful of far-tail points are closer to the other modes
    assert (m.labels[comp] == 2).double().mean() > 0.999
    torch.testing.assert_close(x.mean(0), m.mean(2), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="class_label"):
        m.conditional(7)


def test_digits_mixture_shape_and_range():
    m = gmm_digits_mixture()
    assert m.event_shape == (1, 8, 8) and m.num_classes == 10
    assert m.means.min() >= -1 - 1e-9 and m.means.max() <= 1 + 1e-9
    assert torch.isclose(m.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "spec, msg",
    [
        ({"weights": [1.0], "means": [[0.0]]}, "lacks key"),
        ({"weights": [1.0, 2.0], "means": [[0.0]], "stds": [1.0]}, "means must have shape"),
        ({"weights": [-1.0], "means": [[0.0]], "stds": [1.0]}, "weights must be > 0"),
        ({"weights": [1.0], "means": [[0.0]], "stds": [0.0]}, "stds must be > 0"),
        ({"weights": [1.0], "means": [[0.0]], "stds": [1.0], "extra": 1}, "unknown key"),
        ([1, 2, 3], "JSON object"),
    ],
)
def test_bad_json_mixtures(tmp_path, spec, msg):
    f = tmp_path / "m.json"
    f.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=msg):
        GaussianMixture.from_json(f)
