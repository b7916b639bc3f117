"""Released OMS folders (oms_module/ + fp16 weights + text-encoder pointers) through the loader and
the CLI, on tiny random Stable Diffusion-layout bases built offline (tests/sd_models.py)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample.cli import main
from gensample.models.loading import load_model
from gensample.models.oms import OMSModule, load_oms_release
from gensample.samplers.oms import load_oms

from oms_fixtures import tiny_text_oms, write_oms_release
from sd_models import LATENT, PIXELS, save_sd_pipeline


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny SD 1.x base (fp16 variant, as the recipe loads it), an SD 2.x folder the OMS text
    pointers name (its own text encoder, other weights), and two releases: with text pointers and
    without text folders."""
    root = tmp_path_factory.mktemp("oms_release")
    d = {"sd1": save_sd_pipeline(root / "sd1", 1, seed=0, variant="fp16"),
         "sd2": save_sd_pipeline(root / "sd2", 2, seed=5)}
    d["module"] = write_oms_release(root / "oms_rel", text_target=d["sd2"])
    write_oms_release(root / "oms_rel_notext", text_target=None)
    d["rel"], d["rel_notext"] = root / "oms_rel", root / "oms_rel_notext"
    return d


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_release_layout_loads_strictly_with_the_fp16_variant(dirs):
    rel = load_oms_release(str(dirs["rel"]), variant="fp16")
    assert set(rel.module.state_dict()) == set(dirs["module"].state_dict())
    x, ehs = torch.randn(2, 4, LATENT, LATENT), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(rel.module(x, ehs).sample, dirs["module"](x, ehs).sample)  # positional context, as the reference calls it
    assert rel.module.dtype == torch.float32
    assert type(rel.text_encoder).__name__ == "CLIPTextModel" and rel.tokenizer is not None
    own = load_model(str(dirs["sd2"])).extras["text_encoder"].state_dict()
    assert all(torch.equal(v, own[k]) for k, v in rel.text_encoder.state_dict().items())  # the pointer's target
    assert rel.sources["text_encoder"].endswith("(subfolder text_encoder)")


@pytest.mark.parametrize("variant,expect", [
    (None, ["oms_module/diffusion_pytorch_model.safetensors", "--oms-variant fp16"]),
    ("bf16", ["oms_module/diffusion_pytorch_model.bf16.safetensors", "--oms-variant fp16"]),
])
def test_missing_weights_name_the_file(dirs, variant, expect):
    with pytest.raises(ValueError) as err:
        load_oms_release(str(dirs["rel"]), variant=variant)
    assert all(e in str(err.value) for e in expect), str(err.value)


def test_strict_keys(dirs, tmp_path):
    """A weights file with a key the module does not have (e.g. a time-embedding weight) is refused."""
    from safetensors.torch import load_file, save_file

    write_oms_release(tmp_path / "r")
    f = tmp_path / "r" / "oms_module" / "diffusion_pytorch_model.fp16.safetensors"
    sd = load_file(str(f))
    sd["time_embedding.linear_1.weight"] = torch.zeros(2, 2, dtype=torch.float16)
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="unexpected"):
        load_oms_release(str(tmp_path / "r"), variant="fp16")


def _run(dirs, out, *extra, rel="rel"):
    return invoke("run", "--sampler", "oms", "--model", dirs["sd1"], "--weights-variant", "fp16", "--prompt", "a cat",
                  "--oms-module", dirs[rel], "--oms-variant", "fp16", "--steps", 3, "-n", 2, "--no-progress", "-o", out, *extra)


def test_cli_samples_with_a_released_folder(dirs, tmp_path):
    from PIL import Image

    out = tmp_path / "o"
    res = _run(dirs, out, "--oms-guidance", 2, "--guidance-scale", 3)
    assert res.exit_code == 0, res.output
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (PIXELS, PIXELS) for p in pngs)
    assert (out / "compare.png").exists()
    with np.load(out / "samples.npz") as z:
        assert z["x"].shape == (2, 4, LATENT, LATENT) and z["images_no_oms"].shape == (2, 3, PIXELS, PIXELS)
        assert not np.allclose(z["images"], z["images_no_oms"])  # OMS changed the sample
    rec = json.loads((out / "run.json").read_text())
    assert rec["stats"]["oms"]["text_encoder"] == "oms" and rec["stats"]["oms_calls"] == 2  # one batch, OMS-CFG: 2 calls
    b = json.loads((out / "brightness.json").read_text())
    assert set(b["groups"]) == {"a cat"} and b["groups"]["a cat"]["n"] == 2


def test_cli_loading_errors_exit_2_naming_the_file(dirs, tmp_path):
    res = invoke("run", "--sampler", "oms", "--model", dirs["sd1"], "--weights-variant", "fp16", "--prompt", "a cat",
                 "--oms-module", dirs["rel"], "--steps", 2, "-n", 1, "--no-progress", "-o", tmp_path / "o")
    assert res.exit_code == 2, res.output
    assert "oms_module/diffusion_pytorch_model.safetensors" in res.output and "--oms-variant fp16" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o" / "samples.npz").exists()
    res = invoke("run", "--sampler", "oms", "--model", dirs["sd1"], "--weights-variant", "fp16", "--oms-module",
                 tmp_path / "nothing-here", "-n", 1, "-o", tmp_path / "o2")
    assert res.exit_code == 2 and "nothing-here" in res.output and "Traceback" not in res.output


def test_text_encoder_fallback_to_the_base(dirs, tmp_path):
    """No oms_text_encoder/ in the folder: the base pipeline's text encoder conditions psi (as the
    reference pipeline does). Same module weights, other encoder -> other x_T; the fallback equals a
    release whose pointer names the base's own folder."""
    model = load_model(str(dirs["sd1"]), variant="fp16")
    parts = load_oms(str(dirs["rel_notext"]), model, "fp16")
    assert parts.text_source == "base" and parts.text_encoder is model.extras["text_encoder"]
    base_ctx = model.encode_prompt(["a cat"], "cpu")["encoder_hidden_states"]
    torch.testing.assert_close(parts.encode(["a cat"], "cpu"), base_ctx, rtol=0, atol=0)
    own = load_oms(str(dirs["rel"]), model, "fp16")
    assert own.text_source == "oms" and not torch.allclose(own.encode(["a cat"], "cpu"), base_ctx)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(dirs, a, rel="rel_notext").exit_code == 0
    assert _run(dirs, b).exit_code == 0
    with np.load(a / "samples.npz") as za, np.load(b / "samples.npz") as zb:
        np.testing.assert_array_equal(za["x_no_oms"], zb["x_no_oms"])  # same base draws
        assert not np.allclose(za["x"], zb["x"])  # the OMS text encoder matters
    assert json.loads((a / "run.json").read_text())["stats"]["oms"]["text_encoder"] == "base"
    # --oms-text-encoder: "base" forces the fallback; a pipeline folder replaces the pointer's target
    forced = load_oms(str(dirs["rel"]), model, "fp16", text_override="base")
    assert forced.text_source == "base" and forced.text_encoder is model.extras["text_encoder"]
    other = load_oms(str(dirs["rel_notext"]), model, "fp16", text_override=str(dirs["sd2"]))
    torch.testing.assert_close(other.encode(["a cat"], "cpu"), own.encode(["a cat"], "cpu"), rtol=0, atol=0)


def test_text_module_width_mismatch_and_prompt_rules(dirs, tmp_path):
    write_oms_release(tmp_path / "wide", text_target=None, cross_attention_dim=16)
    res = _run({**dirs, "wide": tmp_path / "wide"}, tmp_path / "o", rel="wide")
    assert res.exit_code == 2 and "16-dim" in res.output and "32-dim" in res.output, res.output
    # --oms-prompt replaces the prompt for the OMS step only; the base keeps --prompt
    a, b = tmp_path / "p1", tmp_path / "p2"
    assert _run(dirs, a).exit_code == 0
    assert _run(dirs, b, "--oms-prompt", "red").exit_code == 0
    with np.load(a / "samples.npz") as za, np.load(b / "samples.npz") as zb:
        assert not np.allclose(za["x"], zb["x"])
        np.testing.assert_array_equal(za["x_no_oms"], zb["x_no_oms"])
    res = _run(dirs, tmp_path / "o3", "--oms-class", 1)
    assert res.exit_code == 2 and "--oms-class" in res.output


def test_hub_id_offline_is_a_usage_error(dirs, tmp_path):
    res = invoke("run", "--sampler", "oms", "--model", dirs["sd1"], "--weights-variant", "fp16", "--oms-module",
                 "h1t/no_such_oms_release", "--oms-variant", "fp16", "-n", 1, "-o", tmp_path / "o",
                 env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 2 and "h1t/no_such_oms_release" in res.output and "Traceback" not in res.output


def test_bare_module_folder_still_loads(tmp_path):
    m = tiny_text_oms()
    m.save_pretrained(tmp_path / "m")
    got = load_oms_release(str(tmp_path / "m")).module
    assert isinstance(got, OMSModule) and all(torch.equal(v, m.state_dict()[k]) for k, v in got.state_dict().items())


RECIPE = __import__("pathlib").Path(__file__).parents[1] / "configs" / "reproduce" / "oms_sd15_brightness.yaml"


def test_sd15_brightness_recipe_settings():
    """The recipe resolves as written: the released module in fp16, 4 prompts x 64 seeds, the
    README's 20 steps / CFG 7.5 / OMS-CFG 2 / seed 100, on CUDA."""
    from gensample.api import resolve_options

    cfg = resolve_options("oms", config=str(RECIPE))
    assert cfg["oms_module"] == "h1t/oms_b_openclip_15_21" and cfg["oms_variant"] == "fp16"
    assert cfg["weights_variant"] == "fp16" and cfg["dtype"] == "fp16" and cfg["device"] == "cuda"
    assert len(cfg["prompt"]) == 4 and cfg["num_samples"] == 64 * 4
    assert (cfg["steps"], cfg["guidance_scale"], cfg["oms_guidance"], cfg["seed"]) == (20, 7.5, 2.0, 100)


def test_sd15_brightness_recipe_runs_tiny(dirs, tmp_path):
    """The recipe end to end on random weights of the same layouts (fp16-variant SD folder, released
    OMS folder with text pointers), CPU, 8 samples, 2 steps: brightness.json per prompt, both arms."""
    out = tmp_path / "o"
    res = invoke("run", "--config", RECIPE, "--model", dirs["sd1"], "--oms-module", dirs["rel"], "--device", "cpu",
                 "--dtype", "fp32", "-n", 8, "--steps", 2, "--no-progress", "-o", out)
    assert res.exit_code == 0, res.output
    b = json.loads((out / "brightness.json").read_text())
    prompts = ["a solid black background", "a dark night sky", "pure white background", "snow field at noon"]
    assert list(b["groups"]) == prompts
    for row in b["groups"].values():
        assert row["n"] == 2 and 0 <= row["with_oms"] <= 255 and 0 <= row["without_oms"] <= 255 and row["with_oms_se"] >= 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["oms_guidance"] == 2.0 and rec["config"]["guidance_scale"] == 7.5


def test_released_oms_start_composes_with_other_samplers_on_sd(dirs, tmp_path):
    """The released OMS layout before ddim (== the oms sampler, bit for bit) and before FKC-CFG with
    Time-Shift as FKC's step, on an SD 1.x-architecture pipeline (docs/compose.md)."""
    common = ["--model", dirs["sd1"], "--weights-variant", "fp16", "--prompt", "a cat", "--oms-module", dirs["rel"],
              "--oms-variant", "fp16", "--steps", 3, "--no-progress"]
    res = invoke("run", "--sampler", "oms", "--skip-compare", "-n", 2, *common, "-o", tmp_path / "oms")
    assert res.exit_code == 0, res.output
    res = invoke("run", "--sampler", "ddim", "-n", 2, *common, "-o", tmp_path / "ddim")
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "oms" / "samples.npz") as a, np.load(tmp_path / "ddim" / "samples.npz") as b:
        assert np.array_equal(a["x"], b["x"])
    res = invoke("run", "--sampler", "fkc", "--fkc-target", "cfg", "--guidance-scale", 3, "--time-shift", "--particles", 2,
                 "-n", 4, *common, "-o", tmp_path / "fkc")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "fkc" / "run.json").read_text())
    assert rec["stats"]["fkc"]["time_shift"] and rec["stats"]["oms"]["text_encoder"] == "oms"
    with np.load(tmp_path / "fkc" / "samples.npz") as z:
        assert z["x"].shape == (4, 4, LATENT, LATENT) and np.isfinite(z["x"]).all()
