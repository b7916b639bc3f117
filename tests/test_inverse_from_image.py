"""Latent STSL / DPS / PSLD from the CLI with ``--from-image``: the operator is built on the VAE's pixel
shape and the image is the ground truth (digits-ldm, and a tiny random Stable Diffusion 1.x folder with
a prompt, through the agreed text-conditioning interface)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

torch.set_num_threads(1)


def invoke(*args):
    from gensample.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("sampler", ["stsl", "dps", "psld"])
def test_from_image_on_digits_ldm(tmp_path, sampler):
    """8x8 digits-ldm: latents 2x4x4, operator on the 1x8x8 pixels; a 16x16 RGB PNG is converted to
    L and resized to the pixel shape; x_true is that image."""
    from gensample.eval.digits_data import real_digits

    d = real_digits("test")[0][4, 0]  # (8, 8) in [-1, 1]
    big = np.kron(np.rint((d + 1) * 127.5).astype(np.uint8), np.ones((2, 2), np.uint8))
    Image.fromarray(np.stack([big] * 3, -1)).save(tmp_path / "in.png")
    out = tmp_path / "o"
    r = invoke("run", "--sampler", sampler, "--model", "digits-ldm", "--from-image", tmp_path / "in.png", "--task",
               "inpaint-box", "--steps", 3, "-n", 2, "--device", "cpu", "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    z = np.load(out / "samples.npz")
    assert z["x"].shape == (2, 1, 8, 8) and z["y"].shape == (2, 1, 8, 8)
    expect = np.asarray(Image.fromarray(np.stack([big] * 3, -1)).convert("L").resize((8, 8), Image.BICUBIC), np.float64) / 127.5 - 1
    np.testing.assert_allclose(z["x_true"][0, 0], expect, atol=1e-5)
    assert (out / "before_after.png").exists() and (out / "metrics.json").exists()


def test_from_image_errors(tmp_path):
    r = invoke("run", "--sampler", "dps", "--model", "digits-ldm", "--from-image", tmp_path / "none.png", "-n", 1,
               "--steps", 2, "--device", "cpu", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "--from-image file not found" in r.output and "Traceback" not in r.output
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    r = invoke("run", "--sampler", "dps", "--model", "digits-ldm", "--from-image", tmp_path / "a.png", "--from-digit", 1,
               "-n", 1, "--steps", 2, "--device", "cpu", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "pass one of" in r.output
    r = invoke("run", "--sampler", "dps", "--model", "gmm2d", "--from-image", tmp_path / "a.png", "-n", 1, "--steps", 2,
               "--device", "cpu", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "image model" in r.output


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from sd_models import save_sd_pipeline

    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd1", 1, "nested")


@pytest.mark.parametrize("sampler", ["stsl", "psld"])
def test_from_image_on_a_text_to_image_model(sd_dir, tmp_path, sampler):
    """Tiny SD 1.x (latents 4x8x8, pixels 3x16x16): the operator acts on the VAE's pixel shape, the
    prompt conditions the UNet (run.json records it), outputs are decoded pixels of that shape."""
    import json

    from sd_models import PIXELS

    rgb = np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    out = tmp_path / "o"
    r = invoke("run", "--sampler", sampler, "--model", sd_dir, "--prompt", "a cat", "--from-image", tmp_path / "in.png",
               "--task", "sr-avgpool", "--steps", 2, "--inner-steps", 1, "-n", 1, "--device", "cpu", "-o", out,
               "--no-progress") if sampler == "stsl" else invoke(
        "run", "--sampler", sampler, "--model", sd_dir, "--prompt", "a cat", "--from-image", tmp_path / "in.png",
        "--task", "sr-avgpool", "--steps", 2, "-n", 1, "--device", "cpu", "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    z = np.load(out / "samples.npz")
    assert z["x"].shape[1:] == (3, PIXELS, PIXELS) and z["y"].shape[1:] == (3, PIXELS // 2, PIXELS // 2)
    np.testing.assert_allclose(z["x_true"][0], rgb.transpose(2, 0, 1) / 127.5 - 1, atol=1e-5)
    rec = json.loads((out / "run.json").read_text())
    assert "a cat" in json.dumps(rec)


@pytest.mark.parametrize("sampler", ["dps", "smc-post"])
def test_latent_solvers_keep_the_latents_beside_the_pixels(sd_dir, tmp_path, sampler):
    """A latent model's samples.npz holds the decoded pixels ("x") and the latents they decode from
    ("latents", the model's event shape): decoding the stored latents gives the stored pixels."""
    from gensample.models.loading import load_model
    from sd_models import LATENT, PIXELS

    rgb = np.random.default_rng(1).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    out = tmp_path / "o"
    extra = ["--particles", 2] if sampler == "smc-post" else []
    r = invoke("run", "--sampler", sampler, "--model", sd_dir, "--prompt", "a cat", "--from-image", tmp_path / "in.png",
               "--task", "sr-avgpool", "--steps", 2, "-n", 2, "--device", "cpu", "-o", out, "--no-progress", *extra)
    assert r.exit_code == 0, r.output
    z = np.load(out / "samples.npz")
    assert z["latents"].shape == (2, 4, LATENT, LATENT) and z["x"].shape == (2, 3, PIXELS, PIXELS)
    with torch.no_grad():
        pix = load_model(str(sd_dir)).decode(torch.from_numpy(z["latents"])).numpy()
    np.testing.assert_allclose(pix, np.clip(z["x"], -1, 1), atol=1e-4)
