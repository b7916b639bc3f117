"""Every FKC / SMC random draw is made on its generator's device, then moved (so
``torch.Generator("cuda")`` works; docs/fkc.md "Design choices"), and FKCScheduler's config
survives a JSON round trip unchanged.

The rule is proven on the CPU with a generator stand-in: ``CudaStandIn`` is a CPU generator that
reports ``device == cuda``. ``torch.randn`` / ``torch.rand`` / diffusers' ``randn_tensor`` are
wrapped to record, for each draw that uses a generator, the device the draw was asked to run on,
and then draw on the CPU. Every draw must ask for its generator's device (a draw on the
particles' device, or without ``device=``, would crash with a real CUDA generator).
"""

import pytest
import torch

from gensample.core import smc
from gensample.samplers.fkc import FKCConfig, sample_fkc, spaced_timesteps
from gensample.schedulers.fkc import FKCScheduler
from sd_models import build_pixel_unet

AB = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


class CudaStandIn(torch.Generator):
    """A CPU generator that says it lives on CUDA."""

    @property
    def device(self):
        return torch.device("cuda")


def gen(seed):
    return CudaStandIn().manual_seed(seed)


def _requested(kwargs):
    return None if kwargs.get("device") is None else torch.device(kwargs["device"])


@pytest.fixture
def draws(monkeypatch):
    """List of (generator device, requested device) for every generator-driven draw."""
    seen = []
    real_randn, real_rand = torch.randn, torch.rand

    def wrap(real):
        def draw(*args, **kwargs):
            g = kwargs.get("generator")
            if g is not None:
                seen.append((g.device, _requested(kwargs)))
                if isinstance(g, CudaStandIn):
                    kwargs["device"] = "cpu"  # the stand-in really draws on the CPU
            return real(*args, **kwargs)
        return draw

    monkeypatch.setattr(torch, "randn", wrap(real_randn))
    monkeypatch.setattr(torch, "rand", wrap(real_rand))
    import gensample.pipelines.fkc as pipe_mod
    import gensample.schedulers.fkc as sched_mod

    real_rt = pipe_mod.randn_tensor

    def rt(shape, generator=None, device=None, dtype=None, layout=None):
        g = generator[0] if isinstance(generator, list) else generator
        if g is not None:
            seen.append((g.device, None if device is None else torch.device(device)))
            if isinstance(g, CudaStandIn):
                return real_randn(tuple(shape), generator=g, device="cpu", dtype=dtype)
        return real_rt(shape, generator=generator, device=device, dtype=dtype)

    monkeypatch.setattr(pipe_mod, "randn_tensor", rt)
    monkeypatch.setattr(sched_mod, "randn_tensor", rt)
    return seen


def _check(draws, n_min):
    assert len(draws) >= n_min, draws
    bad = [(g, d) for g, d in draws if d != g]
    assert not bad, f"draws not made on their generator's device: {bad[:3]}"


def _expert(x, t):
    return (0.3 * x)[None].expand(2, *x.shape).contiguous()


@pytest.mark.parametrize("per_particle", [True, False])
def test_sample_fkc_move_and_resampling_draws(draws, per_particle):
    N, K = 8, 4
    gens = [gen(i) for i in range(N)] if per_particle else gen(0)
    cfg = FKCConfig(betas=(2.0, -0.5), resample="every", final="one_per_group")
    x = torch.randn(N, 3)
    draws.clear()
    sample_fkc(_expert, x, cfg, AB, spaced_timesteps(1000, 5), group_size=K, noise_generators=gens,
               resample_generators=[gen(9), gen(10)])
    _check(draws, 5)


@pytest.mark.parametrize("scheme", smc.SCHEMES)
def test_smc_uniforms(draws, scheme):
    lw = torch.tensor([[0.0, -1.0, -3.0, 0.5], [1.0, 0.0, 0.0, -2.0]], dtype=torch.float64)
    smc.resample([torch.arange(8.0)], lw, scheme, [gen(0), gen(1)])
    smc.draw_one_per_group(lw, gen(2))
    _check(draws, 3)


def test_scheduler_step_noise(draws):
    s = FKCScheduler(fkc_betas=[2.0])
    s.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4)
    draws.clear()
    s.step(0.1 * x, s.timesteps[0], x, generator=gen(0))
    s.step(0.1 * x, s.timesteps[1], x, generator=[gen(0), gen(1)])
    _check(draws, 2)


def test_pipeline_initial_noise(draws):
    from diffusers import DDPMScheduler

    from gensample.pipelines.fkc import FKCPipeline

    unet = build_pixel_unet(num_class_embeds=3)
    pipe = FKCPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    draws.clear()
    pipe(class_labels=[0], guidance_scale=2.0, num_particles=2, num_inference_steps=2,
         generator=gen(0), output_type="pt")
    _check(draws, 3)  # initial latents, move noise, resampling / final draw


def test_scheduler_config_json_round_trip_is_exact(tmp_path):
    s = FKCScheduler(fkc_betas=(2.0, -1.0))  # a tuple, as the signature default is
    s.save_pretrained(tmp_path)
    back = FKCScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(s.config)
    assert s.config.fkc_betas == [2.0, -1.0] and FKCScheduler().config.fkc_betas == [1.0]
    assert FKCScheduler.from_config(s.config).config.fkc_betas == [2.0, -1.0]
    with pytest.raises(ValueError, match="fkc_quadrature"):
        FKCScheduler(fkc_quadrature="trapezoid")
