"""Weighted samples (FKC ``--final weighted``) are scored as the weighted target everywhere a
metric reads samples: FeatureStats / FID, digits-FID and accuracy, the sweep metrics and
`gensample fid RUN_DIR` (docs/fkc.md "Weighted samples in metrics")."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gensample.cli import main
from gensample.eval import fid as fidmod
from gensample.eval.fid import FeatureStats, effective_weights, sample_weights


def _data(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)), rng.uniform(0.1, 2.0, size=n)


def test_weighted_feature_stats_are_numpy_weighted_moments():
    f, w = _data()
    mu, cov = FeatureStats(3).update(f, w).mean_cov()
    np.testing.assert_allclose(mu, np.average(f, axis=0, weights=w))
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False, aweights=w), rtol=1e-12)
    # 0/1 weights are exactly the subset; uniform weights are exactly the unweighted estimator
    keep = (np.arange(40) % 3 == 0).astype(float)
    for a, b in zip(FeatureStats(3).update(f, keep).mean_cov(), FeatureStats(3).update(f[keep > 0]).mean_cov()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(FeatureStats(3).update(f, np.full(40, 0.25)).mean_cov(), FeatureStats(3).update(f).mean_cov()):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_weighted_stats_merge_equals_one_pass(tmp_path):
    f, w = _data()
    one = FeatureStats(3).update(f, w)
    a, b = FeatureStats(3).update(f[:15], w[:15]), FeatureStats(3).update(f[15:], w[15:])
    a.save(tmp_path / "a.npz")
    merged = FeatureStats.load(tmp_path / "a.npz").merge(b)
    for x, y in zip(merged.mean_cov(), one.mean_cov()):
        np.testing.assert_allclose(x, y, rtol=1e-12)
    with pytest.raises(ValueError, match="one per feature row"):
        FeatureStats(3).update(f, w[:5])
    with pytest.raises(ValueError, match="all their mass on one sample"):
        FeatureStats(3).update(f, np.eye(40)[0]).mean_cov()


def test_effective_weights():
    assert effective_weights(None) is None and effective_weights(np.full(8, 0.125)) is None
    assert effective_weights([1.0, 0.0]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="finite"):
        effective_weights([np.nan, 1.0])


def test_digits_fid_and_accuracy_use_weights():
    from gensample.eval import digits
    from gensample.eval.digits_data import real_digits

    x, y = real_digits("test")
    x, y = x[:60], y[:60]
    w = (np.arange(60) < 30).astype(float)
    assert digits.digits_fid(x, w) == pytest.approx(digits.digits_fid(x[:30]), rel=1e-9)
    assert digits.digits_fid(x, w) != pytest.approx(digits.digits_fid(x), rel=1e-3)
    wrong = np.where(np.arange(60) < 30, y, (y + 1) % 10)
    assert digits.class_accuracy(x, wrong, w) == pytest.approx(digits.class_accuracy(x[:30], y[:30]))
    with pytest.raises(ValueError, match="one entry per image"):
        digits.digits_fid(x, w[:10])


def test_sweep_oracle_metric_uses_weights_and_run_sweep_passes_them(tmp_path):
    from gensample.eval import sweep
    from gensample.models.loading import load_model

    model = load_model("gmm2d")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2))
    w = (np.arange(50) < 25).astype(float)
    a = sweep.oracle_metrics(x, model.extras["mixture"], None, w)
    b = sweep.oracle_metrics(x[:25], model.extras["mixture"], None)
    assert a == pytest.approx(b)
    rows = sweep.run_sweep({"model": "gmm2d", "steps": [4], "num_samples": 16,
                            "samplers": [{"sampler": "fkc", "final": "weighted", "particles": 8, "resample": "never",
                                          "label": "fkc-w"}]}, tmp_path / "sw", progress=False, echo=lambda *a: None)
    import gensample

    res = gensample.run(sampler="fkc", model="gmm2d", steps=4, num_samples=16, final="weighted", particles=8,
                        resample="never", seed=0, progress=False)
    want = sweep.oracle_metrics(res.x, model.extras["mixture"], None, res.samples["weights"])
    assert rows[0]["weighted"] is True and rows[0]["value"] == pytest.approx(want["value"])
    assert rows[0]["value"] != pytest.approx(sweep.oracle_metrics(res.x, model.extras["mixture"], None)["value"])


def _fake_run(tmp_path, n=6, weights=None):
    from gensample.eval.images import png_bytes, to_uint8

    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    x = np.random.default_rng(1).uniform(-1, 1, size=(n, 1, 4, 4)).astype(np.float32)
    for i, img in enumerate(to_uint8(x)):
        (run / "images" / f"{i:06d}.png").write_bytes(png_bytes(img))
    (run / "grid.png").write_bytes(png_bytes(to_uint8(x[:1])[0]))
    (run / "run.json").write_text("{}")
    arrays = {"x": x} if weights is None else {"x": x, "weights": np.asarray(weights, np.float64)}
    np.savez(run / "samples.npz", **arrays)
    return run


def test_sample_weights_found_beside_the_run_samples(tmp_path):
    w = [0.5, 0.5, 0.0, 0.25, 0.75, 0.0]
    run = _fake_run(tmp_path, weights=w)
    for p in (run, run / "images", run / "samples.npz"):
        assert sample_weights(p, 6).tolist() == w
    with pytest.raises(ValueError, match="6 weights for 4 images"):
        sample_weights(run, 4)
    plain = _fake_run(tmp_path / "p")
    assert sample_weights(plain) is None


def test_inception_fid_and_cli_use_the_run_weights(tmp_path, monkeypatch):
    """The extractor is replaced by flattened pixels: this checks the plumbing (which weights reach
    the statistics), the Inception network itself is tested in tests/test_fid.py."""
    captured = []

    def fake_stats(images, extractor, batch_size=64, progress=False, weights=None):
        captured.append(None if weights is None else np.asarray(weights).tolist())
        return FeatureStats(3).update(images.reshape(len(images), -1)[:, :3].astype(np.float64), effective_weights(weights))

    monkeypatch.setattr(fidmod, "inception_stats", fake_stats)
    monkeypatch.setattr(fidmod, "inception_extractor", lambda *a, **k: object())
    w = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    run = _fake_run(tmp_path, weights=w)
    ref = _fake_run(tmp_path / "ref")
    fidmod.inception_fid(run, ref)
    assert captured[-2:] == [None, w]  # reference unweighted, samples weighted
    res = CliRunner().invoke(main, ["fid", str(run), "--ref", str(ref), "--json"])
    assert res.exit_code == 0, res.output
    assert captured[-1] == w and "weighted by the `weights`" in res.output
    value = json.loads(next(ln for ln in res.output.splitlines() if ln.startswith('{"fid"')))["fid"]
    sub = FeatureStats(3).update(
        fidmod.load_images(run).reshape(6, -1)[:, :3].astype(np.float64)[np.asarray(w) > 0]).mean_cov()
    assert value == pytest.approx(fidmod.frechet_distance(*sub, *FeatureStats(3).update(
        fidmod.load_images(ref).reshape(6, -1)[:, :3].astype(np.float64)).mean_cov()))
