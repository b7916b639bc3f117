"""core/ddim.py: the one DDIM / DDPM step and the one timestep grid, bit for bit against diffusers'
DDIMScheduler / DDPMScheduler (same inputs, same float32 coefficient order), and the algebra that
ties the parameterisations together."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from gensample.core import ddim

T = 1000


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 333, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timestep_grid_equals_diffusers(spacing, steps, offset):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    ours = ddim.timestep_grid(T, steps, spacing, offset)
    assert ours.dtype == torch.int64 and torch.equal(ours, ref.timesteps)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=T + 1), dict(spacing="karras")])
def test_timestep_grid_rejects_bad_arguments(bad):
    kw = dict(steps=10, spacing="leading") | bad
    with pytest.raises(ValueError, match="steps|timestep_spacing"):
        ddim.timestep_grid(T, kw["steps"], kw["spacing"])


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_diffusers_ddim_bit_for_bit(eta):
    ref = DDIMScheduler(num_train_timesteps=T, clip_sample=False)
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 8, 8, generator=g)
    eps = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t, s = int(ref.timesteps[5]), int(ref.timesteps[6])
    ab_t, ab_s = ref.alphas_cumprod[t], ref.alphas_cumprod[s]  # float32 0-dim, as diffusers uses them
    out = ref.step(eps, t, x_t, eta=eta, variance_noise=noise)
    x0 = ddim.x0_from_eps(x_t, eps, ab_t, coef_dtype=x_t.dtype)
    sigma = ddim.ddim_sigma(ab_t, ab_s, eta)
    x_s = ddim.ddim_update(x0, eps, ab_s, sigma, noise if eta > 0 else None, coef_dtype=x_t.dtype)
    assert torch.equal(x0, out.pred_original_sample)
    assert torch.equal(x_s, out.prev_sample)


def test_ddim_sigma_at_eta_one_is_the_ddpm_posterior_std():
    ref = DDPMScheduler(num_train_timesteps=T)
    ab = ref.alphas_cumprod.double()
    t = torch.arange(1, T)
    sigma = ddim.ddim_sigma(ab[t], ab[t - 1], 1.0)
    _, _, _, beta_tilde = ddim.ddpm_posterior(ab[t], ab[t - 1])
    torch.testing.assert_close(sigma**2, beta_tilde, rtol=1e-12, atol=0)


def test_ddpm_posterior_mean_equals_diffusers_ddpm():
    ref = DDPMScheduler(num_train_timesteps=T)
    ab = ref.alphas_cumprod.double()
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(2, 5, generator=g).double(), torch.randn(2, 5, generator=g).double()
    for t in (1, 10, 500, 999):
        _, c_x0, c_xt, _ = ddim.ddpm_posterior(ab[t], ab[t - 1])
        beta = 1 - ab[t] / ab[t - 1]
        expect = (ab[t - 1].sqrt() * beta / (1 - ab[t])) * x0 + ((1 - beta).sqrt() * (1 - ab[t - 1]) / (1 - ab[t])) * x_t
        torch.testing.assert_close(ddim.ddpm_posterior_mean(x0, x_t, c_x0, c_xt), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ab", [0.02, 0.5, 0.98])
def test_parameterisations_round_trip(ab):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, generator=g).double(), torch.randn(3, 4, generator=g).double()
    x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * eps
    v = ab**0.5 * eps - (1 - ab) ** 0.5 * x0
    a = torch.tensor(ab, dtype=torch.float64)
    for got, want in [(ddim.x0_from_eps(x_t, eps, a), x0), (ddim.x0_from_eps(x_t, eps, ab), x0),
                      (ddim.x0_from_eps_reciprocal(x_t, eps, a), x0), (ddim.eps_from_x0(x_t, x0, a), eps),
                      (ddim.x0_from_v(x_t, v, a), x0), (ddim.eps_from_v(x_t, v, a), eps)]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_floor_applies_to_the_denominator_only():
    x_t, eps = torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    zero = torch.tensor(0.0, dtype=torch.float64)
    x0 = ddim.x0_from_eps(x_t, eps, zero, alpha_bar_floor=2.0**-24)  # (1 - sqrt(1) * 1) / 2^-12 = 0
    assert torch.equal(x0, torch.zeros(2, dtype=torch.float64))


def test_q_sample_and_velocity_equal_diffusers_bit_for_bit():
    ref = DDIMScheduler(num_train_timesteps=T)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ab = ref.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.equal(ddim.q_sample(x0, noise, ab), ref.add_noise(x0, noise, t))
    assert torch.equal(ddim.v_from_eps(x0, noise, ab), ref.get_velocity(x0, noise, t))


def test_ddim_sigma_from_a_clean_time_is_zero_not_nan():
    """A step whose start is clean (alpha_bar_t = 1: a Time-Shift candidate at model time 0) has no
    noise to remove: sigma is 0 for every eta (0/0 before), floats and tensors alike."""
    import math

    for eta in (0.0, 1.0):
        assert ddim.ddim_sigma(1.0, 1.0, eta) == 0.0
        t = ddim.ddim_sigma(torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.9], dtype=torch.float64), eta)
        assert torch.isfinite(t).all() and t[0] == 0
        expected = eta * math.sqrt((1 - 0.9) / (1 - 0.5) * (1 - 0.5 / 0.9))
        assert abs(float(t[1]) - expected) < 1e-15
