"""OMS step: exact unit properties (docs/oms.md, "The step")."""

import math

import pytest
import torch

from gensample.samplers.oms import OMSConfig, first_alpha_bar, oms_step, oms_v, to_scheduler_scale


SHAPE = (4, 1, 8, 8)


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("legacy", [False, True])
def test_oracle_mean_and_variance(legacy):
    """Property 1: psi = -x0* gives E[x_T] = sqrt(a) x0*, Var = 1 - a (eta = 1). The reference
    code's variance-as-std bug (legacy) gives Var = (1 - a)^2 and must fail the same check."""
    n, a = 10_000, 0.0477
    x0_star = torch.linspace(-0.8, 0.8, 64).reshape(1, 1, 8, 8)
    v = (-x0_star).expand(n, 1, 8, 8)
    x_Tp = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    x_T = oms_step(v, None, x_Tp, a, eta=1.0, generator=torch.Generator().manual_seed(2), legacy_variance=legacy).double()
    resid = x_T - math.sqrt(a) * x0_star
    # sample mean of n N(0, s^2) draws: sd s/sqrt(n); 5 sd over 64 pixels keeps a false failure < 1e-4.
    assert (resid.mean(0).abs() <= 5 * math.sqrt(1 - a) / math.sqrt(n)).all()
    var = resid.var(0).mean().item()  # pooled over 64 pixels: relative sd sqrt(2 / (64 n)) = 0.18 %
    close = abs(var / (1 - a) - 1) <= 0.02  # spec's 2 % (> 10 sd of the estimator)
    assert close != legacy, f"variance {var:.4f} vs 1 - a = {1 - a:.4f} (legacy={legacy})"


def test_legacy_variance_is_exactly_variance_times_z():
    """Property 9: legacy noise coefficient is 1 - a; the default is sqrt(1 - a); same z."""
    a = 0.00466
    v = torch.zeros(SHAPE)
    x_Tp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    legacy = oms_step(v, None, x_Tp, a, generator=torch.Generator().manual_seed(5), legacy_variance=True).double()
    fixed = oms_step(v, None, x_Tp, a, generator=torch.Generator().manual_seed(5)).double()
    torch.testing.assert_close(legacy, ((1 - a) * z).float().double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(fixed, (math.sqrt(1 - a) * z).float().double(), rtol=0, atol=1e-6)
    assert abs(math.sqrt(1 - a) - 0.99767) < 1e-5 and abs((1 - a) - 0.99534) < 1e-5  # nu of the OMS step on SD's schedulembers


def test_alpha_bar_zero_is_identity():
    """Property 2: a = 0: eta = 0 returns x_T' bit-exactly whatever psi says; eta = 1 returns z."""
    x_Tp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    v = 100 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(oms_step(v, None, x_Tp, 0.0, eta=0.0), x_Tp)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float()
    assert torch.equal(oms_step(v, None, x_Tp, 0.0, eta=1.0, generator=torch.Generator().manual_seed(7)), z)
    # the check has power: any a > 0 moves the output
    assert not torch.equal(oms_step(v, None, x_Tp, 1e-4, eta=0.0), x_Tp)


def test_guidance_identities():
    """Property 3: w = 1 -> conditional only, w = 0 -> unconditional, v_u = v_c -> any w same."""
    g = torch.Generator().manual_seed(0)
    v_c, v_u, x_Tp = (torch.randn(SHAPE, generator=g) for _ in range(3))
    kw = dict(alpha_bar=0.3, eta=0.0)
    assert torch.equal(oms_step(v_c, v_u, x_Tp, w=1.0, **kw), oms_step(v_c, None, x_Tp, **kw))
    assert torch.equal(oms_step(v_c, v_u, x_Tp, w=0.0, **kw), oms_step(v_u, None, x_Tp, **kw))
    for w in (0.0, 2.5, 7.0):
        assert torch.equal(oms_step(v_c, v_c, x_Tp, w=w, **kw), oms_step(v_c, None, x_Tp, **kw))
    assert torch.equal(oms_v(v_c, v_u, 3.0), v_u + 3.0 * (v_c - v_u))


def test_eta_zero_is_deterministic_and_ignores_generator():
    """Property 4."""
    g = torch.Generator().manual_seed(0)
    v, x_Tp = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    ref = oms_step(v, None, x_Tp, 0.2, eta=0.0)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert torch.equal(oms_step(v, None, x_Tp, 0.2, eta=0.0, generator=gen), ref)
    assert torch.equal(gen.get_state(), state)  # not consumed
    assert torch.equal(oms_step(v, None, x_Tp, 0.2, eta=0.0, generator=_gens(4)), ref)


def test_sign_constant_v():
    """Property 7: constant v = -k gives x0_hat = +k (eta = 0: x_T = sqrt(a) k + sqrt(1-a) x_T')."""
    a, k = 0.25, 0.6
    x_Tp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_T = oms_step(torch.full(SHAPE, -k), None, x_Tp, a, eta=0.0)
    torch.testing.assert_close(x_T, 0.5 * k + math.sqrt(0.75) * x_Tp)


def test_per_sample_generators_make_rows_independent_of_batch():
    g = torch.Generator().manual_seed(0)
    v, x_Tp = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    full = oms_step(v, None, x_Tp, 0.1, generator=_gens(4))
    part = oms_step(v[2:], None, x_Tp[2:], 0.1, generator=_gens(2, seed=2))
    assert torch.equal(full[2:], part)


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha_bar": 1.0}, "alpha_bar"),
    ({"alpha_bar": -0.1}, "alpha_bar"),
    ({"eta": 1.5}, "eta"),
    ({"w": 2.0}, "v_u"),
])
def test_oms_step_rejects_bad_input(kwargs, match):
    args = dict(alpha_bar=0.1, w=1.0, eta=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        oms_step(torch.zeros(SHAPE), None, torch.zeros(SHAPE), **args)


def test_config_validation():
    with pytest.raises(ValueError, match="eta"):
        OMSConfig(eta=-0.1)
    with pytest.raises(ValueError, match="guidance_scale"):
        OMSConfig(guidance_scale=float("nan"))


# -- t0 / alpha_bar table (docs/oms.md, "The step") -------------------------------------------
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          clip_sample=False, set_alpha_to_one=False)


@pytest.mark.parametrize("cls,extra,steps,t0,ab", [
    ("DDIMScheduler", dict(steps_offset=1, timestep_spacing="leading"), 20, 951, 0.008155),
    ("DDIMScheduler", dict(steps_offset=1, timestep_spacing="leading"), 50, 981, 0.005775),
    ("PNDMScheduler", dict(steps_offset=1, skip_prk_steps=True), 20, 951, 0.008155),
    ("DDIMScheduler", dict(timestep_spacing="trailing"), 20, 999, 0.004660),
    ("DPMSolverMultistepScheduler", dict(), 20, 999, 0.004660),
    ("LCMScheduler", dict(), 4, 999, 0.004660),
    ("EulerDiscreteScheduler", dict(timestep_spacing="linspace"), 20, 999, 0.004660),
    ("EulerDiscreteScheduler", dict(steps_offset=1, timestep_spacing="leading"), 20, 951, 0.008155),
])
def test_first_timestep_table(cls, extra, steps, t0, ab):
    import diffusers

    sched = getattr(diffusers, cls).from_config(dict(SD, **extra))
    sched.set_timesteps(steps)
    assert int(round(float(sched.timesteps[0]))) == t0
    a = first_alpha_bar(sched)
    assert abs(a - ab) <= 5e-6 * 1 + 1e-3 * ab, f"{cls}: alpha_bar {a:.6f}, spec {ab}"
    # Euler-leading: init_noise_sigma is exactly 1/sqrt(a), so VP-scale x_T maps to sigma space
    if cls == "EulerDiscreteScheduler" and extra.get("timestep_spacing") == "leading":
        assert abs(float(sched.init_noise_sigma) * math.sqrt(a) - 1) < 1e-5
    x = torch.ones(2, 4, 2, 2)
    scaled = to_scheduler_scale(x, sched, a)
    expect = 1.0 if float(sched.init_noise_sigma) == 1.0 else 1 / math.sqrt(a)
    torch.testing.assert_close(scaled, x * expect)


def test_first_alpha_bar_needs_set_timesteps():
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="set_timesteps"):
        first_alpha_bar(DDIMScheduler.from_config(SD))


# -- every random draw on its generator's device (diffusers' torch.Generator("cuda") idiom) ------
class _ClaimsCuda:
    """A generator stand-in that says it lives on CUDA and records nothing itself; the patched
    torch.randn / torch.randint below record the device each draw is asked for."""

    device = torch.device("cuda", 0)

    def __init__(self, seed):
        self.inner = torch.Generator().manual_seed(seed)


@pytest.fixture
def recorded_draws(monkeypatch):
    calls = []
    real_randn, real_randint = torch.randn, torch.randint

    def unwrap(kw):
        g = kw.get("generator")
        calls.append((torch.device(kw["device"]) if kw.get("device") is not None else torch.device("cpu"),
                      getattr(g, "device", None)))
        if isinstance(g, _ClaimsCuda):
            kw = dict(kw, generator=g.inner, device="cpu")  # draw on CPU for real, after recording
        return kw

    monkeypatch.setattr(torch, "randn", lambda *a, **kw: real_randn(*a, **unwrap(kw)))
    monkeypatch.setattr(torch, "randint", lambda *a, **kw: real_randint(*a, **unwrap(kw)))
    return calls


@pytest.mark.parametrize("as_list", [False, True])
def test_oms_step_draws_on_the_generators_device(recorded_draws, as_list):
    """The z of the OMS step is drawn on the generator's device (a CUDA generator must not be asked
    for a CPU tensor, which torch refuses), then moved to x's device."""
    x_Tp = torch.zeros(SHAPE)
    gen = [_ClaimsCuda(i) for i in range(SHAPE[0])] if as_list else _ClaimsCuda(0)
    out = oms_step(torch.zeros(SHAPE), None, x_Tp, 0.1, eta=1.0, generator=gen)
    assert out.device == x_Tp.device and out.shape == SHAPE
    assert recorded_draws and all(dev == torch.device("cuda", 0) for dev, _ in recorded_draws), recorded_draws
    # and a CPU generator draws on the CPU, bit-identical to a plain draw
    recorded_draws.clear()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = oms_step(torch.zeros(SHAPE), None, x_Tp, 0.0, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert all(dev == torch.device("cpu") for dev, _ in recorded_draws)
    torch.testing.assert_close(got, z.float(), rtol=0, atol=0)


def test_sampler_class_draws_on_the_generators_device(recorded_draws):
    """The per-sample OMS class of the sampler is drawn on its stream's device too."""
    from gensample.models.oms import small_oms_module
    from gensample.runs.oms import _oms_classes

    module = small_oms_module(in_channels=1, num_classes=3)
    labels = _oms_classes(module, {}, [1, 2, 3], [_ClaimsCuda(i) for i in range(3)])
    assert labels.shape == (3,) and labels.device.type == "cpu" and int(labels.max()) < 3
    assert [dev for dev, _ in recorded_draws] == [torch.device("cuda", 0)] * 3
