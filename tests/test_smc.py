"""SMC bookkeeping (gensample.core.smc; Douc, Cappe & Moulines 2005; docs/fkc.md)."""

import math

import pytest
import torch

from gensample.core import smc



def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_normalized_weights_and_ess_basic():
    lw = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf], [1000.0, 1000.0, 0.0, 0.0]])
    w = smc.normalized_weights(lw)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))
    ess = smc.effective_sample_size(lw)
    torch.testing.assert_close(ess, torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64))


def test_ess_in_range_and_shift_invariant():
    g = _gen(1)
    lw = torch.randn(50, 64, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None]
    ess = smc.effective_sample_size(lw)
    assert ((ess >= 1.0) & (ess <= 64.0)).all()
    shift = torch.randn(50, 1, generator=g, dtype=torch.float64) * 1e4
    torch.testing.assert_close(smc.effective_sample_size(lw + shift), ess, rtol=1e-9, atol=1e-9)
    w = smc.normalized_weights(lw)
    torch.testing.assert_close(ess, 1.0 / (w**2).sum(1), rtol=1e-9, atol=1e-9)


def test_ess_is_k_after_resampling():
    lw = torch.randn(3, 32, generator=_gen(2), dtype=torch.float64)
    x = torch.arange(96.0)[:, None]
    _, new_lw, _ = smc.resample([x], lw, "systematic", _gen(3))
    torch.testing.assert_close(smc.effective_sample_size(new_lw), torch.full((3,), 32.0, dtype=torch.float64))


@pytest.mark.parametrize("K", [7, 100, 1000])
def test_systematic_counts_are_floor_or_ceil(K):
    lw = torch.randn(20, K, generator=_gen(K), dtype=torch.float64) * 2
    idx = smc.resample_indices(lw, "systematic", _gen(K + 1))
    expected = K * smc.normalized_weights(lw)  # (G, K)
    for g in range(20):
        counts = torch.bincount(idx[g], minlength=K).double()
        assert ((counts >= expected[g].floor() - 1e-9) & (counts <= expected[g].ceil() + 1e-9)).all()


def test_residual_keeps_floor_copies():
    K = 50
    lw = torch.randn(10, K, generator=_gen(4), dtype=torch.float64) * 2
    idx = smc.resample_indices(lw, "residual", _gen(5))
    floor = (K * smc.normalized_weights(lw)).floor()
    for g in range(10):
        assert (torch.bincount(idx[g], minlength=K).double() >= floor[g]).all()


@pytest.mark.parametrize("scheme", smc.SCHEMES)
def test_resampling_is_unbiased(scheme):
    # E[count_k] = K w_k for every scheme. Over R repeats the mean count has sd
    # <= sqrt(K w (1 - w) / R); z = 5 over 8 categories keeps a false failure < 1e-5.
    K, R = 8, 4000
    w = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.08, 0.07, 0.05, 0.0], dtype=torch.float64)
    lw = w.log().expand(R, K).clone()
    idx = smc.resample_indices(lw, scheme, _gen(6))
    counts = torch.stack([torch.bincount(r, minlength=K) for r in idx]).double()  # (R, K)
    tol = 5.0 * (K * w * (1 - w) / R).sqrt() + 1e-12
    err = (counts.mean(0) - K * w).abs()
    assert (err <= tol).all(), f"{scheme}: mean counts {counts.mean(0).tolist()} vs {(K * w).tolist()}"
    assert counts[:, -1].sum() == 0, "a zero-weight particle was selected"


@pytest.mark.parametrize("scheme", smc.SCHEMES)
def test_resampling_never_crosses_groups(scheme):
    G, K = 6, 10
    lw = torch.randn(G, K, generator=_gen(7), dtype=torch.float64) * 3
    x = torch.arange(G * K).float()[:, None].expand(G * K, 3)  # row value = its own index
    (out,), new_lw, local = smc.resample([x], lw, scheme, [_gen(10 + g) for g in range(G)])
    group_of = (out[:, 0].long() // K).reshape(G, K)
    assert (group_of == torch.arange(G)[:, None]).all()
    assert ((local >= 0) & (local < K)).all()
    assert (new_lw == 0).all()


def test_uniform_weights_are_identity_and_mask_respected():
    G, K = 3, 5
    x = torch.arange(G * K).float()[:, None]
    lw = torch.zeros(G, K, dtype=torch.float64)
    (out,), _, _ = smc.resample([x], lw, "multinomial", _gen(0))
    assert torch.equal(out, x)
    # systematic with (u + j)/K on uniform weights is the identity even when it draws
    idx = smc.resample_indices(lw, "systematic", _gen(1))
    assert torch.equal(idx, torch.arange(K).expand(G, K))
    lw = torch.tensor([[0.0, -50, -50, -50, -50]] * G, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    (out,), new_lw, _ = smc.resample([x], lw, "systematic", _gen(2), mask=mask)
    assert torch.equal(out[5:10], x[5:10]) and (new_lw[1] == lw[1]).all()
    assert (out[:5] == 0).all() and (out[10:] == 10).all()
    assert (new_lw[0] == 0).all() and (new_lw[2] == 0).all()


def test_reproducible_with_generator():
    lw = torch.randn(4, 16, generator=_gen(8), dtype=torch.float64)
    for scheme in smc.SCHEMES:
        assert torch.equal(smc.resample_indices(lw, scheme, _gen(9)), smc.resample_indices(lw, scheme, _gen(9)))


def test_extreme_log_weights_stay_finite():
    lw = torch.tensor([[1e300, -1e300, 0.0], [-1e308, -1e308, -1e308]], dtype=torch.float64)
    assert torch.isfinite(smc.normalized_weights(lw)).all()
    ess = smc.effective_sample_size(lw)
    torch.testing.assert_close(ess, torch.tensor([1.0, 3.0], dtype=torch.float64))
    idx = smc.resample_indices(lw, "systematic", _gen(0))
    assert (idx[0] == 0).all()


def test_draw_one_per_group():
    lw = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, -math.inf, 0.0]], dtype=torch.float64)
    assert smc.draw_one_per_group(lw, _gen(0)).tolist() == [0, 2]


@pytest.mark.parametrize(
    "bad, err",
    [
        (torch.zeros(4), ValueError),
        (torch.tensor([[float("nan"), 0.0]]), ValueError),
        (torch.tensor([[-math.inf, -math.inf]]), ValueError),
        ([[0.0, 1.0]], TypeError),
    ],
)
def test_bad_log_weights(bad, err):
    with pytest.raises(err, match="log_w"):
        smc.effective_sample_size(bad)


def test_bad_scheme_and_generators():
    lw = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="scheme must be one of"):
        smc.resample_indices(lw, "bogus")
    with pytest.raises(ValueError, match="one per group"):
        smc.resample_indices(lw + torch.tensor([0.0, 1.0, 2.0]), "systematic", [_gen(0)] * 3)
    with pytest.raises(ValueError, match="G\\*K"):
        smc.resample([torch.zeros(5, 1)], lw + torch.tensor([0.0, 1.0, 2.0]))
