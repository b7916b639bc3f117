"""DiSA step-budget schedules, MAR unmasking and respacing tables: exact oracles (docs/disa.md).

Expected numbers come from the spec (sec. 7 table, sec. 9, sec. 10), which derives them from the
reference code (Qinyu-Allen-Zhao/DiSA, LTH14/mar); none is produced by this package.
"""

import math

import numpy as np
import pytest
import torch

from gensample.core.schedule import alphas_cumprod_from_config
from gensample.samplers.disa import (
    SCHEDULES,
    StepBudgetSchedule,
    budget_index,
    cfg_scale_at,
    head_budget,
    mar_mask_lengths,
    respace,
    respaced_timesteps,
    tokens_per_step,
)

COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


# -- sec. 9.3: exact sequences ---------------------------------------------------------------
@pytest.mark.parametrize("kind, total", [("linear", 1733), ("cosine", 1729), ("two-stage", 1760)])
def test_k64_sums(kind, total):
    seq = StepBudgetSchedule(kind, 50, 5).sequence(64)
    assert sum(seq) == total


def test_k64_linear_ends():
    seq = StepBudgetSchedule("linear", 50, 5).sequence(64)
    assert seq[:5] == [50, 49, 48, 47, 47]
    assert seq[-3:] == [6, 5, 5]


def test_k64_two_stage_halves():
    seq = StepBudgetSchedule("two-stage", 50, 5).sequence(64)
    assert seq == [50] * 32 + [5] * 32


@pytest.mark.parametrize("K, U, L, expected", [
    (4, 50, 15, [50, 38, 26, 15]),
    (5, 25, 15, [25, 22, 20, 17, 15]),
    (5, 50, 15, [50, 41, 32, 23, 15]),
    (8, 50, 5, [50, 43, 37, 30, 24, 17, 11, 5]),  # sec. 8 toy linear
])
def test_linear_sequences(K, U, L, expected):
    assert StepBudgetSchedule("linear", U, L).sequence(K) == expected


def test_linear_is_exact_where_float_int_is_not():
    # docs/disa.md: K=11, U=91, L=1, k=3: int((K-1-k)/(K-1)*M) = 62 in floats, exact floor 63.
    assert int((11 - 1 - 3) / (11 - 1) * 90) == 62
    assert budget_index("linear", 3, 11, 90) == 63
    assert StepBudgetSchedule("linear", 91, 1).steps(3, 11) == 64


def test_cosine_midpoint_is_exact():
    # k = (K-1)/2: (cos(pi/2) + 1)/2 * M = M/2 exactly; float cos(pi/2) is 6e-17, not 0.
    assert budget_index("cosine", 4, 9, 10) == 5
    assert budget_index("cosine", 4, 9, 11) == 5


# -- sec. 9.1, 9.2: endpoints, monotone, bounds, constant -----------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine", "two-stage"])
@pytest.mark.parametrize("K", [2, 3, 5, 8, 11, 64, 257])
@pytest.mark.parametrize("U, L", [(50, 5), (25, 15), (91, 1), (7, 7), (100, 99)])
def test_endpoints_monotone_bounds(kind, K, U, L):
    seq = StepBudgetSchedule(kind, U, L).sequence(K)
    assert seq[0] == U and seq[-1] == L
    assert all(a >= b for a, b in zip(seq, seq[1:])), seq
    assert all(L <= s <= U for s in seq)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_k1_gives_upper(kind):
    assert StepBudgetSchedule(kind, 50, 5).sequence(1) == [50]


def test_constant_means_upper_and_u_equals_l():
    assert StepBudgetSchedule("constant", 50, 5).sequence(64) == [50] * 64
    for kind in SCHEDULES:
        assert StepBudgetSchedule(kind, 12, 12).sequence(9) == [12] * 9


def test_callable_schedule():
    sched = StepBudgetSchedule("callable", fn=lambda k, K: 10 - k)
    assert sched.sequence(4) == [10, 9, 8, 7]
    with pytest.raises(ValueError, match="must return an int >= 1"):
        StepBudgetSchedule("callable", fn=lambda k, K: 0).steps(0, 2)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"kind": "exponential"}, ValueError, "schedule must be one of"),
    ({"upper": 5, "lower": 6}, ValueError, "head_steps_min"),
    ({"lower": 0}, ValueError, "head_steps_min"),
    ({"upper": 2.5}, TypeError, "head_steps_max"),
    ({"kind": "callable"}, TypeError, "fn=callable"),
    ({"switch": 1.5}, ValueError, "switch"),
])
def test_schedule_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        StepBudgetSchedule(**kwargs)


def test_steps_validation():
    sched = StepBudgetSchedule()
    with pytest.raises(ValueError, match="k must be in"):
        sched.steps(8, 8)
    with pytest.raises(ValueError, match="num_iters"):
        sched.steps(0, 0)


# -- sec. 2 / 9.4: MAR unmasking, tokens per step, head budget -------------------------------------
def test_mar_tokens_per_step_n256_k64():
    n = tokens_per_step(256, 64)
    assert sum(n) == 256 and n[0] == 1 and min(n) >= 1
    assert max(n) <= 7  # docs/disa.md: n_k grows from 1 to about 6


def test_toy_tokens_per_step():
    assert tokens_per_step(16, 8) == [1, 1, 1, 2, 3, 2, 3, 3]  # docs/disa.md
    m = mar_mask_lengths(16, 8)
    assert m[0] == 16 and m[-1] == 0


@pytest.mark.parametrize("kind, calls, rows", [
    ("linear", 1733, 5372), ("cosine", 1729, 5015), ("two-stage", 1760, 4655)])
def test_head_budget_n256_k64(kind, calls, rows):
    assert head_budget(StepBudgetSchedule(kind, 50, 5), 256, 64) == (calls, rows)


def test_head_budget_baselines():
    assert head_budget(StepBudgetSchedule("constant", 100, 100), 256, 256) == (25600, 25600)
    assert head_budget(StepBudgetSchedule("constant", 100, 100), 256, 64) == (6400, 25600)


@pytest.mark.parametrize("kind, U, L, calls, rows", [
    ("constant", 50, 50, 400, 800), ("linear", 50, 5, 217, 344), ("cosine", 50, 5, 217, 330),
    ("two-stage", 50, 5, 220, 305), ("constant", 5, 5, 40, 80), ("constant", 27, 27, 216, 432)])
def test_toy_conditions(kind, U, L, calls, rows):
    assert head_budget(StepBudgetSchedule(kind, U, L), 16, 8) == (calls, rows)  # docs/disa.md


def test_timestep_clip_budget():
    # docs/disa.md: the reference DiSA path (t clipped to 950) really makes 1681 calls / 5246 rows.
    assert head_budget(StepBudgetSchedule("linear", 50, 5), 256, 64, timestep_clip=950) == (1681, 5246)


def test_cfg_ramp():
    w = [cfg_scale_at("linear", 3.0, 16, 8, k) for k in range(8)]
    assert w[0] == pytest.approx(1 + 2.0 * 1 / 16) and w[-1] == pytest.approx(1 + 2.0 * 15 / 16)
    assert all(a <= b for a, b in zip(w, w[1:]))
    assert cfg_scale_at("constant", 3.0, 16, 8, 0) == 3.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scale_at("cosine", 3.0, 16, 8, 0)


# -- sec. 9.5: respacing ----------------------------------------------------------------------
def test_respacing_examples():
    assert respaced_timesteps(50)[-3:] == [958, 979, 999]
    assert respaced_timesteps(5) == [0, 250, 500, 749, 999]
    assert respaced_timesteps(1) == [0]
    assert respaced_timesteps(1000) == list(range(1000))


@pytest.mark.parametrize("S, ours, linspace", [(21, 499, 500), (23, 499, 500), (35, 499, 500), (31, 500, 499)])
def test_running_sum_differs_from_linspace(S, ours, linspace):
    # docs/disa.md: the running float sum with banker's round differs from numpy linspace rounding.
    # (The spec lists 31 among the "499" cases; its running sum is 499.5000000000001 -> 500,
    # while linspace gives 499: the two still differ, in the other direction.)
    kept = respaced_timesteps(S)
    lin = set(np.round(np.linspace(0, 999, S)).astype(int).tolist())
    assert ours in kept and ours not in lin and linspace in lin and linspace not in kept


@pytest.mark.parametrize("S, distinct", [(50, 48), (100, 96), (25, 24), (15, 15), (5, 5)])
def test_timestep_clip_merges_top_steps(S, distinct):
    kept = respaced_timesteps(S, timestep_clip=950)
    assert len(kept) == distinct and max(kept) == 950


def test_respacing_validation():
    with pytest.raises(ValueError, match="num_steps must be <="):
        respaced_timesteps(1001)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        respaced_timesteps(0)


@pytest.mark.parametrize("S", [1, 5, 50, 100])
def test_respaced_table_consistent(S):
    ab_train = alphas_cumprod_from_config(COSINE)
    table = respace(ab_train, S)
    # prod (1 - beta_i) over the respaced chain reproduces the training alpha_bar at kept steps.
    assert torch.allclose(torch.cumprod(1 - table.betas, 0), ab_train[table.timesteps], rtol=0, atol=1e-12)
    assert torch.isfinite(table.posterior_log_variance_clipped).all()
    # noiseless consistency of the DDPM posterior mean (Ho et al. eq. 7): with x0 = 1 and
    # x_i = sqrt(ab_i), mu = coef1 + coef2 sqrt(ab_i) must equal sqrt(ab_{i-1}).
    ab, ab_prev, beta = table.alphas_cumprod, table.alphas_cumprod_prev, table.betas
    mean_if_noiseless = table.posterior_mean_coef1 + table.posterior_mean_coef2 * ab.sqrt()
    assert torch.allclose(mean_if_noiseless, ab_prev.sqrt(), atol=1e-12)
    assert math.isclose(float(beta[0]), 1 - float(ab_train[table.timesteps[0]]), abs_tol=1e-15)
