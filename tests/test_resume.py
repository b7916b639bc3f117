"""Resumable, loss-free output (issue 10): SIGKILL mid-run, rerun, identical complete sample set;
--overwrite; refusal when the existing run's configuration differs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gensample import api
from gensample.cli import main

REPO = Path(__file__).resolve().parents[1]
N, BATCH, STEPS = 32, 2, 20
ARGS = ["--sampler", "ddpm", "--model", "gmm-digits", "-n", str(N), "--batch-size", str(BATCH), "--steps", str(STEPS), "--seed", "3"]


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted sample set (in memory, same batches)."""
    res = api.run("ddpm", "gmm-digits", num_samples=N, batch_size=BATCH, steps=STEPS, seed=3, progress=False)
    return res.samples["x"]


def _shard_indices(out: Path) -> list[np.ndarray]:
    out_list = []
    for f in sorted((out / "shards").glob("*.npz")):
        with np.load(f) as z:  # every file on disk must be complete and readable
            out_list.append(z["indices"])
            assert z["x"].shape[0] == len(z["indices"])
    return out_list


def _wait_for(predicate, proc, timeout=300.0):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"run finished before it could be killed:\n{proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("run did not make progress in time")
        time.sleep(0.01)


@pytest.mark.parametrize("kill_after_shards", [pytest.param(0, marks=pytest.mark.slow), 3])
def test_sigkill_then_rerun_gives_complete_identical_set(tmp_path, reference, kill_after_shards):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "gensample", "run", *ARGS, "-o", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after_shards == 0:  # as early as the run exists on disk
        _wait_for(lambda: (out / "run.json").exists(), proc)
    else:
        _wait_for(lambda: len(list((out / "shards").glob("*.npz"))) >= kill_after_shards, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close(), proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    before = _shard_indices(out)
    done_before = np.concatenate(before) if before else np.zeros(0, dtype=np.int64)
    assert len(done_before) < N and not (out / "samples.npz").exists()
    assert len(np.unique(done_before)) == len(done_before)
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    rerun = CliRunner().invoke(main, ["run", *ARGS, "-o", str(out)])  # the same command again
    assert rerun.exit_code == 0, rerun.output
    after = np.concatenate(_shard_indices(out))
    assert sorted(after.tolist()) == list(range(N))  # complete, no duplicates
    with np.load(out / "samples.npz") as z:
        assert z["x"].tobytes() == reference.tobytes()
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["samples_drawn_this_invocation"] == N - len(done_before)
    assert len(list((out / "images").glob("*.png"))) == N
    assert not [p for p in out.rglob(".*.tmp")]  # temp files of the killed write were cleaned up


def _run(out, *extra):
    return CliRunner().invoke(main, ["run", "--sampler", "ddim", "--model", "gmm2d", "-n", "6", "--steps", "5",
                                     "--batch-size", "2", "-o", str(out), *extra])


def test_refuses_different_config_and_overwrite_starts_fresh(tmp_path):
    out = tmp_path / "r"
    assert _run(out).exit_code == 0
    first = np.load(out / "samples.npz")["x"]
    r = _run(out, "--seed", "5")
    assert r.exit_code == 2 and "different configuration" in r.output and "seed: 0 -> 5" in r.output
    assert "--overwrite" in r.output and "Traceback" not in r.output
    r = _run(out, "--eta", "0.5")
    assert r.exit_code == 2 and "eta: 0.0 -> 0.5" in r.output
    np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], first)  # untouched by the refusals

    r = _run(out, "--seed", "5", "--overwrite")
    assert r.exit_code == 0, r.output
    fresh = api.run("ddim", "gmm2d", num_samples=6, steps=5, seed=5, progress=False).samples["x"]
    np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], fresh)
    assert json.loads((out / "run.json").read_text())["samples_drawn_this_invocation"] == 6
    assert not np.array_equal(fresh, first)


def test_resume_accepts_other_batch_size_and_completed_run_is_a_noop(tmp_path):
    out = tmp_path / "r"
    assert _run(out).exit_code == 0
    first = np.load(out / "samples.npz")["x"]
    for shard in sorted((out / "shards").glob("*.npz"))[1:]:  # lose all but the first batch
        shard.unlink()
    (out / "samples.npz").unlink()
    r = _run(out, "--batch-size", "3")  # batch size does not change samples: resume allowed
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], first)
    assert json.loads((out / "run.json").read_text())["samples_drawn_this_invocation"] == 4
    r = _run(out)
    assert r.exit_code == 0 and json.loads((out / "run.json").read_text())["samples_drawn_this_invocation"] == 0
    np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], first)


def test_truncated_shard_and_stale_temp_files_are_redone(tmp_path):
    out = tmp_path / "r"
    assert _run(out).exit_code == 0
    first = np.load(out / "samples.npz")["x"]
    shard = sorted((out / "shards").glob("*.npz"))[1]
    shard.write_bytes(shard.read_bytes()[:100])  # as if a non-atomic writer had been killed
    (out / "shards" / ".000002-000003.npz.abc.tmp").write_bytes(b"partial")
    (out / "samples.npz").unlink()
    r = _run(out)
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], first)
    assert json.loads((out / "run.json").read_text())["samples_drawn_this_invocation"] == 2
    assert not list(out.rglob(".*.tmp"))


@pytest.mark.parametrize("damage", ["garbage_record", "no_record"])
def test_unknown_existing_run_is_refused(tmp_path, damage):
    out = tmp_path / "r"
    assert _run(out).exit_code == 0
    if damage == "garbage_record":
        (out / "run.json").write_text("{not json")
    else:
        (out / "run.json").unlink()
    r = _run(out)
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    assert _run(out, "--overwrite").exit_code == 0


def test_output_that_is_a_file_is_a_usage_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(main, ["run", "--sampler", "ddim", "--model", "gmm2d", "-n", "2", "-o", str(f)])
    assert r.exit_code == 2 and "Traceback" not in r.output
