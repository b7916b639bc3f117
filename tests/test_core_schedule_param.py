"""core/: schedule tables against diffusers, parameterisation round trips, the Denoiser adapter."""

import math

import pytest
import torch

from gensample.core import param
from gensample.core.denoiser import Denoiser
from gensample.core.schedule import (
    alpha_bar_at,
    alphas_cumprod_from_config,
    continuous_alpha_bar,
    log_snr,
    make_betas,
    rescale_zero_terminal_snr,
    timestep_from_log_snr,
)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(schedule, zero_snr):
    from diffusers import DDPMScheduler

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule,
               rescale_betas_zero_snr=zero_snr)
    ref = DDPMScheduler(**cfg).alphas_cumprod.double()
    ours = alphas_cumprod_from_config(cfg)
    # diffusers keeps float32 tables: compare at float32 resolution
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-6)
    if zero_snr:
        assert ours[-1] == 0.0


def test_trained_betas_and_errors():
    betas = make_betas(trained_betas=[0.1, 0.2])
    assert betas.dtype == torch.float64 and betas.tolist() == [0.1, 0.2]
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas(beta_schedule="quadratic-ish")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_betas(num_train_timesteps=0)


def test_zero_snr_rescale_keeps_first_alpha_bar():
    betas = make_betas(1000, 0.00085, 0.012, "scaled_linear")
    ab0 = torch.cumprod(1 - betas, 0)
    ab1 = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    assert torch.isclose(ab1[0], ab0[0], rtol=1e-12)
    assert ab1[-1] == 0


def test_alpha_bar_interpolation_and_log_snr_inverse():
    ab = alphas_cumprod_from_config({})
    t = torch.tensor([0.0, 10.0, 999.0])
    torch.testing.assert_close(alpha_bar_at(ab, t), ab[[0, 10, 999]])
    mid = alpha_bar_at(ab, torch.tensor(10.5))
    assert ab[11] < mid < ab[10]
    # geometric interpolation of alpha_bar
    assert torch.isclose(mid, (ab[10] * ab[11]).sqrt(), rtol=1e-12)
    assert alpha_bar_at(ab, torch.tensor(-1.0)) == 1.0
    torch.testing.assert_close(continuous_alpha_bar(ab, 1.0), ab[-1])
    lam = log_snr(alpha_bar_at(ab, torch.tensor([3.25, 500.5, 990.0])))
    torch.testing.assert_close(timestep_from_log_snr(ab, lam), torch.tensor([3.25, 500.5, 990.0], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_parameterisation_round_trip(pred):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.rand(5, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    out = param.from_eps(eps, x_t, ab, pred)
    torch.testing.assert_close(param.to_eps(out, x_t, ab, pred), eps)
    torch.testing.assert_close(param.eps_to_x0(eps, x_t, ab), x0)
    v = param.eps_to_v(eps, x_t, ab)
    torch.testing.assert_close(v, ab.sqrt().view(-1, 1, 1, 1) * eps - (1 - ab).sqrt().view(-1, 1, 1, 1) * x0)
    torch.testing.assert_close(param.v_to_x0(v, x_t, ab), x0)
    torch.testing.assert_close(param.score_to_eps(param.eps_to_score(eps, ab), ab), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        param.to_eps(eps, x_t, ab, "flow")


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_denoiser_converts_any_prediction_type(pred):
    ab_table = alphas_cumprod_from_config({})
    true_eps = lambda x, t: torch.sin(x) * 0.3  # any function of x plays "the model's eps"

    def model(x, t, cond):
        ab = alpha_bar_at(ab_table, torch.as_tensor(t).double()).to(x.dtype)
        return param.from_eps(true_eps(x, t), x, ab, pred)

    den = Denoiser(model, ab_table, pred, plain_callable=True)
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([10, 200, 500, 900])
    torch.testing.assert_close(den(x, t), true_eps(x, t))
    assert den.calls == 1 and den.rows == 4


def test_denoiser_cfg_and_diffusers_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=3).eval()
    den = Denoiser(unet, null_cond={"class_labels": torch.tensor([2])})
    x = torch.randn(3, 1, 8, 8)
    cond = {"class_labels": torch.tensor([0, 1, 0])}
    with torch.no_grad():
        e_c = den(x, 500, cond)
        e_u = den(x, 500, {"class_labels": torch.tensor([2, 2, 2])})
        e_w1 = den.guided(x, 500, cond, 1.0)
        e_w3 = den.guided(x, 500, cond, 3.0)
    torch.testing.assert_close(e_w1, e_c)
    torch.testing.assert_close(e_w3, e_u + 3.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        Denoiser(unet).guided(x, 500, cond, 2.0)
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(unet, prediction_type="x0")


def test_check_finite_names_sampler_and_step():
    from gensample.core.denoiser import check_finite

    check_finite(torch.zeros(2), "ddim", 0)
    with pytest.raises(FloatingPointError, match=r"ddim.*step 7"):
        check_finite(torch.tensor([0.0, math.nan]), "ddim", 7)


def test_rescale_cfg_matches_diffusers_and_its_definition():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    guided, cond = 3 * torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    for phi in (0.0, 0.3, 1.0):
        torch.testing.assert_close(param.rescale_cfg(guided, cond, phi), rescale_noise_cfg(guided, cond, guidance_rescale=phi))
    full = param.rescale_cfg(guided, cond, 1.0)  # phi = 1: per-sample std equals the conditional's
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))
    with pytest.raises(ValueError, match="guidance_rescale"):
        param.rescale_cfg(guided, cond, 1.5)


def test_guided_rescale_runs_on_the_raw_v_output():
    """Rescaled CFG of a v-model: combine + rescale v (as diffusers), then convert to eps."""
    ac = alphas_cumprod_from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})

    def v_model(x, t, cond):  # a v "network" whose scale depends on the condition
        return (0.5 + cond["c"].view(-1, 1, 1, 1)) * x

    den = Denoiser(v_model, ac, "v_prediction", plain_callable=True, null_cond={"c": torch.zeros(1)}, guidance_rescale=0.6)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = {"c": torch.tensor([1.0, -2.0, 0.5])}
    v_c, v_u = v_model(x, None, cond), v_model(x, None, {"c": torch.zeros(3)})
    v = param.rescale_cfg(v_u + 4.0 * (v_c - v_u), v_c, 0.6)
    want = param.v_to_eps(v, x, alpha_bar_at(ac, torch.tensor(300)))
    torch.testing.assert_close(den.guided(x, 300, cond, 4.0), want)
    plain = Denoiser(v_model, ac, "v_prediction", plain_callable=True, null_cond={"c": torch.zeros(1)})
    assert not torch.allclose(plain.guided(x, 300, cond, 4.0), want)  # phi = 0 is plain CFG


def test_default_cond_and_dtype_of_conditioning():
    seen = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, sample, timestep, encoder_hidden_states):
            seen["dtype"] = encoder_hidden_states.dtype
            return sample * self.w + encoder_hidden_states.mean()

    emb = torch.ones(1, 3, 2, dtype=torch.float32)
    den = Denoiser(Net(), default_cond={"encoder_hidden_states": emb})
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(den(x, 10), torch.ones_like(x))  # cond=None: the default (empty prompt)
    assert seen["dtype"] == torch.float64  # floating conditioning follows the network's dtype


def test_model_call_failure_names_model_and_call():
    from gensample.core.denoiser import ModelCallError

    class NoTimestep(torch.nn.Module):
        def forward(self, sample):
            return sample

    den = Denoiser(NoTimestep(), name="my-model")
    with pytest.raises(ModelCallError, match=r"model 'my-model' failed when called as NoTimestep\(sample=Tensor\(2, 3\).*TypeError"):
        den(torch.zeros(2, 3), 5, {"class_labels": torch.tensor([0, 1])})
    assert not issubclass(ModelCallError, (TypeError, ValueError))  # not a usage error
