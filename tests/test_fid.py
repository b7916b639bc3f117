"""Frechet distance, float64 feature statistics and the Inception FID pipeline (issue 3).

No Inception download is possible in CI: the pipeline runs end to end with torch-fidelity's
Inception-v3 architecture and random (He-initialised) weights written by
``save_random_inception_weights``. The default test shrinks the resize target from 299 to 75
pixels (the architecture's smallest valid input) to keep CPU time low; the slow test runs at 299
and cross-checks against torch-fidelity's own FID.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample.cli import main
from gensample.eval.digits_data import real_digits
from gensample.eval.fid import FeatureStats, frechet_distance, inception_extractor, load_images, save_random_inception_weights
from gensample.eval.images import png_bytes, to_uint8


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- closed forms


def test_frechet_2x2_non_commuting_closed_form():
    # For 2x2 M with nonnegative eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); S1 S2 is similar
    # to the PSD matrix S1^1/2 S2 S1^1/2, so this gives tr (S1 S2)^1/2 without any matrix square root.
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.2, 0.4])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("c", [0.25, 1.0, 3.0])
def test_frechet_scaled_covariance_closed_form(c):
    # S2 = c S1: tr(S1 + c S1 - 2 sqrt(c) S1) = (1 - sqrt c)^2 tr S1.
    rng = np.random.default_rng(1)
    d = 24
    s1 = _random_spd(d, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = np.sum((mu1 - mu2) ** 2) + (1 - np.sqrt(c)) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, c * s1) == pytest.approx(exact, rel=1e-6)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    exact = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(10), np.diag(a), np.zeros(10), np.diag(b)) == pytest.approx(exact, rel=1e-6)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- statistics


def test_sharded_stats_merge_equals_one_pass(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((1000, 32)) * rng.uniform(0.5, 3, 32) + 5.0
    one = FeatureStats(32).update(feats)
    shards = [FeatureStats(32).update(part) for part in np.split(feats, [137, 600])]
    for i, s in enumerate(shards):  # shards go through disk like real per-process shards
        s.save(tmp_path / f"s{i}.npz")
    merged = FeatureStats.load(tmp_path / "s0.npz")
    for i in (1, 2):
        merged.merge(FeatureStats.load(tmp_path / f"s{i}.npz"))
    mu1, cov1 = one.mean_cov()
    mu2, cov2 = merged.mean_cov()
    assert merged.count == one.count == 1000
    np.testing.assert_allclose(mu2, mu1, rtol=1e-12)
    np.testing.assert_allclose(cov2, cov1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mu1, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov1, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)
    ref = (np.zeros(32), np.eye(32))
    assert frechet_distance(mu2, cov2, *ref) == pytest.approx(frechet_distance(mu1, cov1, *ref), rel=1e-10)


def test_stats_validation():
    s = FeatureStats(4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        s.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        s.update(np.zeros((1, 4))).mean_cov()
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="merge"):
        s.merge(FeatureStats(5))


# ---------------------------------------------------------------- Inception pipeline, random weights


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0)


@pytest.fixture()
def small_inception(monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


def _write_pngs(folder, x):
    folder.mkdir()
    for i, img in enumerate(to_uint8(x)):
        (folder / f"{i:03d}.png").write_bytes(png_bytes(img))
    return folder


@pytest.fixture()
def digit_folders(tmp_path):
    x, _ = real_digits("test")
    a, b = x[:10], x[10:20]
    np.savez(tmp_path / "samples.npz", x=a)
    return _write_pngs(tmp_path / "a", a), _write_pngs(tmp_path / "b", b), tmp_path / "samples.npz"


def _cli_fid(*args):
    res = CliRunner().invoke(main, ["fid", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith('{"fid"'))
    return json.loads(line)["fid"]


def test_inception_fid_end_to_end_random_weights(random_inception, small_inception, digit_folders, tmp_path):
    torch.set_num_threads(1)
    a, b, npz = digit_folders
    # 64-d features (the first pooled layer) keep sqrtm cheap; the slow test covers 2048-d pool3
    f_ab = _cli_fid(a, "--ref", b, "--inception-weights", random_inception, "--dims", 64)
    # independent path: raw extractor features -> numpy mean/cov -> Frechet distance
    net = inception_extractor(random_inception, dims=64)
    with torch.no_grad():
        fa = net(torch.from_numpy(load_images(a)))[0].double().numpy()
        fb = net(torch.from_numpy(load_images(b)))[0].double().numpy()
    assert fa.shape == (10, 64) and fa.std(0).max() > 0  # features depend on the image
    direct = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert f_ab > 0 and f_ab == pytest.approx(direct, rel=1e-6)
    # reference statistics file and a run's samples.npz give the same number
    res = CliRunner().invoke(main, ["fid-stats", str(b), "--out", str(tmp_path / "ref.npz"), "--inception-weights", str(random_inception), "--dims", "64"])
    assert res.exit_code == 0, res.output
    assert _cli_fid(npz, "--ref", tmp_path / "ref.npz", "--inception-weights", random_inception, "--dims", 64) == pytest.approx(f_ab, rel=1e-6)
    assert abs(_cli_fid(a, "--ref", a, "--inception-weights", random_inception, "--dims", 64)) < 1e-6 * f_ab


def test_fid_cli_user_errors(tmp_path, digit_folders):
    a, b, _ = digit_folders
    res = CliRunner().invoke(main, ["fid", str(a), "--ref", str(b), "--inception-weights", str(tmp_path / "missing.pth")])
    assert res.exit_code == 2 and "inception-weights" in res.output
    np.savez(tmp_path / "bad.npz", y=np.zeros(3))
    res = CliRunner().invoke(main, ["fid", str(tmp_path / "bad.npz"), "--ref", str(b), "--inception-weights", str(tmp_path / "missing.pth")])
    assert res.exit_code == 2
    res = CliRunner().invoke(main, ["fid", str(a), "--ref", str(b), "--dims", "100"])
    assert res.exit_code == 2 and "dims" in res.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG"):
        load_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="'x'"):
        load_images(tmp_path / "bad.npz")


@pytest.mark.slow
def test_inception_fid_matches_torch_fidelity_at_299(random_inception, digit_folders):
    import torch_fidelity

    a, b, _ = digit_folders
    ours = _cli_fid(a, "--ref", b, "--inception-weights", random_inception)
    theirs = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), fid=True, feature_extractor="inception-v3-compat",
                                              feature_extractor_weights_path=str(random_inception), cache=False, verbose=False, cuda=False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)


# ---------------------------------------------------------------- caveats (issue 30, item 7)


def test_fid_caveats_name_small_n_and_format_mismatch():
    from gensample.eval.fid import fid_caveats

    assert fid_caveats(64, 64, 100, (3, 8, 8), (3, 8, 8)) == []  # n >= D on both sides, same format
    few = fid_caveats(2048, 3, 5000, (3, 8, 8), (3, 8, 8))
    assert len(few) == 1 and "samples: 3 images for 2048-dimensional features" in few[0] and "rank at most 2" in few[0]
    fmt = fid_caveats(64, 100, 100, (1, 8, 8), (3, 16, 16))
    assert len(fmt) == 1 and "resolution 8x8 vs 16x16" in fmt[0] and "channels 1 vs 3" in fmt[0]
    assert fid_caveats(64, 100, None, (1, 8, 8), None) == []  # a foreign mu/sigma reference: unknown, not flagged


def test_fid_cli_warns_and_records_caveats(random_inception, small_inception, tmp_path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    grey = _write_pngs(tmp_path / "grey8", rng.uniform(-1, 1, size=(3, 1, 8, 8)))  # 3 grey 8x8 samples
    rgb = _write_pngs(tmp_path / "rgb16", rng.uniform(-1, 1, size=(6, 3, 16, 16)))  # a 16x16 RGB reference
    res = CliRunner().invoke(main, ["fid", str(grey), "--ref", str(rgb), "--inception-weights", str(random_inception),
                                    "--dims", "64", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(next(ln for ln in res.output.splitlines() if ln.startswith('{"fid"')))
    assert rec["n_samples"] == 3 and rec["samples_shape"] == [1, 8, 8] and rec["ref_shape"] == [3, 16, 16]
    assert len(rec["caveats"]) == 3  # samples n < 64, reference n < 64, resolution + channels
    assert sum(ln.startswith("warning: FID caveat:") for ln in res.output.splitlines()) == 3
    # a fid-stats reference records its count and image shape, so the same caveats are found
    res = CliRunner().invoke(main, ["fid-stats", str(rgb), "--out", str(tmp_path / "ref.npz"), "--inception-weights",
                                    str(random_inception), "--dims", "64"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["fid", str(grey), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                                    str(random_inception), "--dims", "64"])
    assert res.exit_code == 0 and "(see the caveats above)" in res.output and "channels 1 vs 3" in res.output
