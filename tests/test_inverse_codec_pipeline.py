"""Codec precision, STSLPipeline defaults (clamp, guidance_scale) and device-correct random draws."""

import pytest
import torch

from gensample.samplers.operators import make_operator
from gensample.samplers.stsl import Codec
from sd_models import build_pixel_unet

torch.set_num_threads(1)


def tiny_vae(dtype):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=2, norm_num_groups=2)
    return vae.eval().requires_grad_(False).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_codec_runs_a_half_precision_vae_in_float32(dtype):
    """Differentiable decode / encode never go through half-precision weights: every decoder / encoder
    call sees float32 inputs and float32 weights, gradients come back float32, and the caller's VAE
    keeps its dtype."""
    vae = tiny_vae(dtype)
    calls = []
    hook = lambda m, a: calls.append((a[0].dtype, next(m.parameters()).dtype))  # noqa: E731
    vae.decoder.register_forward_pre_hook(hook)
    vae.encoder.register_forward_pre_hook(hook)
    codec = Codec(vae)
    z = torch.randn(1, 2, 8, 8, requires_grad=True)
    x = codec.decode(z, grad=True)
    (g,) = torch.autograd.grad(x.square().sum(), z)
    assert x.dtype == torch.float32 and g.dtype == torch.float32 and torch.isfinite(g).all()
    xin = torch.randn(1, 3, 8, 8, requires_grad=True)
    e = codec.encode(xin, grad=True)
    (ge,) = torch.autograd.grad(e.sum(), xin)
    assert e.dtype == torch.float32 and ge.dtype == torch.float32
    assert len(calls) == 2 and all(c == (torch.float32, torch.float32) for c in calls), calls
    assert next(vae.parameters()).dtype == dtype
    assert all(p.dtype == torch.float32 for p in codec.vae32.parameters())
    # the float32 copy computes what the float32 VAE computes
    ref = tiny_vae(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(z.detach()), ref.decode(z.detach() / codec.sf).sample, atol=2e-2, rtol=0)


def test_codec_keeps_a_float32_vae_itself():
    vae = tiny_vae(torch.float32)
    assert Codec(vae).vae32 is vae


@pytest.fixture(scope="module")
def pixel_pipe():
    from diffusers import DDPMScheduler

    from gensample.pipelines.stsl import STSLPipeline

    unet = build_pixel_unet(channels=1, attention=False)
    pipe = STSLPipeline(unet=unet.requires_grad_(False), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_clamps_dps_like_the_cli(pixel_pipe):
    """DPS clamps x0_hat by default on both faces (CLI ``--clamp auto`` on [-1, 1] image models)."""
    from gensample.runs.stsl import _config_from_opts
    from gensample.zoo.analytic import gmm_digits

    op = make_operator("inpaint-box", (1, 8, 8))
    y = op(torch.zeros(1, 1, 8, 8))
    for method in ("dps", "psld", "stsl"):
        pixel_pipe(y, op, method=method, num_inference_steps=2, inner_steps=1, output_type="pt")
        cli = _config_from_opts(method, {"clamp": "auto", "steps": 2}, gmm_digits())
        assert pixel_pipe.last_config.clamp_x0 == cli.clamp_x0 == (method == "dps"), method
    pixel_pipe(y, op, method="dps", num_inference_steps=2, clamp_x0=False, output_type="pt")
    assert pixel_pipe.last_config.clamp_x0 is False


def test_pipeline_refuses_guidance_scale_clearly(pixel_pipe):
    op = make_operator("inpaint-box", (1, 8, 8))
    y = op(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="guidance_scale must be 1.0, got 7.5"):
        pixel_pipe(y, op, num_inference_steps=2, guidance_scale=7.5)
    out = pixel_pipe(y, op, num_inference_steps=2, inner_steps=1, guidance_scale=1.0, output_type="pt")
    assert out.images.shape == (1, 1, 8, 8)


class _Recorder:
    """Wraps torch.randn / torch.randint / torch.rand: every draw that names a generator must also name
    that generator's device (draw there, then move), so a CUDA generator works."""

    def __init__(self, monkeypatch):
        self.bad, self.n = [], 0
        for name in ("randn", "randint", "rand"):
            orig = getattr(torch, name)
            monkeypatch.setattr(torch, name, self._wrap(orig, name))

    def _wrap(self, orig, name):
        def f(*args, **kw):
            g = kw.get("generator")
            if g is not None:
                self.n += 1
                dev = kw.get("device")
                if dev is None or torch.device(dev) != g.device:
                    self.bad.append((name, dev))
            return orig(*args, **kw)

        return f


def test_every_random_draw_is_on_the_generators_device(pixel_pipe, monkeypatch):
    op = make_operator("inpaint-random", (1, 8, 8), missing=0.5)
    x = torch.zeros(2, 1, 8, 8)
    rec = _Recorder(monkeypatch)
    y = op.measure(x, 0.1, [torch.Generator().manual_seed(i) for i in range(2)])
    for method, kw in (("stsl", dict(inner_steps=1)), ("dps", {}), ("psld", {})):
        pixel_pipe(y[:1], op, method=method, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="pt", **kw)
    assert rec.n >= 10 and rec.bad == [], rec.bad
