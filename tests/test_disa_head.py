"""DiSA head sampler, scheduler shell and counters (docs/disa.md).

Oracle for the head sampler: with Gaussian token data x0 ~ N(mu, s^2) the exact eps is linear in
x_t, so each respaced DDPM step is x' = A x + B mu + sigma tau xi and the output law is Gaussian
with mean/variance given by a float64 recursion computed here from the spec's formulas,
independently of the sampler code. A wrong table (training betas instead of respaced betas)
must be rejected by the same tolerance.
"""

import math

import pytest
import torch

from gensample.core.schedule import alphas_cumprod_from_config
from gensample.samplers.disa import (
    DiSAConfig,
    HeadDDPM,
    StepBudgetSchedule,
    head_budget,
    respaced_timesteps,
    sample_head,
    sample_mar,
    tokens_per_step,
)
from gensample.schedulers.disa import DiSAHeadScheduler

COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}

AB = alphas_cumprod_from_config(COSINE)  # (1000,) float64
MU = torch.tensor([0.5, -0.5, 0.0, 1.0])


class GaussHead:
    """Exact eps_hat for x0 ~ N(z[:, :C], s^2 I): eps = sqrt(1-a) (x - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def __init__(self, s):
        self.s = s

    def __call__(self, x_t, t, z):
        a = AB[t].to(x_t.dtype)[:, None]
        mu = z[:, : x_t.shape[1]]
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * self.s**2 + 1 - a)


def predicted_law(S, s, tau, respaced=True):
    """Exact output mean coefficient on mu and variance of the DDPM chain (float64 recursion)."""
    ts = respaced_timesteps(S)
    m_coef, var = 0.0, 1.0  # x_T ~ N(0, 1): mean = m_coef * mu
    for i in reversed(range(len(ts))):
        a = float(AB[ts[i]])
        a_prev = float(AB[ts[i - 1]]) if i > 0 else 1.0
        beta = 1 - a / a_prev if respaced else 1 - (a / float(AB[ts[i] - 1]) if ts[i] > 0 else a)
        post_var = beta * (1 - a_prev) / (1 - a)
        c1 = beta * math.sqrt(a_prev) / (1 - a)
        c2 = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        v = a * s**2 + 1 - a
        # eps = e1 x + e0 mu; x0_hat = x / sqrt(a) - sqrt(1/a - 1) eps
        e1, e0 = math.sqrt(1 - a) / v, -math.sqrt(1 - a) * math.sqrt(a) / v
        p, q = 1 / math.sqrt(a) - math.sqrt(1 / a - 1) * e1, -math.sqrt(1 / a - 1) * e0
        A, B = c1 * p + c2, c1 * q
        if i > 0:  # clipped log variance: entry 0 replaced by entry 1 (never used at i = 0)
            sig2 = post_var
        else:
            sig2 = 0.0
        m_coef, var = A * m_coef + B, A * A * var + sig2 * tau**2
    return m_coef, var


@pytest.mark.parametrize("S, s, tau", [(5, 0.3, 1.0), (50, 0.3, 1.0), (25, 0.1, 0.5)])
def test_head_sampler_matches_exact_gaussian_law(S, s, tau):
    n = 10_000
    g = torch.Generator().manual_seed(S)
    z = MU.repeat(n, 1)  # (n, 4)
    x = sample_head(GaussHead(s), z, HeadDDPM(AB).table(S), lambda: torch.randn((n, 4), generator=g),
                    temperature=tau).double()
    m_coef, var = predicted_law(S, s, tau)
    # mean ~ N(m mu, var/n), sample var ~ var (1 +- sqrt(2/n)); z = 5 over 4 dims x 2 stats.
    tol_mean, tol_var = 5 * math.sqrt(var / n), 5 * var * math.sqrt(2 / n)
    assert (x.mean(0) - m_coef * MU.double()).abs().max() <= tol_mean
    assert (x.var(0) - var).abs().max() <= tol_var
    # power: the non-respaced betas (a common respacing bug) predict a law outside the tolerance.
    m_bad, var_bad = predicted_law(S, s, tau, respaced=False)
    assert abs(var_bad - var) > tol_var or (abs(m_bad - m_coef) * MU.abs().max()) > tol_mean


def test_temperature_zero_ignores_later_noise():
    # docs/disa.md: with tau = 0 and the same x_T the output does not depend on the later RNG state.
    n, table = 64, HeadDDPM(AB).table(20)
    z = MU.repeat(n, 1)
    x_T = torch.randn((n, 4), generator=torch.Generator().manual_seed(0))
    outs = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        draws = iter([x_T] + [torch.randn((n, 4), generator=g) for _ in range(len(table))])
        outs.append(sample_head(GaussHead(0.3), z, table, lambda: next(draws), temperature=0.0))
    assert torch.equal(outs[0], outs[1])
    g = torch.Generator().manual_seed(3)
    draws = iter([x_T] + [torch.randn((n, 4), generator=g) for _ in range(len(table))])
    assert not torch.equal(outs[0], sample_head(GaussHead(0.3), z, table, lambda: next(draws), temperature=1.0))


# -- the diffusers scheduler shell ------------------------------------------------------------
def _scheduler_loop(sched, head, z, noises, S):
    sched.set_timesteps(S)
    it = iter(noises)
    x = next(it)
    for t in sched.timesteps:
        eps = head(x, t.expand(x.shape[0]), z)
        x = sched.step(eps, t, x, noise=next(it)).prev_sample
    return x


@pytest.mark.parametrize("clip", [None, 950])
def test_scheduler_equals_pure_sampler(clip):
    n, S = 32, 50
    z = MU.repeat(n, 1)
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn((n, 4), generator=g) for _ in range(S + 1)]
    ddpm = HeadDDPM(AB, timestep_clip=clip)
    it = iter(noises)
    pure = sample_head(GaussHead(0.3), z, ddpm.table(S), lambda: next(it))
    sched = DiSAHeadScheduler(disa_timestep_clip=clip)
    assert torch.equal(_scheduler_loop(sched, GaussHead(0.3), z, noises, S), pure)


def test_scheduler_grid_order_and_config_errors():
    """MAR's respaced grid, stepped in order only; eps prediction and the head's variance types only.
    (The generic diffusers contract, from_config / save-load / step shape / add_noise / betas, is in
    tests/test_scheduler_contract.py.)"""
    sched = DiSAHeadScheduler()
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == [999, 749, 500, 250, 0]
    x = torch.randn(3, 4)
    sched.step(torch.zeros(3, 4), 999, x, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not the expected"):
        sched.step(torch.zeros(3, 4), 999, x)
    with pytest.raises(ValueError, match="prediction_type"):
        DiSAHeadScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="variance_type"):
        DiSAHeadScheduler(variance_type="fixed_large")


# -- counters (docs/disa.md) ------------------------------------------------------------------
class FakeBackbone(torch.nn.Module):
    """z = [tokens, mask, label] per slot: cheap, deterministic, depends on its inputs."""

    def forward(self, tokens, mask, class_labels):
        lab = class_labels.float()[:, None, None].expand(*mask.shape, 1)
        return torch.cat([tokens, mask[..., None].float(), lab / 10], dim=-1)


class FakeHead(torch.nn.Module):
    def forward(self, x_t, t, z):
        return 0.1 * x_t + z[:, :4] * 0.01 + t[:, None].float() * 1e-4


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "two-stage"])
@pytest.mark.parametrize("guidance, clip", [(1.0, None), (2.5, None), (1.0, 950)])
def test_counted_calls_and_rows(kind, guidance, clip):
    N, K, B = 16, 8, 3
    sched = StepBudgetSchedule(kind, 50, 5)
    cfg = DiSAConfig(ar_steps=K, schedule=sched, guidance_scale=guidance)
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    tokens, stats = sample_mar(FakeBackbone(), FakeHead(), HeadDDPM(AB, clip), cfg, gens, num_tokens=N, token_dim=4,
                               class_labels=torch.tensor([1, 2, 3]), null_class=10)
    calls, rows = head_budget(sched, N, K, timestep_clip=clip)
    assert stats["head_calls"] == calls == stats["nfe"]
    assert stats["head_rows"] == B * rows * (2 if guidance != 1.0 else 1)
    assert stats["head_steps"] == [len(respaced_timesteps(s, timestep_clip=clip)) for s in sched.sequence(K)]
    assert stats["backbone_calls"] == K
    assert tokens.shape == (B, N, 4) and torch.isfinite(tokens).all()


def test_every_slot_filled_once_and_batch_invariant():
    N, K = 16, 5
    cfg = DiSAConfig(ar_steps=K, schedule=StepBudgetSchedule("linear", 10, 2))
    ddpm = HeadDDPM(AB)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    tokens, _ = sample_mar(FakeBackbone(), FakeHead(), ddpm, cfg, gens, num_tokens=N, token_dim=4,
                           class_labels=torch.tensor([0, 1, 2, 3]), null_class=10)
    assert (tokens != 0).all()  # zero is the masked placeholder: every slot was drawn
    one, _ = sample_mar(FakeBackbone(), FakeHead(), ddpm, cfg, [torch.Generator().manual_seed(2)], num_tokens=N,
                        token_dim=4, class_labels=torch.tensor([2]), null_class=10)
    assert torch.equal(one[0], tokens[2])
    assert sum(tokens_per_step(N, K)) == N


def test_sample_mar_validation():
    with pytest.raises(ValueError, match="ar_steps"):
        DiSAConfig(ar_steps=0)
    with pytest.raises(ValueError, match="temperature"):
        DiSAConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="cfg_schedule"):
        DiSAConfig(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="null class"):
        sample_mar(FakeBackbone(), FakeHead(), HeadDDPM(AB), DiSAConfig(guidance_scale=2.0),
                   [torch.Generator()], num_tokens=16, token_dim=4, class_labels=None)
    with pytest.raises(ValueError, match="variance_type"):
        HeadDDPM(AB, variance_type="fixed_large")



def test_path_straightness():
    from gensample.samplers.disa import path_straightness

    line = torch.linspace(0, 1, 11)[:, None, None] * torch.tensor([[[3.0, 4.0]]])  # (11, 1, 2)
    assert path_straightness(line).item() == pytest.approx(1.0)
    zigzag = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 0.0]]])
    assert path_straightness(zigzag).item() == pytest.approx(2 / (2 * 2**0.5))


def test_learned_range_variance_endpoints():
    # v = -1 selects the clipped posterior log-variance (f = 0), the fixed-small chain; v = +1 uses log beta.
    n, table = 256, HeadDDPM(AB).table(10)
    z = MU.repeat(n, 1)

    def with_v(value):
        base = GaussHead(0.3)
        return lambda x, t, zz: torch.cat([base(x, t, zz), torch.full_like(x, value)], dim=1)

    def draw(head, variance_type):
        g = torch.Generator().manual_seed(0)
        return sample_head(head, z, table, lambda: torch.randn((n, 4), generator=g), variance_type=variance_type)

    fixed = draw(GaussHead(0.3), "fixed_small")
    assert torch.equal(draw(with_v(-1.0), "learned_range"), fixed)
    assert not torch.allclose(draw(with_v(1.0), "learned_range"), fixed)
    # A 2C head output is never cut to eps silently: "auto" (the default) uses v, as MAR's DiffLoss
    # does; "fixed_small" with a 2C output and "learned_range" with a C output are errors.
    assert torch.equal(draw(with_v(1.0), "auto"), draw(with_v(1.0), "learned_range"))
    assert torch.equal(draw(GaussHead(0.3), "auto"), fixed)
    with pytest.raises(ValueError, match="would drop v"):
        draw(with_v(1.0), "fixed_small")
    with pytest.raises(ValueError, match="needs a head output of 8 channels"):
        draw(GaussHead(0.3), "learned_range")


def test_scheduler_learned_variance():
    """DiSAHeadScheduler: the 2C output's v is used by default ("auto"), refused under fixed_small.
    (Its betas/alphas training chain: test_scheduler_contract.py::test_training_chain.)"""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    out = torch.cat([torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.ones(6, 4)], dim=1)
    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))

    def one_step(variance_type):
        sched = DiSAHeadScheduler(variance_type=variance_type)
        sched.set_timesteps(10)
        return sched.step(out, sched.timesteps[1 - 1], x, noise=noise).prev_sample

    assert torch.equal(one_step("auto"), one_step("learned_range"))
    with pytest.raises(ValueError, match="would drop v"):
        one_step("fixed_small")
