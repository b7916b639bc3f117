"""DiSA's central claim in the default run (fast): annealing the head's steps U -> L over the AR
iterations keeps sample quality, while a broken annealed sampler loses it. The slow, full version
(digits-FID at n = 500, 50 -> 5) is tests/test_disa_quality.py; numbers in docs/disa.md."""

import dataclasses
import math

import pytest
import torch

from gensample import api
from gensample.eval.digits import class_accuracy
from gensample.samplers import disa

N, SEED, U, L = 200, 3, 20, 3


def accuracy(sampler, **kw):
    res = api.run(sampler, "mar-digits", num_samples=N, batch_size=N, seed=SEED, device="cpu", progress=False,
                  head_steps_max=U, **kw)
    return class_accuracy(res.x, res.samples["class_labels"]), res.record["stats"]


def _index_not_t(self, num_steps):
    """Bug: the head is fed the respaced index i instead of the training timestep t_i."""
    table = _ORIG(self, num_steps)
    return dataclasses.replace(table, timesteps=torch.arange(len(table)))


def _truncated_chain(self, num_steps):
    """Bug: the annealed step count cuts the U-step chain short (it stops at a noisy t)."""
    full = _ORIG(self, self._broken_upper)
    start = len(full) - num_steps
    return disa.RespacedTable(*[getattr(full, f.name)[start:] for f in dataclasses.fields(full)])


_ORIG = disa.HeadDDPM.table


@pytest.fixture(scope="module")
def full_steps():
    return accuracy("mar")


def _tolerance(acc: float) -> float:
    # Paired runs (same seeds, so positively correlated): sd of the accuracy difference is at most
    # sqrt(2 p (1 - p) / n). z = 4 keeps a false failure below 1e-4. At n = 200, p = 0.95: 0.087.
    p = min(max(acc, 0.5), 0.99)
    return 4.0 * math.sqrt(2 * p * (1 - p) / N)


def test_full_steps_reference_is_good(full_steps):
    acc, _ = full_steps
    # 0.91-0.99 measured with 5-50 head steps (docs/disa.md); 4 binomial sd below 0.91 at n = 200.
    assert acc >= 0.91 - 4 * math.sqrt(0.91 * 0.09 / N), acc


def test_disa_annealed_keeps_class_accuracy(full_steps):
    acc_full, st_full = full_steps
    acc, st = accuracy("disa", head_steps_min=L)
    assert st["head_steps"][0] == [20, 17, 15, 12, 10, 7, 5, 3]  # a real annealed schedule, K = 8
    assert st["head_calls"] < 0.6 * st_full["head_calls"]
    assert acc >= acc_full - _tolerance(acc_full), (acc, acc_full)


@pytest.mark.parametrize("bug", [_index_not_t, _truncated_chain], ids=["index-as-timestep", "truncated-chain"])
def test_broken_annealed_sampler_fails(full_steps, bug, monkeypatch):
    acc_full, _ = full_steps
    monkeypatch.setattr(disa.HeadDDPM, "table", bug)
    monkeypatch.setattr(disa.HeadDDPM, "_broken_upper", U, raising=False)
    acc, _ = accuracy("disa", head_steps_min=L)
    assert acc < acc_full - _tolerance(acc_full), (bug.__name__, acc, acc_full)
