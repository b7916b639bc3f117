"""Inception FID, default run: our whole pipeline against torch-fidelity's own, end to end.

torch-fidelity reads the PNG folders itself, extracts features itself, accumulates its own
statistics and computes its own Frechet distance, so nothing of gensample's FID code is on the
reference path. To keep the default run fast both sides use the same randomly initialised
Inception-v3 (no download is possible offline) at 75 px input and the 64-d first pooled layer;
the slow test in tests/test_fid.py repeats this at 299 px / 2048-d pool3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("torch_fidelity")

from gensample.cli import main  # noqa: E402
from gensample.eval.digits_data import real_digits  # noqa: E402
from gensample.eval.fid import save_random_inception_weights  # noqa: E402
from gensample.eval.images import png_bytes, to_uint8  # noqa: E402


def _write_pngs(folder, x):
    folder.mkdir()
    for i, img in enumerate(to_uint8(x)):
        (folder / f"{i:03d}.png").write_bytes(png_bytes(img))
    return folder


def _ours_and_theirs(tmp_path, monkeypatch):
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.set_num_threads(1)
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    weights = save_random_inception_weights(tmp_path / "random.pth", seed=0)
    x, _ = real_digits("test")
    # two sets that differ in distribution (different digits, one brightened) so the FID is clearly > 0
    a = _write_pngs(tmp_path / "a", x[:24])
    b = _write_pngs(tmp_path / "b", np.clip(x[24:48] * 0.6 + 0.4, -1, 1))
    res = CliRunner().invoke(main, ["fid", str(a), "--ref", str(b), "--inception-weights", str(weights), "--dims", "64", "--json"])
    assert res.exit_code == 0, res.output
    ours = json.loads(next(ln for ln in res.output.splitlines() if ln.startswith('{"fid"')))["fid"]
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, feature_extractor="inception-v3-compat",
        feature_layer_fid="64", feature_extractor_weights_path=str(weights), cache=False, verbose=False,
        cuda=False, batch_size=24)["frechet_inception_distance"]
    return ours, theirs


# both accumulate in float64 and use scipy's sqrtm: agreement to 1e-4 relative is float32 feature
# noise; a wrong mean, covariance normalisation or preprocessing is off by far more
REL = 1e-4


def test_fid_matches_torch_fidelity_small(tmp_path, monkeypatch):
    ours, theirs = _ours_and_theirs(tmp_path, monkeypatch)
    assert theirs > 0
    assert ours == pytest.approx(theirs, rel=REL)


def test_broken_fid_fails_the_comparison(tmp_path, monkeypatch):
    """Power: our FID with the biased (1 / n) covariance instead of the (n - 1) estimator, at n = 24
    per set (a 4 % covariance error, the subtlest normalisation bug), misses torch-fidelity by more
    than REL (measured: 3e-4 relative), so the comparison above would fail."""
    from gensample.eval.fid import FeatureStats

    orig = FeatureStats.mean_cov

    def biased(self):
        mu, cov = orig(self)
        return mu, cov * (23 / 24)

    monkeypatch.setattr(FeatureStats, "mean_cov", biased)
    ours, theirs = _ours_and_theirs(tmp_path, monkeypatch)
    assert abs(ours / theirs - 1) > REL, (ours, theirs)
