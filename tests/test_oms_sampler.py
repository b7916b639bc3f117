"""The `oms` sampler and the ddim schedule-flaw flags, on tiny random models (no shipped weights)."""

import pytest
import torch
from click.testing import CliRunner

from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.loading import LoadedModel
from gensample.models.oms import small_oms_module
from gensample.models.oms_training import scheduler_config_for
from gensample.samplers import registry
from gensample.samplers.registry import RunContext



def tiny_model(variant: str, tmp_path) -> LoadedModel:
    """A random 16x16x1 class-conditional UNet2DModel on a variant's schedule, with a random OMS module."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4).eval()
    torch.manual_seed(1)
    oms_dir = tmp_path / f"oms-{variant}"
    small_oms_module(in_channels=1, num_classes=3).save_pretrained(oms_dir)
    cfg = {k: v for k, v in scheduler_config_for(variant).items() if not k.startswith("_")}
    return LoadedModel(name=f"tiny-{variant}", unet=unet, scheduler_config=cfg, event_shape=(1, 16, 16), num_classes=3,
                       null_class=3, prediction_type=cfg["prediction_type"], is_image=True,
                       extras={"oms_module": oms_dir})


def draw(sampler, model, seeds=(11, 12, 13), **opts):
    from gensample.api import resolve_options

    cfg = resolve_options(sampler, model="unused", steps=opts.pop("steps", 8), **opts)
    with torch.no_grad():
        return registry.get(sampler).fn(model, cfg, list(seeds), RunContext(sampler=sampler))


def test_skip_oms_equals_bare_ddim(tmp_path):
    """Property 5 on the sampler: --skip-oms is the bare ddim sampler bit for bit."""
    model = tiny_model("flawed", tmp_path)
    bare = draw("ddim", model).x
    assert torch.equal(draw("oms", model, skip_oms=True).x, bare)
    with_oms = draw("oms", model, oms_class=2)
    assert not torch.equal(with_oms.x, bare)
    assert torch.equal(with_oms.extras["x_no_oms"], bare)  # the compare half is the bare sampler
    # 8 leading steps with steps_offset 1: t0 = 7 * 125 + 1 = 876
    ab = alphas_cumprod_from_config(model.scheduler_config)[876].item()
    assert with_oms.stats["oms"]["alpha_bar"] == pytest.approx(ab, rel=1e-5)  # diffusers keeps float32 tables
    assert with_oms.stats["oms"]["t0"] == 876


def test_zero_terminal_snr_makes_oms_a_no_op(tmp_path):
    """Property 2 end to end: on a zero-terminal-SNR v-pred model (trailing, t0 = 999, a = 0) OMS with
    eta = 0 returns exactly the base sampler's samples, whatever psi says."""
    model = tiny_model("zero-snr", tmp_path)
    bare = draw("ddim", model, rescale_zero_snr=True)
    assert torch.isfinite(bare.x).all()
    res = draw("oms", model, oms_eta=0.0, oms_class=0, skip_compare=True)
    assert res.stats["oms"]["alpha_bar"] == 0.0
    assert torch.equal(res.x, bare.x)
    # power: on the flawed schedule the same call is not a no-op
    flawed = tiny_model("flawed", tmp_path)
    assert not torch.equal(draw("oms", flawed, oms_eta=0.0, oms_class=0, skip_compare=True).x, draw("ddim", flawed).x)


def test_zero_snr_model_without_flag_uses_v_path(tmp_path):
    """A zero-SNR model's own config routes ddim to the raw-v loop (the eps convention is 0/0 at a = 0)."""
    model = tiny_model("zero-snr", tmp_path)
    assert torch.equal(draw("ddim", model).x, draw("ddim", model, rescale_zero_snr=True).x)


def test_offset_noise_start(tmp_path):
    """--offset-noise delta starts from eps + delta n (n per channel); delta = 0 is the bare sampler."""
    model = tiny_model("flawed", tmp_path)
    a = draw("ddim", model, steps=1, offset_noise=0.5)
    b = draw("ddim", model, steps=1)
    assert not torch.equal(a.x, b.x)
    assert torch.equal(draw("ddim", model, offset_noise=0.0).x, draw("ddim", model).x)


def test_ddim_declares_its_flaw_options_and_nothing_re_registers_it():
    """The ddim spec (runs/baseline.py) owns --rescale-zero-snr / --offset-noise; importing the oms
    sampler (its math and its run glue) leaves SAMPLERS["ddim"] as baseline registered it."""
    import gensample.runs.oms  # noqa: F401
    import gensample.samplers.oms  # noqa: F401
    from gensample.runs import baseline

    spec = registry.get("ddim")
    assert {"rescale_zero_snr", "offset_noise", "eta", "eps_scale"} <= {o.key for o in spec.options}
    assert spec.fn.__module__ == baseline.__name__
    assert "guidance_rescale" not in {o.key for o in spec.options}  # the common rescaled-CFG option


def test_offset_noise_combines_with_eps_scaling(tmp_path):
    """Offset noise only changes x_T, so Epsilon Scaling applies on top of it."""
    model = tiny_model("flawed", tmp_path)
    both = draw("ddim", model, offset_noise=0.3, eps_scale=1.05).x
    assert not torch.equal(both, draw("ddim", model, offset_noise=0.3).x)
    assert not torch.equal(both, draw("ddim", model, eps_scale=1.05).x)


def test_guidance_rescale_uses_diffusers_rescale(tmp_path):
    model = tiny_model("zero-snr", tmp_path)
    plain = draw("ddim", model, rescale_zero_snr=True, guidance_scale=3.0, class_label=1)
    resc = draw("ddim", model, rescale_zero_snr=True, guidance_scale=3.0, class_label=1, guidance_rescale=0.7)
    assert torch.isfinite(resc.x).all() and not torch.equal(plain.x, resc.x)


@pytest.mark.parametrize("variant,opts,match", [
    ("flawed", {"rescale_zero_snr": True}, "v_prediction"),
    ("zero-snr", {"rescale_zero_snr": True, "eps_scale": 1.01}, "cannot be combined"),
    ("flawed", {"oms_class": 4}, "--oms-class"),
    ("flawed", {"oms_module": "/nonexistent/oms"}, "--oms-module"),
])
def test_user_errors(variant, opts, match, tmp_path):
    model = tiny_model(variant, tmp_path)
    sampler = "ddim" if "rescale_zero_snr" in opts else "oms"
    with pytest.raises(ValueError, match=match):
        draw(sampler, model, **opts)


@pytest.mark.parametrize("args,match", [
    (["--sampler", "oms", "--oms-eta", "2"], "--oms-eta"),
    (["--sampler", "oms", "--oms-base", "heun"], "--oms-base"),
    (["--sampler", "ddim", "--model", "gmm-digits", "--rescale-zero-snr"], "v_prediction"),
    (["--sampler", "ddim", "--model", "gmm-digits", "--offset-noise", "-1"], "--offset-noise"),
    (["--sampler", "ddim", "--model", "gmm-digits", "--rescale-zero-snr", "--eps-scale", "1.01"], "cannot be combined"),
])
def test_cli_user_errors_exit_2(args, match, tmp_path):
    from gensample.cli import main

    res = CliRunner().invoke(main, ["run", *args, "-n", "2", "--steps", "2", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output


def test_train_cli_smoke_and_resume(tmp_path):
    """`gensample train flawed` writes a loadable diffusers folder + record; a rerun resumes (no retraining)."""
    from gensample.cli import main
    from gensample.models.loading import load_model

    out = tmp_path / "fl"
    args = ["train", "flawed", "--steps", "3", "--batch-size", "4", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for f in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "train.json", "loss.csv",
              "checkpoint.pt"):
        assert (out / f).exists(), f
    m = load_model(str(out))
    assert m.num_classes == 3 and m.null_class == 3 and m.scheduler_config["beta_end"] == 0.006
    before = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and (out / "diffusion_pytorch_model.safetensors").read_bytes() == before
    res = CliRunner().invoke(main, ["train", "flawed", "--steps", "3", "--batch-size", "8", "-o", str(out)])
    assert res.exit_code == 2 and "different settings" in res.output


def test_train_oms_smoke(tmp_path):
    from gensample.models.oms_training import TrainConfig, brightness_digits, train_oms

    base = LoadedModel(name="toy", event_shape=(1, 16, 16), num_classes=3, null_class=3,
                       extras={"dataset": brightness_digits})
    module, hist = train_oms(base, tmp_path / "oms", TrainConfig(steps=2, batch_size=4))
    assert (tmp_path / "oms" / "config.json").exists() and hist[-1]["step"] == 2
    with pytest.raises(ValueError, match="training data"):
        train_oms(LoadedModel(name="nodata", num_classes=3), tmp_path / "x", TrainConfig(steps=1))


def test_brightness_data_levels():
    from gensample.models.oms_training import LEVELS, brightness_digits

    x0, lab = brightness_digits(3000, torch.Generator().manual_seed(0))
    means = x0.mean(dim=(1, 2, 3))
    for k, level in enumerate(LEVELS):
        assert abs(means[lab == k].mean().item() - level) < 0.02  # only the clamp moves the mean
    assert x0.min() >= -1 and x0.max() <= 1


def test_mean_luminance():
    """BT.601 luma in [0, 255]: black 0, white 255, pure red 0.299 * 255; one channel: the value."""
    import numpy as np

    from gensample.runs.oms import mean_luminance

    imgs = np.stack([np.full((3, 2, 2), -1.0), np.full((3, 2, 2), 1.0), np.stack([np.ones((2, 2)), -np.ones((2, 2)), -np.ones((2, 2))])])
    np.testing.assert_allclose(mean_luminance(imgs), [0.0, 255.0, 0.299 * 255], rtol=1e-12)
    np.testing.assert_allclose(mean_luminance(np.zeros((1, 1, 4, 4))), [127.5])
