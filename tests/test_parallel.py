"""Multi-process sampling (issue 10; README "Scaling out", docs/scaling.md): sharding, identity to one
process, float64 FID-statistics reduction across processes."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gensample.parallel import FeatureStats, all_reduce_feature_stats, process_info, split_indices



# -- split_indices: contiguous, disjoint, covering, groups intact -----------------------------
@pytest.mark.parametrize("n_groups,world,group", [(0, 2, 1), (1, 3, 1), (7, 2, 1), (8, 3, 4), (5, 5, 2), (3, 8, 16), (101, 4, 3)])
def test_split_indices_partitions_contiguously(n_groups, world, group):
    indices = list(range(100, 100 + n_groups * group))
    chunks = [split_indices(indices, world, r, group) for r in range(world)]
    assert sum(chunks, []) == indices  # disjoint, covering, in order (contiguous)
    sizes = [len(c) // group for c in chunks]
    assert all(len(c) % group == 0 for c in chunks)
    # whole chunks of groups in order => every group (a run of `group` indices) is on one process
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # extras to the first ranks


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=0, rank=0), "world_size"), (dict(world_size=2, rank=2), "rank"),
    (dict(world_size=2, rank=-1), "rank"), (dict(world_size=2, rank=0, group_size=0), "group_size"),
    (dict(world_size=2, rank=0, group_size=3), "multiple of group_size"),
])
def test_split_indices_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_indices(range(4), **kwargs)


# -- 2 processes == 1 process, byte for byte -------------------------------------------------
def test_two_processes_byte_identical_to_one(tmp_path):
    """`gensample run --num-processes 2` = one process: same arrays byte for byte, same PNGs."""
    import json

    from click.testing import CliRunner

    from gensample import api
    from gensample.cli import main

    common = dict(sampler="ddpm", model="gmm-digits", num_samples=10, steps=12, batch_size=3, seed=7, progress=False)
    api.run(output=str(tmp_path / "one"), **common)  # reference: one process (in this one)
    args = ["run", "--sampler", "ddpm", "--model", "gmm-digits", "-n", "10", "--steps", "12", "--batch-size", "3",
            "--seed", "7", "-o", str(tmp_path / "two"), "--num-processes", "2"]
    two = CliRunner().invoke(main, args)
    assert two.exit_code == 0, two.output
    assert two.output.count("ddpm on gmm-digits") == 1  # only the main process reports
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a.files == b.files
    for k in a.files:
        assert a[k].shape[0] == 10 and a[k].tobytes() == b[k].tobytes(), k
    pngs = sorted(p.name for p in (tmp_path / "one" / "images").glob("*.png"))
    assert len(pngs) == 10
    for name in pngs:
        assert (tmp_path / "one" / "images" / name).read_bytes() == (tmp_path / "two" / "images" / name).read_bytes()
    # rank 0 drew indices 0-4, rank 1 indices 5-9 (contiguous chunks, batches of 3)
    shards = sorted(p.name for p in (tmp_path / "two" / "shards").glob("*.npz"))
    assert shards == ["000000-000002.npz", "000003-000004.npz", "000005-000007.npz", "000008-000009.npz"]
    rec = json.loads((tmp_path / "two" / "run.json").read_text())
    assert rec["num_processes"] == 2 and rec["status"] == "complete" and rec["samples_drawn_this_invocation"] == 10
    assert rec["stats"]["model_rows"] == 10 * 12  # every sample drawn exactly once, over both processes


def test_num_processes_user_errors_exit_2_before_launch(tmp_path):
    from click.testing import CliRunner

    from gensample.cli import main

    r = CliRunner().invoke(main, ["run", "--sampler", "ddim", "--model", "gmm2d", "-n", "2", "--num-processes", "0", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--num-processes" in r.output
    r = CliRunner().invoke(main, ["run", "--sampler", "ddim", "--model", "gmm2d", "-n", "2", "--steps", "5000",
                                  "--num-processes", "2", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--steps" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run.json").exists()  # nothing started


# -- float64 feature statistics --------------------------------------------------------------
def test_feature_stats_merge_equals_whole():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1000, 6, generator=g, dtype=torch.float64) * 3 + 1
    parts = [FeatureStats.of(feats[:137]), FeatureStats.zeros(6).update(feats[137:600]), FeatureStats.of(feats[600:])]
    total = parts[0].merge(parts[1]).merge(parts[2])
    mu, sigma = total.mean_cov()
    assert total.count == 1000
    torch.testing.assert_close(mu, feats.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma, torch.cov(feats.T), rtol=1e-10, atol=1e-10)
    assert mu.dtype == sigma.dtype == torch.float64


def test_feature_stats_float64_accumulation_from_float32_features():
    # A float32 sum of 10^5 rows of mean 100 loses ~1e-3 relative in the covariance; float64 keeps it.
    g = torch.Generator().manual_seed(1)
    feats = (torch.randn(100_000, 2, generator=g, dtype=torch.float64) + 100.0)
    stats = FeatureStats.zeros(2)
    for chunk in feats.float().split(4096):
        stats.update(chunk)
    _, sigma = stats.mean_cov()
    exact = torch.cov(feats.float().double().T)
    torch.testing.assert_close(sigma, exact, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((3, 2)), "torch.Tensor"), (torch.zeros(3), r"\(N, D\)"), (torch.full((2, 2), float("nan")), "NaN"),
])
def test_feature_stats_rejects_bad_features(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        FeatureStats.of(bad)
    with pytest.raises(ValueError, match="D=3"):
        FeatureStats.zeros(3).update(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.of(torch.zeros(1, 2)).mean_cov()


def _reduce_worker(rank, world, port, feats, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    info = process_info(torch.device("cpu"))
    assert (info.index, info.world_size) == (rank, world)
    mine = feats[split_indices(range(len(feats)), world, rank)]
    total = all_reduce_feature_stats(FeatureStats.of(mine), info)
    torch.save({"count": total.count, "sum": total.sum, "outer": total.outer}, Path(out_dir) / f"{rank}.pt")
    info.wait()


def test_all_reduce_feature_stats_two_processes(tmp_path):
    """Each of 2 gloo processes sees half the features; after the float64 all-reduce both hold the
    statistics of all of them (no feature or image gathered)."""
    from gensample.parallel import free_port

    g = torch.Generator().manual_seed(2)
    feats = torch.randn(301, 4, generator=g, dtype=torch.float64)
    torch.multiprocessing.start_processes(_reduce_worker, args=(2, free_port(), feats, str(tmp_path)),
                                          nprocs=2, start_method="spawn")
    whole = FeatureStats.of(feats)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["count"] == 301
        torch.testing.assert_close(got["sum"], whole.sum, rtol=0, atol=1e-12)
        torch.testing.assert_close(got["outer"], whole.outer, rtol=0, atol=1e-10)
    # one process: a copy, no communication
    single = all_reduce_feature_stats(whole)
    assert single.count == 301 and single.sum is not whole.sum


class _SimulatedRank:
    """process_info stand-in: rank `index` of `world_size`, no communication (ranks run one after
    another in this process, highest first, so the main rank finds every shard when it merges)."""

    def __init__(self, index, world_size):
        self.index, self.world_size = index, world_size

    def __call__(self, device):
        from gensample.parallel import ProcessInfo

        info = ProcessInfo(self.index, self.world_size, device)
        info.wait = lambda: None
        info.gather_object = lambda obj: [obj]
        return info


@pytest.mark.parametrize("world_size", [2, 3])
def test_particle_groups_stay_on_one_process(tmp_path, monkeypatch, world_size):
    """FKC resamples inside a particle group, so a group split across processes would change the
    samples; sharded runs (simulated ranks) reproduce the one-process output exactly."""
    from gensample import api, parallel
    from gensample.samplers import registry

    if "fkc" not in registry.discover():
        pytest.skip("fkc sampler not registered")
    opts = dict(model="gmm2d", num_samples=12, steps=6, particles=4, seed=1, progress=False)
    ref = api.run("fkc", **opts).samples["x"]
    out = tmp_path / f"w{world_size}"
    # what the main process writes before the barrier that lets every rank start
    cfg = api.resolve_options("fkc", output=str(out), batch_size=4, **opts)
    api.atomic_write_json(out / "run.json", {"semantic_config": api.semantic_config(cfg), "status": "running"})
    for rank in reversed(range(world_size)):
        monkeypatch.setattr(parallel, "process_info", _SimulatedRank(rank, world_size))
        api.run("fkc", output=str(out), batch_size=4, **opts)
    np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], ref)
    shards = sorted(p.name for p in (out / "shards").glob("*.npz"))
    assert all((int(s[:6]) % 4 == 0 and (int(s[7:13]) + 1) % 4 == 0) for s in shards), shards  # whole groups
