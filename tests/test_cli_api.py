"""CLI and API surface: list, config recipes, outputs, and every user error
(exit code 2, one message naming the bad value, no traceback)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import gensample
from gensample.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_list_shows_samplers_and_models():
    res = invoke("list")
    assert res.exit_code == 0
    for word in ("ddpm", "ddim", "dpm", "euler", "gmm2d", "gmm-digits", "gmm:FILE"):
        assert word in res.output


def test_run_writes_outputs_and_record(tmp_path):
    out = tmp_path / "o"
    res = invoke("run", "--sampler", "ddim", "--model", "gmm-digits", "-n", "5", "--steps", "4", "-o", str(out))
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["nfe"] == 4 and rec["config"]["steps"] == 4
    assert {"torch", "diffusers", "gensample"} <= set(rec["versions"])
    assert rec["wall_time_s"] > 0 and rec["device"] == "cpu"
    with np.load(out / "samples.npz") as z:
        assert z["x"].shape == (5, 1, 8, 8) and z["x"].dtype == np.float32
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert (out / "grid.png").exists()


def test_config_file_values_are_defaults_flags_override(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("sampler: ddim\nmodel: gmm2d\nsteps: 7\nnum-samples: 3\neta: 0.5\n")
    out = tmp_path / "o"
    res = invoke("run", "--config", str(cfg), "--steps", "5", "-o", str(out))
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["steps"] == 5 and rec["config"]["num_samples"] == 3 and rec["config"]["eta"] == 0.5


def test_python_api_mirrors_cli(tmp_path):
    r = gensample.run(sampler="ddim", model="gmm2d", steps=5, num_samples=4, seed=3, progress=False)
    assert r.x.shape == (4, 2) and r.record["nfe"] == 5
    out = tmp_path / "o"
    invoke("run", "--sampler", "ddim", "--model", "gmm2d", "--steps", "5", "-n", "4", "--seed", "3", "-o", str(out))
    with np.load(out / "samples.npz") as z:
        assert np.array_equal(z["x"], r.x)


def test_gmm_json_model(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"weights": [1, 1], "means": [[-1.0, 0.0], [1.0, 0.0]], "stds": [0.2, 0.2]}))
    r = gensample.run("ddim", f"gmm:{f}", steps=20, num_samples=200, progress=False)
    assert r.x.shape == (200, 2)
    assert 0.3 < (r.x[:, 0] > 0).mean() < 0.7


def test_every_sampler_runs_with_no_other_flag(tmp_path, monkeypatch):
    """`gensample run --sampler X` alone works for the baseline samplers (demo model, default
    steps) and writes runs/<sampler>-<model>-<config hash>/ under the working folder (here tmp)."""
    monkeypatch.chdir(tmp_path)
    for s in ("ddim", "dpm", "euler"):
        res = invoke("run", "--sampler", s)
        assert res.exit_code == 0, res.output
        (folder,) = (tmp_path / "runs").glob(f"{s}-gmm2d-*")
        assert (folder / "samples.npz").exists() and str(folder.relative_to(tmp_path)) in res.output


BAD = [
    (["run", "--sampler", "nope"], "nope"),
    (["run", "--sampler", "ddim", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["run", "--sampler", "ddim", "--steps", "0"], "--steps must be >= 1"),
    (["run", "--sampler", "ddim", "--steps", "5000"], "--steps must be <= the training schedule's 1000"),
    (["run", "--sampler", "ddim", "-n", "0"], "--num-samples must be >= 1"),
    (["run", "--sampler", "ddim", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["run", "--sampler", "ddim", "--device", "cuda"], "CUDA is not available"),
    (["run", "--sampler", "ddim", "--device", "tpu"], "--device must be"),
    (["run", "--sampler", "ddim", "--model", "gmm2d", "--class-label", "9"], "--class-label must be in [0, 2]"),
    (["run", "--sampler", "ddim", "--model", ""], "--model must be a non-empty model spec"),
    (["run", "--sampler", "ddim", "--model", "gmm:/"], "is a directory"),
    (["run", "--sampler", "ddim", "--eta", "-1"], "--eta must be >= 0.0"),
    (["run", "--sampler", "ddpm", "--eta", "0.5"], "--eta does not apply to sampler 'ddpm'"),
    (["run", "--sampler", "ddim", "--model", "gmm:/no/such/file.json"], "mixture file not found"),
    (["run", "--sampler", "ddim", "--model", "zzz:abc"], "unknown model prefix 'zzz'"),
    (["run"], "--sampler is required"),
]


@pytest.mark.parametrize("args, msg", BAD, ids=[" ".join(a[1:4]) for a, _ in BAD])
def test_user_errors_exit_2_with_message(args, msg, tmp_path):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    out = tmp_path / "o"
    res = invoke(*args, *(["-o", str(out)] if len(args) > 1 else []))
    assert res.exit_code == 2, res.output
    assert msg in res.output, res.output
    assert "Traceback" not in res.output
    assert not out.exists()  # a refused run leaves nothing behind


def test_bad_mixture_files_and_configs(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"weights": [1, 1], "means": [[0.0, 1.0], [0.0]], "stds": [1, 1]}))
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"weights": [1, 1, 1], "means": [[0.0], [1.0]], "stds": [1, 1, 1]}))
    unconditional = tmp_path / "u.json"
    unconditional.write_text(json.dumps({"weights": [1], "means": [[0.0]], "stds": [1]}))
    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("steps: [unclosed\n")
    not_mapping = tmp_path / "l.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    unknown_key = tmp_path / "k.yaml"
    unknown_key.write_text("sampler: ddim\nwindow_sizee: 3\n")
    cases = [
        (["--model", f"gmm:{bad_json}"], "not valid JSON"),
        (["--model", f"gmm:{ragged}"], "malformed arrays"),
        (["--model", f"gmm:{shape}"], "means must have shape"),
        (["--model", f"gmm:{unconditional}", "--class-label", "0"], "unconditional"),
        (["--model", f"gmm:{unconditional}", "--guidance-scale", "3"], "--guidance-scale needs a class-conditional model"),
        (["--config", str(tmp_path / "missing.yaml")], "cannot read config file"),
        (["--config", str(bad_yaml)], "not valid YAML"),
        (["--config", str(not_mapping)], "must hold a mapping"),
        (["--config", str(unknown_key)], "unknown option 'window_sizee'"),
    ]
    for extra, msg in cases:
        res = invoke("run", "--sampler", "ddim", "-n", "2", "--steps", "2", "-o", str(tmp_path / "o"), *extra)
        assert res.exit_code == 2, (extra, res.output)
        assert msg in res.output, (extra, res.output)
        assert "Traceback" not in res.output


def test_explicit_sampler_wins_over_recipe(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("sampler: ddim\nmodel: gmm2d\nsteps: 3\nnum-samples: 2\n")
    out = tmp_path / "o"
    res = invoke("run", "--config", str(cfg), "--sampler", "euler", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["sampler"] == "euler"
