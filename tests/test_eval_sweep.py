"""`gensample eval`: sweep config parsing, the oracle metric, outputs, resumption (issue 3)."""

import csv

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from gensample.cli import main
from gensample.eval.sweep import oracle_metrics, parse_config, run_sweep
from gensample.zoo.analytic import gmm2d_mixture

N = 500


def _oracle_tol(mixture, n):
    # For exact samples E||mu_hat - mu||^2 = tr(S)/n, and the covariance term is O(tr(S)/n) as well;
    # 200 seeds of exact gmm2d draws at n = 500 gave a maximum of 5.7 tr(S)/n, so 10 tr(S)/n keeps
    # false failures rare while ancestral sampling with 5 steps (FD ~ 0.8 = 33 tr(S)/n) lands outside.
    return 10.0 * float(torch.trace(mixture.covariance())) / n


def test_oracle_metric_exact_samples_within_tolerance():
    mix = gmm2d_mixture()
    tol = _oracle_tol(mix, N)
    x = mix.sample(N, torch.Generator().manual_seed(7)).numpy()
    m = oracle_metrics(x, mix, None)
    assert m["value"] <= tol and m["mean_error"] >= 0 and m["cov_rel_error"] >= 0
    # class-conditional moments: class-0 samples match class 0, not the full mixture
    x0 = mix.sample(N, torch.Generator().manual_seed(8), label=0).numpy()
    assert oracle_metrics(x0, mix, 0)["value"] <= tol < oracle_metrics(x0, mix, None)["value"]


def test_tiny_sweep_writes_table_plot_and_resumes(tmp_path, monkeypatch):
    cfg = {
        "model": "gmm2d",
        "steps": [20],
        "seeds": [0],
        "num_samples": N,
        "samplers": [{"sampler": "dpm", "label": "dpm"}, {"sampler": "ddpm", "label": "ddpm-5", "steps": [5]},
                     {"sampler": "ddim", "eta": 1.0, "label": "ddim-eta1", "steps": [5]}],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["eval", str(path), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["label"], int(r["steps"])) for r in rows] == [("dpm", 20), ("ddpm-5", 5), ("ddim-eta1", 5)]
    assert all(r["metric"] == "oracle" for r in rows)
    assert [float(r["nfe"]) for r in rows] == [20.0, 5.0, 5.0]
    tol = _oracle_tol(gmm2d_mixture(), N)
    value = {r["label"]: float(r["value"]) for r in rows}
    assert value["dpm"] <= tol, f"dpm-20 oracle FD {value['dpm']:.4f} > tol {tol:.4f}"
    assert value["ddpm-5"] > tol and value["ddim-eta1"] > tol  # the baselines must fail the same bound
    assert "| ddim-eta1 | 5 |" in (out / "results.md").read_text()
    assert (out / "fid_vs_nfe.png").read_bytes()[:4] == b"\x89PNG"

    import gensample.api

    def no_runs(*args, **kwargs):
        raise AssertionError("a finished sweep row was recomputed")

    monkeypatch.setattr(gensample.api, "run", no_runs)
    again = run_sweep(path, out, progress=False, echo=lambda *_: None)
    assert [r["value"] for r in again] == pytest.approx([float(r["value"]) for r in rows], rel=1e-12)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"samplers": ["ddim"]}, "model"),
        ({"model": "gmm2d", "samplers": ["ddim"], "metric": "kl"}, "metric must be one of"),
        ({"model": "gmm2d", "samplers": ["ddim", "ddim"]}, "duplicate sampler label"),
        ({"model": "gmm2d", "samplers": [{"eta": 1}]}, "sampler"),
        ({"model": "gmm2d", "samplers": ["ddim"], "steps": "ten"}, "steps"),
        ({"model": "gmm2d", "samplers": ["ddim"], "stepz": [1]}, "unknown eval config keys"),
        ({"model": "gmm2d", "samplers": ["ddim"], "metric": "inception"}, "inception_ref"),
    ],
)
def test_sweep_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_config(bad)


def test_sweep_cli_error_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "gmm2d", "samplers": ["ddim"], "metric": "kl"}))
    res = CliRunner().invoke(main, ["eval", str(path)])
    assert res.exit_code == 2 and "metric must be one of" in res.output


def test_entry_options_reach_the_sampler():
    cfg = parse_config({"model": "gmm2d", "samplers": [{"sampler": "ts-ddim", "window": 30, "label": "ts"}], "steps": [10, 20]})
    (entry,) = cfg.entries
    assert entry.sampler == "ts-ddim" and entry.label == "ts" and entry.options == {"window": 30} and entry.steps == (10, 20)


def test_shipped_baseline_config_parses():
    from pathlib import Path

    cfg = parse_config(yaml.safe_load((Path(__file__).parents[1] / "configs" / "eval_baselines.yaml").read_text()))
    assert cfg.model == "digits-ddpm"
    assert [e.sampler for e in cfg.entries] == ["ddpm", "ddim", "dpm"]
    assert all(e.steps == (5, 10, 20, 50) for e in cfg.entries)


def test_tiny_digits_sweep(tmp_path):
    """A tiny configs/eval_baselines.yaml: digits-ddpm, ddim at 2 and 10 steps, ddpm at 10, digits-FID + class accuracy."""
    torch.set_num_threads(1)
    cfg = {"model": "digits-ddpm", "steps": [2, 10], "seeds": [0], "num_samples": 64, "class_label": 3,
           "samplers": ["ddim", {"sampler": "ddpm", "steps": [10]}]}
    rows = run_sweep(cfg, tmp_path, progress=False, echo=lambda *_: None)
    assert [(r["label"], r["steps"]) for r in rows] == [("ddim", 2), ("ddim", 10), ("ddpm", 10)]
    assert all(r["metric"] == "digits-fid" and np.isfinite(r["value"]) and 0 <= r["class_accuracy"] <= 1 for r in rows)
    by = {(r["label"], r["steps"]): r for r in rows}
    # 10 DDIM steps give digits of the requested class; 2 steps give blurred means (far higher FID)
    assert by[("ddim", 10)]["class_accuracy"] >= 0.8 and by[("ddim", 10)]["value"] < by[("ddim", 2)]["value"]
    md = (tmp_path / "results.md").read_text()
    assert "digits-fid" in md and "class acc" in md
    assert (tmp_path / "fid_vs_nfe.png").stat().st_size > 1000
