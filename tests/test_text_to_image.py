"""Stable Diffusion-class text-to-image models end to end: loading (nested / flat), prompts, text
CFG (+ rescale), VAE decoding, every image sampler from the CLI, and the errors (docs/text_to_image.md).

The models are tiny random SD 1.x (epsilon) / 2.x (v-prediction) pipelines built offline
(tests/sd_models.py). The oracle for the sampling math is diffusers' own StableDiffusionPipeline
run on the same weights, scheduler config and initial latents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

import gensample  # noqa: E402
from gensample.cli import main  # noqa: E402
from gensample.models.loading import load_model  # noqa: E402
from gensample.samplers.registry import sample_seed  # noqa: E402

from sd_models import LATENT, PIXELS, save_sd_pipeline  # noqa: E402

IMAGE_SAMPLERS = ["ddpm", "ddim", "dpm", "euler", "ts-ddim", "ts-ddpm", "oms", "fkc", "stsl", "dps", "psld"]


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """{(version, layout): folder} for SD 1.x / 2.x in the nested and the flat layout."""
    root = tmp_path_factory.mktemp("sd")
    return {(v, layout): save_sd_pipeline(root / f"sd{v}-{layout}", v, layout) for v in (1, 2) for layout in ("nested", "flat")}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


# -- loading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,layout", [(1, "nested"), (2, "flat")])
def test_pipeline_folder_loads_whole(sd_dirs, version, layout):
    m = load_model(str(sd_dirs[(version, layout)]))
    assert type(m.unet).__name__ == "UNet2DConditionModel"
    assert {type(m.extras[k]).__name__ for k in ("vae", "text_encoder")} == {"AutoencoderKL", "CLIPTextModel"}
    assert "CLIPTokenizer" in type(m.extras["tokenizer"]).__name__
    assert m.extras["text_conditional"] is True and m.text_conditional and m.is_latent
    assert m.event_shape == (4, LATENT, LATENT) and m.extras["pixel_shape"] == (3, PIXELS, PIXELS)
    assert m.prediction_type == ("v_prediction" if version == 2 else "epsilon")
    assert m.scheduler_config["beta_schedule"] == "scaled_linear"


def test_flat_and_nested_layouts_give_the_same_model(sd_dirs):
    a, b = load_model(str(sd_dirs[(2, "nested")])), load_model(str(sd_dirs[(2, "flat")]))
    for part in ("vae", "text_encoder"):
        sa, sb = a.extras[part].state_dict(), b.extras[part].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ua, ub = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(ua[k], ub[k]) for k in ua)


def test_encode_prompt_is_sd_text_conditioning(sd_dirs):
    folder = sd_dirs[(1, "nested")]
    m = load_model(str(folder))
    pipe = _pipeline(folder)
    pos, neg = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True, negative_prompt=["red", "red"])
    ours = m.encode_prompt(["a cat", "a dog"], "cpu")["encoder_hidden_states"]
    torch.testing.assert_close(ours, pos)
    torch.testing.assert_close(m.encode_prompt(["red"], "cpu")["encoder_hidden_states"][0], neg[0])
    m.prompts = ["a cat", "a dog"]
    m.prepare_batch([5, 6, 7])  # sample i gets prompt i % 2
    c = m.cond_for(None, 3, "cpu")["encoder_hidden_states"]
    torch.testing.assert_close(c, torch.stack([pos[1], pos[0], pos[1]]))
    torch.testing.assert_close(m.cond_for(None, 2, "cpu", prompt="a dog")["encoder_hidden_states"], pos[[1, 1]])
    with pytest.raises(ValueError, match="--prompt instead of --class-label"):
        m.cond_for(3, 2, "cpu")


def test_decode_is_vae_decode_of_unscaled_latents(sd_dirs):
    m = load_model(str(sd_dirs[(1, "nested")]))
    z = torch.randn(3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    vae = m.extras["vae"]
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
        got = m.decode(z)
    assert got.dtype == torch.float32 and got.shape == (3, 3, PIXELS, PIXELS)
    torch.testing.assert_close(got, want)


# -- sampling math against diffusers' StableDiffusionPipeline ------------------------------------
@pytest.mark.parametrize("sampler,version,rescale", [("ddim", 1, 0.0), ("ddim", 2, 0.0), ("euler", 2, 0.7), ("euler", 1, 0.0)])
def test_text_cfg_matches_stable_diffusion_pipeline(sd_dirs, sampler, version, rescale):
    """Same weights, scheduler config and x_T: our eps-convention loop (v converted to eps) with
    batched text CFG, and rescaled CFG on the raw output, equals diffusers' pipeline."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    folder = sd_dirs[(version, "nested")]
    prompts, neg, w, steps = ["a cat", "a dog"], "red", 5.0, 4
    res = gensample.run(sampler, str(folder), prompt=prompts, negative_prompt=neg, guidance_scale=w,
                        guidance_rescale=rescale or None, steps=steps, num_samples=2, progress=False, device="cpu")
    pipe = _pipeline(folder)
    pipe.scheduler = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[sampler].from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(2)]
    x_T = torch.stack([torch.randn((4, LATENT, LATENT), generator=g) for g in gens])  # the run's per-sample draws
    kwargs = {"eta": 0.0} if sampler == "ddim" else {}
    out = pipe(prompt=prompts, negative_prompt=[neg] * 2, latents=x_T, num_inference_steps=steps, guidance_scale=w,
               guidance_rescale=rescale, output_type="latent", **kwargs).images
    np.testing.assert_allclose(res.samples["x"], out.numpy(), atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        pix = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    np.testing.assert_allclose(res.samples["images"], pix.numpy(), atol=2e-4)


def test_fkc_particle_groups_take_prompts_in_turn(sd_dirs, monkeypatch):
    """FKC: group g (all K particles) is conditioned on prompts[g % P], also when P divides K, so
    every prompt gets groups (the rule used to take the group's first row index, g * K % P = 0)."""
    from gensample.models.loading import LoadedModel

    seen = []
    encode = LoadedModel.encode_prompt

    def spy(self, prompts, device):
        seen.append(list(prompts))
        return encode(self, prompts, device)

    monkeypatch.setattr(LoadedModel, "encode_prompt", spy)
    res = gensample.run("fkc", str(sd_dirs[(1, "nested")]), prompt=["a cat", "a dog"], particles=2, num_samples=8,
                        steps=1, progress=False)
    assert ["a cat"] * 2 + ["a dog"] * 2 + ["a cat"] * 2 + ["a dog"] * 2 in seen, seen
    # run.json states the rule the groups follow, not the per-sample rule of the other samplers
    assert res.record["text_conditioning"]["prompt_of_sample"].startswith("prompts[(i // 2) % len(prompts)]")


def test_prompts_cycle_over_sample_indices_and_empty_prompt_default(sd_dirs, tmp_path):
    folder = str(sd_dirs[(1, "flat")])
    common = dict(steps=2, num_samples=3, progress=False, guidance_scale=3.0)
    both = gensample.run("ddim", folder, prompt=["a cat", "a dog"], **common).samples["x"]
    cat = gensample.run("ddim", folder, prompt="a cat", **common).samples["x"]
    dog = gensample.run("ddim", folder, prompt="a dog", **common).samples["x"]
    np.testing.assert_array_equal(both[[0, 2]], cat[[0, 2]])
    np.testing.assert_array_equal(both[1], dog[1])
    assert not np.allclose(cat[1], dog[1])
    none = gensample.run("ddim", folder, output=str(tmp_path / "o"), **common)
    empty = gensample.run("ddim", folder, prompt="", **common).samples["x"]
    np.testing.assert_array_equal(none.samples["x"], empty)
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    tc = rec["text_conditioning"]
    assert tc["prompts"] == [""] and tc["prompt_given"] is False and "empty prompt" in tc["note"]


# -- the CLI: every image sampler writes decoded PNGs of the pixel size ---------------------------
_EXTRA = {
    "fkc": ["--particles", "2", "--fkc-target", "cfg"],
}


def _sampler_args(sampler, tmp_path, version):
    if sampler == "oms":
        from gensample.models.oms import SMALL_CONFIG, OMSModule

        torch.manual_seed(0)
        mod = OMSModule(**dict(SMALL_CONFIG, in_channels=4, out_channels=4))
        mod.save_pretrained(tmp_path / "oms")
        return ["--oms-module", tmp_path / "oms"]
    if sampler == "fkc-product":  # a product of two prompts as FKC experts
        return ["--particles", "2", "--fkc-target", "product", "--experts-prompts", "a cat|a dog"]
    return list(_EXTRA.get(sampler, []))


CASES = IMAGE_SAMPLERS + ["fkc-product"]


@pytest.mark.parametrize("case", CASES)
def test_cli_every_image_sampler_writes_decoded_pngs(sd_dirs, case, tmp_path):
    """Each case on one of SD 1.x / 2.x x nested / flat (cycled); fkc-product: two prompts as experts."""
    from PIL import Image

    version, layout = [(1, "nested"), (2, "flat"), (2, "nested"), (1, "flat")][CASES.index(case) % 4]
    out = tmp_path / "o"
    sampler = case.split("-product")[0]
    cfg_args = [] if case == "fkc-product" else ["--guidance-scale", 5]  # the product target has no CFG scale
    res = invoke("run", "--sampler", sampler, "--model", sd_dirs[(version, layout)], "--prompt", "a cat",
                 "--negative-prompt", "red", *cfg_args, "--steps", 4, "-n", 2, "-o", out, "--no-progress",
                 *_sampler_args(case, tmp_path, version))
    assert res.exit_code == 0, res.output
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png"] and (out / "grid.png").exists()
    assert all(Image.open(p).size == (PIXELS, PIXELS) and Image.open(p).mode == "RGB" for p in pngs)
    with np.load(out / "samples.npz") as z:
        if "images" in z.files:  # generation samplers: latents in x, decoded pixels beside them
            assert z["x"].shape == (2, 4, LATENT, LATENT) and z["images"].shape == (2, 3, PIXELS, PIXELS)
            assert np.abs(z["images"]).max() <= 1.0
        else:  # the inverse-problem solvers return pixels (decoded inside the method)
            assert z["x"].shape == (2, 3, PIXELS, PIXELS)
    rec = json.loads((out / "run.json").read_text())
    assert rec["text_conditioning"]["prompts"] == ["a cat"] and rec["text_conditioning"]["negative_prompt"] == "red"


def test_cli_prompts_file_height_width_and_rescale(sd_dirs, tmp_path):
    from PIL import Image

    pf = tmp_path / "prompts.txt"
    pf.write_text("a cat\n\na dog\n")
    out = tmp_path / "o"
    res = invoke("run", "--sampler", "euler", "--model", sd_dirs[(2, "nested")], "--prompts", pf, "--guidance-scale", 4,
                 "--guidance-rescale", 0.5, "--height", 12, "--width", 20, "--steps", 2, "-n", 3, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert Image.open(out / "images" / "000002.png").size == (20, 12)
    with np.load(out / "samples.npz") as z:
        assert z["x"].shape == (3, 4, 6, 10) and z["images"].shape == (3, 3, 12, 20)
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["prompt"] == ["a cat", "a dog"] and rec["config"]["guidance_rescale"] == 0.5


def test_fp16_weights_variant(tmp_path):
    folder = save_sd_pipeline(tmp_path / "sd16", 1, "nested", variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    out = tmp_path / "o"
    res = invoke("run", "--sampler", "ddim", "--model", folder, "--weights-variant", "fp16", "--prompt", "a cat",
                 "--steps", 2, "-n", 1, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert (out / "images" / "000000.png").exists()
    m = load_model(str(folder), variant="fp16")
    assert next(m.unet.parameters()).dtype == torch.float32  # upcast at load; --dtype picks the run's precision
    res = invoke("run", "--sampler", "ddim", "--model", folder, "--steps", 2, "-n", 1, "-o", tmp_path / "p")
    assert res.exit_code == 2 and "could not load unet" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args,match", [
    (["--model", "gmm-digits", "--prompt", "a cat"], "need a text-to-image model"),
    (["--model", "SD", "--class-label", "3"], "--class-label"),
    (["--model", "SD", "--height", 13], "multiple of the VAE scale factor 2"),
    (["--model", "SD", "--guidance-rescale", 1.5], "--guidance-rescale must be"),
    (["--model", "SD", "--prompts", "MISSING"], "none.txt"),
    (["--model", "gmm-digits", "--height", 16], "apply to latent (VAE) models"),
    (["--model", "SD", "--dtype", "fp16", "--device", "cpu"], "needs --device cuda"),
])
def test_user_errors_exit_2(sd_dirs, tmp_path, args, match):
    args = [sd_dirs[(1, "nested")] if a == "SD" else tmp_path / "none.txt" if a == "MISSING" else a for a in args]
    res = invoke("run", "--sampler", "ddim", "--steps", 2, "-n", 1, "-o", tmp_path / "o", *args)
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output


def test_guidance_on_text_model_is_allowed_and_changes_samples(sd_dirs):
    folder = str(sd_dirs[(1, "nested")])
    a = gensample.run("ddim", folder, prompt="a cat", steps=2, num_samples=1, progress=False).samples["x"]
    b = gensample.run("ddim", folder, prompt="a cat", guidance_scale=7.5, steps=2, num_samples=1, progress=False).samples["x"]
    assert not np.allclose(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_cuda_decodes_in_float32(sd_dirs, tmp_path, dtype):
    folder = str(sd_dirs[(1, "nested")])
    common = dict(prompt="a cat", negative_prompt="red", guidance_scale=5.0, steps=4, num_samples=2, progress=False)
    ref = gensample.run("ddim", folder, device="cuda", **common).samples
    half = gensample.run("ddim", folder, device="cuda", dtype=dtype, output=str(tmp_path / "o"), **common).samples
    assert np.isfinite(half["images"]).all() and half["images"].dtype == np.float32
    assert (tmp_path / "o" / "images" / "000001.png").exists()
    # same math at lower precision: close to the fp32 run on this tiny random net
    assert np.abs(half["x"] - ref["x"]).max() < (0.05 if dtype == "fp16" else 0.3)


@pytest.mark.parametrize("sampler", ["stsl", "dps", "psld"])
def test_inverse_solvers_from_an_image_on_a_text_model(sd_dirs, tmp_path, sampler):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "o"
    res = invoke("run", "--sampler", sampler, "--model", sd_dirs[(1, "nested")], "--prompt", "a cat", "--from-image", img,
                 "--steps", 4, "-n", 2, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert Image.open(out / "images" / "000001.png").size == (PIXELS, PIXELS)


def test_inpainting_pipeline_is_refused_with_a_reason(tmp_path):
    from sd_fixtures import tiny_sd_pipeline

    tiny_sd_pipeline(tmp_path, kind="inpaint").save_pretrained(tmp_path / "inp")
    with pytest.raises(ValueError, match="inpainting"):
        load_model(str(tmp_path / "inp"))
