"""The reproduction recipes of configs/reproduce/ resolve as written and run end to end in tiny mode
on random-weight models of the released layouts (a flat google/ddpm-* folder, an SD 1.x folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gensample.cli import main
from sd_models import flatten

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "reproduce"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _flat_ddpm_folder(folder: Path) -> Path:
    """A tiny random DDPMPipeline (UNet2DModel 3x32x32) in the flat layout of google/ddpm-cifar10-32."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return flatten(folder)


def test_every_recipe_resolves():
    from gensample.api import resolve_options

    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        import yaml

        sampler = yaml.safe_load(f.read_text())["sampler"]
        resolve_options(sampler, config=str(f))  # every key is an option of its sampler
        tests = " ".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
        assert f.name in tests, f"{f.name}: no test runs this recipe in tiny mode"


def test_ts_ddim_cifar10_recipe_settings_and_tiny_run(tmp_path):
    """Paper settings (10 steps, w = 40, t_c = 200) on a flat-layout DDPM folder; --window 0 is DDIM."""
    from gensample.api import resolve_options

    recipe = RECIPES / "ts_ddim_cifar10.yaml"
    cfg = resolve_options("ts-ddim", config=str(recipe))
    assert (cfg["steps"], cfg["window"], cfg["cutoff"], cfg["model"]) == (10, 40, 200, "google/ddpm-cifar10-32")
    model = _flat_ddpm_folder(tmp_path / "ddpm-cifar10-32")
    outs = {}
    for name, extra in (("ts", ()), ("ddim", ("--window", 0))):
        out = tmp_path / name
        res = invoke("run", "--config", recipe, "--model", model, "--device", "cpu", "-n", 4, "--batch-size", 4,
                     "--no-progress", "-o", out, *extra)
        assert res.exit_code == 0, res.output
        with np.load(out / "samples.npz") as z:
            outs[name] = z["x"]
        assert outs[name].shape == (4, 3, 32, 32) and len(list((out / "images").glob("*.png"))) == 4
    ref = tmp_path / "plain"
    res = invoke("run", "--sampler", "ddim", "--model", model, "--steps", 10, "--device", "cpu", "-n", 4,
                 "--batch-size", 4, "--no-progress", "-o", ref)
    assert res.exit_code == 0, res.output
    with np.load(ref / "samples.npz") as z:
        assert np.array_equal(z["x"], outs["ddim"])  # the paired baseline is DDIM bit for bit


def test_fkc_cfg_sd15_recipe_runs_tiny(tmp_path):
    """FKC-CFG on a random SD 1.x-layout folder: 4 prompts spread over the groups, one image per group."""
    from sd_models import save_sd_pipeline

    from gensample.api import resolve_options

    recipe = RECIPES / "fkc_cfg_sd15.yaml"
    cfg = resolve_options("fkc", config=str(recipe))
    assert (cfg["fkc_target"], cfg["particles"], cfg["final"], cfg["max_log_increment"]) == ("cfg", 8, "one_per_group", 2.0)
    sd = save_sd_pipeline(tmp_path / "sd1", 1, variant="fp16")  # the recipe loads the fp16 variant files
    out = tmp_path / "o"
    res = invoke("run", "--config", recipe, "--model", sd, "--device", "cpu", "--dtype", "fp32",
                 "-n", 4, "--particles", 2, "--steps", 2, "--no-progress", "-o", out)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["stats"]["fkc"]["target"] == "cfg"
    assert len(list((out / "images").glob("*.png"))) == 4
