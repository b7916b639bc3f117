"""The schedule flaw and its OMS fix on the shipped digits-flawed models (docs/oms.md "Results").

Statistics are over per-image mean brightness. A fraction p_hat over n images has sd
sqrt(p (1 - p) / n) <= sqrt(0.25 / n); thresholds sit >= 3.5 sd from the expected value on both
sides, so the plain-DDIM baseline must fail the OMS assertion and vice versa. Means are compared
with their standard errors measured from the same samples (sd / sqrt(n)), at 4 standard errors
of the difference (a false failure has probability < 1e-4 per comparison).
"""

import math

import numpy as np
import pytest
import torch

from gensample import api
from gensample.models.loading import load_model
from gensample.models.oms_training import LEVELS
from gensample.samplers.oms import (OMSConfig, base_scheduler, first_alpha_bar, load_oms_module,
                                    oms_initial_latents)



@pytest.fixture(scope="module")
def flawed():
    return load_model("digits-flawed")


def _means(sampler, n, steps, **opts):
    res = api.run(sampler=sampler, model="digits-flawed", num_samples=n, steps=steps, seed=0, progress=False,
                  device="cpu", **opts)
    return res.samples["x"].mean(axis=(1, 2, 3)), res.samples.get("oms_class")


def _frac(m):
    return float((np.abs(m) > 0.3).mean())


def test_flaw_and_oms_fix_fast():
    """n = 192, 10 DDIM steps (t0 = 901): plain ~0.28, OMS ~0.6 (data 0.64). sd <= 0.036 each."""
    n, steps = 192, 10
    plain, _ = _means("ddim", n, steps)
    oms, cls = _means("oms", n, steps, skip_compare=True)
    assert _frac(plain) < 0.45, f"plain DDIM should regress to mid-grey, frac {_frac(plain):.3f}"
    assert _frac(oms) > 0.48, f"OMS should restore the brightness spread, frac {_frac(oms):.3f}"
    assert oms.std() > plain.std() + 0.1


def _oracle_start_means(model, n, steps, seed=123):
    """Per-image means of the base DDIM sampler started from forward-noised *real* data,
    x_T = sqrt(a) x0 + sqrt(1 - a) eps with x0 ~ brightness digits: the best start any OMS module
    can hand over (OMS's target is exactly this law's low-frequency content); with the classes."""
    from gensample.models.oms_training import brightness_digits
    from gensample.samplers.oms import run_base
    from gensample.samplers.registry import RunContext

    sched, direct = base_scheduler(model, "ddim", steps, {}, "cpu")
    a = first_alpha_bar(sched)
    g = torch.Generator().manual_seed(seed)
    x0, labels = brightness_digits(n, g)
    x_T = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        x = run_base(sched, direct, x_T, model.cond_for(None, n, "cpu"), {"guidance_scale": 1.0, "eta": 0.0}, None,
                     RunContext(sampler="oracle-start"), model.denoiser())
    return x.mean(dim=(1, 2, 3)).numpy(), labels.numpy()


def _se(v):
    return float(np.std(v, ddof=1) / math.sqrt(len(v)))


@pytest.mark.slow
def test_flaw_table_thresholds(flawed):
    """docs/oms.md's table at n = 600, DDIM 50 steps (leading, t0 = 981): fractions with sd <= 0.02
    (plain 0.265 vs < 0.4, OMS 0.654 vs > 0.55: >= 5 sd each way). Per class, the OMS means must
    equal those of the base started from forward-noised real data (measured: -0.515/+0.011/+0.522
    vs -0.511/+0.001/+0.498, within 1.1 standard errors), at 4 standard errors of the difference
    (about 0.08 at ~200 images per class); an OMS step that did nothing would put every class
    near 0, about 0.5 away."""
    n, steps = 600, 50
    plain, _ = _means("ddim", n, steps)
    oms, cls = _means("oms", n, steps, skip_compare=True)
    assert _frac(plain) < 0.4
    assert _frac(oms) > 0.55
    oracle, lab = _oracle_start_means(flawed, n, steps)
    for k in range(len(LEVELS)):
        a, b = oms[cls == k], oracle[lab == k]
        tol = 4 * math.hypot(_se(a), _se(b))
        assert abs(a.mean() - b.mean()) < tol, (k, a.mean(), b.mean(), tol)


def _x_T(model, module, n, label, w=1.0, legacy=False, seed=0):
    sched, _ = base_scheduler(model, "ddim", 50, {}, "cpu")
    a = first_alpha_bar(sched)
    g = torch.Generator().manual_seed(seed)
    x_Tp = torch.randn((n, *model.event_shape), generator=g)
    lab = torch.full((n,), label)
    with torch.no_grad():
        x0_hat = -module(x_Tp, class_labels=lab).sample
        x_T = oms_initial_latents(module, x_Tp, {"class_labels": lab}, {"class_labels": torch.full_like(lab, 3)}, a,
                                  OMSConfig(guidance_scale=w, legacy_variance=legacy), g)
    return a, x0_hat.double(), x_T.double()


@pytest.mark.parametrize("legacy", [False, True])
def test_variance_scale(flawed, legacy):
    """Var(x_T) = 1 - a + a Var(x0_hat) within 4 relative sds of a variance estimate, sqrt(2 / N)
    with N = 256 images * 256 pixels = 65k elements per class (0.55 %, so 2.2 %); the
    variance-as-std bug (ratio 0.944) fails it."""
    module = load_oms_module(None, flawed)
    for k in range(len(LEVELS)):
        a, x0_hat, x_T = _x_T(flawed, module, 256, k, legacy=legacy)
        expect = 1 - a + a * x0_hat.var().item()
        tol = 4 * math.sqrt(2 / x_T.numel())
        ok = abs(x_T.var().item() / expect - 1) < tol
        assert ok != legacy, f"class {k}: Var(x_T) {x_T.var().item():.4f} vs {expect:.4f} (legacy={legacy})"


def test_dc_per_class(flawed):
    """Mean of x_T's per-image DC per class within 0.01 of sqrt(a) level_k (the OMS step's mean); the
    DC's sampling sd is sqrt((1 - a) / (256 n)) = 0.004 at n = 256."""
    module = load_oms_module(None, flawed)
    for k, level in enumerate(LEVELS):
        a, _, x_T = _x_T(flawed, module, 256, k)
        dc = x_T.mean().item()
        assert abs(dc - math.sqrt(a) * level) < 0.01 + 3 * math.sqrt((1 - a) / (256 * 256)), (k, dc)


def test_oms_cfg_steers_brightness():
    """OMS-CFG (w = 1, 3) on the dark and bright classes: dark images get darker, bright brighter,
    and the dark-bright gap widens with w. n = 64 per cell, 10 steps. Each move must exceed 4
    standard errors of the difference, the standard errors measured from the cells' own
    per-image means (the cells share seeds, so treating them as independent overstates the sd
    of a difference: conservative). docs/oms.md measured moves of 0.15-0.42 at n = 128."""
    n, steps = 64, 10
    res, se = {}, {}
    for k in (0, 2):
        for w in (1.0, 3.0):
            m, _ = _means("oms", n, steps, skip_compare=True, oms_class=k, oms_guidance=w)
            res[k, w], se[k, w] = float(m.mean()), _se(m)

    def sd(*cells):
        return math.sqrt(sum(se[c] ** 2 for c in cells))

    assert res[0, 3.0] < res[0, 1.0] - 4 * sd((0, 3.0), (0, 1.0)), (res, se)
    assert res[2, 3.0] > res[2, 1.0] + 4 * sd((2, 3.0), (2, 1.0)), (res, se)
    gap_move = (res[2, 3.0] - res[0, 3.0]) - (res[2, 1.0] - res[0, 1.0])
    assert gap_move > 4 * sd((0, 1.0), (0, 3.0), (2, 1.0), (2, 3.0)), (res, se)
