"""The first hour of a new user (issue 18): the README in order, default output folders that
cannot collide, validation before the folder check, strict booleans, interrupts that keep the
work, file-system and resource errors as one message, fid on run folders, fast start-up.

Every bad input: exit code, message, no traceback, nothing lost."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gensample.io as gio
from gensample import api
from cli_helpers import clean, invoke  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def small_run(out, *extra):
    return invoke("run", "--sampler", "ddim", "--model", "gmm2d", "-n", "4", "--steps", "3", "-o", out, *extra)


# -- 1. hermetic tests / the README in order ------------------------------------------------------
@pytest.fixture
def foreign_cwd(tmp_path, monkeypatch):
    """A working folder whose runs/ holds runs of other configurations (as after a user's demo)."""
    monkeypatch.chdir(tmp_path)
    cfg = api.resolve_options("ddim", model="gmm2d")
    for name in ("ddim", "ddpm", api.default_output_dir(cfg).name):  # old-style and same-named folders
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"semantic_config": {"sampler": "ddim", "seed": 99}}))
    return tmp_path


def test_cli_tests_pass_from_a_folder_with_foreign_runs(foreign_cwd):
    """The CLI tests of the suite run from a folder holding a runs/ of another configuration:
    they pass, and that runs/ is untouched (no test reads or writes the working folder)."""
    before = snapshot(foreign_cwd / "runs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_cli_api.py"), "-k", "user_errors or writes_outputs"],
                          cwd=foreign_cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert snapshot(foreign_cwd / "runs") == before


def test_readme_demo_then_next_example_then_bad_inputs(foreign_cwd):
    """Demo, the README's next example, then typos: each gets its own folder or its real error."""
    runs = foreign_cwd / "runs"
    stale = api.default_output_dir(api.resolve_options("ddim", model="gmm2d"))
    (stale / "run.json").unlink()  # the same-named folder (an old record): make it a plain empty folder again
    r = invoke("run", "--sampler", "ddim")
    clean(r, 0)
    r = invoke("run", "--sampler", "ddim", "--model", "gmm-digits", "-n", "8", "--steps", "5")
    clean(r, 0)
    assert len(list(runs.glob("ddim-gmm-digits-*"))) == 1
    for args, msg in [(["--model", "gmm-digts"], "unknown model 'gmm-digts'"),
                      (["--steps", "5000"], "--steps must be <="),
                      (["--class-label", "9"], "--class-label must be in [0, 2]")]:
        clean(invoke("run", "--sampler", "ddim", *args), 2, msg)
    assert (runs / "ddim" / "run.json").exists() and (runs / "ddpm" / "run.json").exists()


# -- 2. default folder; validation before the folder check ---------------------------------------
def test_default_folder_resumes_same_command_and_separates_others(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["run", "--sampler", "ddim", "-n", "4", "--steps", "3"]
    clean(invoke(*args), 0)
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("ddim-gmm2d-")
    rec = json.loads((folder / "run.json").read_text())
    clean(invoke(*args, "--batch-size", "2"), 0)  # non-semantic change: same folder, nothing redrawn
    assert json.loads((folder / "run.json").read_text())["samples_drawn_this_invocation"] == 0
    clean(invoke(*args, "--seed", "1"), 0)  # another configuration: another folder
    assert len(list((tmp_path / "runs").iterdir())) == 2
    clean(invoke(*args, "-o", tmp_path / "mine"), 0)  # --output wins
    assert (tmp_path / "mine" / "samples.npz").exists() and len(list((tmp_path / "runs").iterdir())) == 2
    assert rec["config"]["output"] == str(Path("runs") / folder.name)


def test_recipe_without_output_gets_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "r.yaml"
    cfg.write_text("sampler: ddim\nmodel: gmm2d\nsteps: 3\nnum-samples: 2\n")
    clean(invoke("run", "--sampler", "ddim", "-n", "2", "--steps", "4"), 0)
    clean(invoke("run", "--config", cfg), 0)
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.parametrize("args,msg", [(["--model", "gmm-digts"], "unknown model"), (["--steps", "5000"], "--steps must be <="),
                                      (["--class-label", "9"], "--class-label must be in"),
                                      (["--eta", "-1"], "--eta must be >= 0")])
def test_input_errors_come_before_the_folder_check(tmp_path, args, msg):
    out = tmp_path / "r"
    clean(small_run(out, "--seed", "7"), 0)
    before = snapshot(out)
    r = small_run(out, *args)
    clean(r, 2, msg)
    assert "--overwrite" not in r.output and snapshot(out) == before


# -- 3. strict booleans: a run folder is never deleted without an explicit true --------------------
@pytest.mark.parametrize("word", ['"false"', '"no"', '"off"', "false", "0"])
def test_recipe_overwrite_false_words_never_delete(tmp_path, word):
    out = tmp_path / "r"
    clean(small_run(out), 0)
    before = snapshot(out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sampler: ddim\nmodel: gmm2d\nnum-samples: 4\nsteps: 3\nseed: 5\noverwrite: {word}\noutput: {out}\n")
    clean(invoke("run", "--config", cfg), 2, "different configuration")
    assert snapshot(out) == before


@pytest.mark.parametrize("value", ["maybe", "", 2, 0.0, None, [True]])
def test_api_overwrite_must_be_a_boolean(tmp_path, value):
    out = tmp_path / "r"
    api.run("ddim", "gmm2d", num_samples=2, steps=3, output=str(out), progress=False)
    before = snapshot(out)
    if value is None:  # None means "not given": resume, nothing deleted
        api.run("ddim", "gmm2d", num_samples=2, steps=3, output=str(out), progress=False, overwrite=None)
    else:
        with pytest.raises(ValueError, match="--overwrite must be true or false"):
            api.run("ddim", "gmm2d", num_samples=2, steps=3, seed=4, output=str(out), progress=False, overwrite=value)
    with pytest.raises(ValueError, match="different configuration"):
        api.run("ddim", "gmm2d", num_samples=2, steps=3, seed=4, output=str(out), progress=False, overwrite="no")
    assert snapshot(out).keys() == before.keys() and snapshot(out)["samples.npz"] == before["samples.npz"]


def test_api_progress_and_compile_are_strict():
    with pytest.raises(ValueError, match="--progress must be true or false"):
        api.run("ddim", "gmm2d", num_samples=2, steps=2, progress="sometimes")
    res = api.run("ddim", "gmm2d", num_samples=2, steps=2, progress="no")
    assert res.record["config"]["progress"] is False
    with pytest.raises(ValueError, match="--compile"):
        api.run("ddim", "gmm2d", num_samples=2, steps=2, compile="yes please")
    with pytest.raises(ValueError, match="--guidance-scale must be a number"):
        api.run("ddim", "gmm2d", num_samples=2, steps=2, guidance_scale=True)


# -- 4. interrupts keep the finished shards ------------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_marks_interrupted_keeps_shards_and_resumes(tmp_path, sig, code):
    out = tmp_path / "run"
    # one sample per shard and 400 of them: the run is still going when the signal comes
    args = ["--sampler", "ddpm", "--model", "gmm-digits", "-n", "400", "--steps", "40", "--seed", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "gensample", "run", *args, "--batch-size", "1", "-o", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while len(list((out / "shards").glob("*.npz"))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() - t0 < 300
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err and "interrupted" in err, err
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "interrupted" and 2 <= rec["samples_done"] < 400, rec
    kept = len(api.completed_indices(out))
    assert kept >= 2
    r = invoke("run", *args, "--batch-size", "256", "-o", out)  # the batch size does not change samples
    clean(r, 0)
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["samples_drawn_this_invocation"] == 400 - kept


def test_batches_start_small_and_adapt_to_time():
    assert api.next_batch_size(8, 0.01, cap=256) == 32  # fast: grows at most 4x
    assert api.next_batch_size(32, 0.5, cap=256) == 128
    assert api.next_batch_size(64, 20.0, cap=256) == 16  # slow: shrinks to what fits into ~5 s
    assert api.next_batch_size(8, 20.0, cap=256) == api.FIRST_BATCH  # but never below the first batch
    assert api.next_batch_size(4, 20.0, cap=4) == 4  # nor above the cap
    assert api.next_batch_size(8, 100.0, cap=256, group=16) == 16  # and whole groups
    assert api.next_batch_size(64, 0.01, cap=48, group=16) == 48  # never above the cap, whole groups


def test_first_shard_is_small_and_samples_do_not_depend_on_batches(tmp_path):
    res = api.run("ddim", "gmm2d", num_samples=20, steps=3, output=str(tmp_path / "a"), progress=False)
    shards = sorted((tmp_path / "a" / "shards").glob("*.npz"))
    assert shards[0].name == f"000000-{api.FIRST_BATCH - 1:06d}.npz" and len(shards) >= 2
    ref = api.run("ddim", "gmm2d", num_samples=20, steps=3, batch_size=1, progress=False)
    np.testing.assert_array_equal(res.x, ref.x)


# -- 6. fid reads samples only ---------------------------------------------------------------------
def test_fid_images_of_a_run_folder_are_its_samples(tmp_path):
    from gensample.eval import fid, images

    out = tmp_path / "r"
    clean(invoke("run", "--sampler", "ddim", "--model", "gmm-digits", "-n", "5", "--steps", "3", "-o", out), 0)
    for fig in ("ess.png", "compare.png", "before_after.png"):
        (out / fig).write_bytes((out / "grid.png").read_bytes())
    for load in (images.load_images, fid.load_images):
        assert load(out).shape == (5, 3, 8, 8)
    (out / "images" / "000004.png").unlink()  # images/ wins over samples.npz when present
    assert images.load_images(out).shape == (4, 3, 8, 8)
    import shutil

    shutil.rmtree(out / "images")
    assert images.load_images(out).shape == (5, 3, 8, 8)  # then samples.npz


def test_garbage_inception_weights_is_one_message(tmp_path):
    w = tmp_path / "w.pth"
    w.write_text("hello, not weights\n")
    d = tmp_path / "imgs"
    d.mkdir()
    r = invoke("fid", d, "--ref", d, "--inception-weights", w)
    clean(r, 2, "--inception-weights", "not a torch-fidelity Inception-v3 weights file")
    assert "invalid literal" not in r.output


# -- 7. file-system errors ----------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_unwritable_output_from_the_start_leaves_nothing(tmp_path, monkeypatch, code):
    def fail(path, data):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(gio, "atomic_write_bytes", fail)
    out = tmp_path / "new" / "out"
    r = small_run(out)
    clean(r, 1, f"--output {out}", os.strerror(code))
    assert not out.exists()


def test_disk_full_mid_run_keeps_finished_shards(tmp_path, monkeypatch):
    real = gio.atomic_write_bytes
    calls = {"shards": 0}

    def flaky(path, data):
        if Path(path).parent.name == "shards":
            calls["shards"] += 1
            if calls["shards"] > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(gio, "atomic_write_bytes", flaky)
    out = tmp_path / "r"
    r = invoke("run", "--sampler", "ddim", "--model", "gmm2d", "-n", "20", "--steps", "3", "-o", out)
    clean(r, 1, "--output", "No space left")
    assert len(api.completed_indices(out)) == api.FIRST_BATCH and not list(out.rglob("*.tmp"))
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(gio, "atomic_write_bytes", real)
    clean(invoke("run", "--sampler", "ddim", "--model", "gmm2d", "-n", "20", "--steps", "3", "-o", out), 0)  # resumes


def test_output_under_proc_names_output(tmp_path):
    r = small_run("/proc/gensample-no-such-dir")
    clean(r, 1, "--output /proc/gensample-no-such-dir")


@pytest.mark.parametrize("kw,exc,msg", [({"output": 123}, TypeError, "--output must be a folder path"),
                                        ({"config": {}}, TypeError, "config must be the path"),
                                        ({"output": ""}, TypeError, "--output must be a folder path")])
def test_api_wrong_types_are_clear(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        api.run("ddim", "gmm2d", num_samples=2, steps=2, progress=False, **kw)


def test_missing_label_of_a_mixture_lists_its_labels(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"weights": [1, 1], "means": [[-1.0, 0.0], [1.0, 0.0]], "stds": [0.3, 0.3], "labels": [0, 5]}))
    r = invoke("run", "--sampler", "ddim", "--model", f"gmm:{f}", "--class-label", "3", "-n", "2", "-o", tmp_path / "o")
    clean(r, 2, "its labels are [0, 5]")
    assert not (tmp_path / "o").exists()
    clean(invoke("run", "--sampler", "ddim", "--model", f"gmm:{f}", "--class-label", "5", "-n", "2", "--steps", "3",
                 "-o", tmp_path / "o"), 0)


# -- 8. resource guard ------------------------------------------------------------------------------
@pytest.fixture
def wide_mixture(tmp_path):
    k = 500
    rng = np.random.default_rng(0)
    f = tmp_path / "wide.json"
    f.write_text(json.dumps({"weights": [1.0] * k, "means": rng.normal(size=(k, 2)).tolist(), "stds": [0.3] * k}))
    return f


def test_memory_guard_lowers_the_batch(tmp_path, monkeypatch, wide_mixture):
    per = 12 * 8 * 500 + 16 * 8 * 2
    monkeypatch.setattr(api, "available_memory_bytes", lambda device: 2 * 3 * per)  # half of it: 3 samples
    out = tmp_path / "o"
    res = api.run("ddim", f"gmm:{wide_mixture}", num_samples=10, steps=2, output=str(out), progress=False)
    assert res.record["batch_size_capped_by_memory"] == 3
    for f in (out / "shards").glob("*.npz"):
        with np.load(f) as z:
            assert len(z["indices"]) <= 3
    monkeypatch.undo()
    ref = api.run("ddim", f"gmm:{wide_mixture}", num_samples=10, steps=2, progress=False)
    np.testing.assert_array_equal(res.x, ref.x)


def test_memory_guard_refuses_with_the_numbers(tmp_path, monkeypatch, wide_mixture):
    monkeypatch.setattr(api, "available_memory_bytes", lambda device: 1000)
    r = invoke("run", "--sampler", "ddim", "--model", f"gmm:{wide_mixture}", "-n", "2", "-o", tmp_path / "o")
    clean(r, 2, "working memory per sample", "kB", "only 1000 bytes is free")
    assert not (tmp_path / "o").exists()


def test_huge_num_samples_needs_max_samples(tmp_path):
    r = invoke("run", "--sampler", "ddim", "-n", "10000000", "-o", tmp_path / "o")
    clean(r, 2, "--num-samples 10000000 is more than --max-samples 1000000", "--max-samples 10000000")
    assert not (tmp_path / "o").exists()


def test_disk_guard_refuses_before_sampling(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10, 10))
    r = small_run(tmp_path / "o")
    clean(r, 1, "--output", "on disk, only 10 bytes is free")
    assert not (tmp_path / "o").exists()


# -- 9. lazy imports ----------------------------------------------------------------------------------
def test_cli_start_up_does_not_import_torch(tmp_path):
    code = ("import sys\nfrom gensample.cli import main, listing\n"
            "for args in (['--help'], ['--version'], ['list'], ['run', '--help']):\n"
            "    try:\n        main(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "    if args == ['list']:\n        main(['list'], standalone_mode=False)\n"
            "    print('MARK', args[0], 'torch' in sys.modules, flush=True)\n")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = [line[5:] for line in first.stdout.splitlines() if line.startswith("MARK ")]
    assert lines[:2] == ["--help False", "--version False"] and len(lines) == 4
    # `run --help` here follows a cold `list` (which imports the registry); that `run --help` and
    # every usage error answer without torch is tests/test_cli_fast.py's (issue 30)
    # second process: the listing comes from the cache, still without torch
    second = subprocess.run([sys.executable, "-c", "import sys\nfrom gensample.cli import main\n"
                             "main(['list'], standalone_mode=False)\nprint('torch' in sys.modules)"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert second.stdout.strip().splitlines()[-1] == "False" and "ddim" in second.stdout


# -- 10. smaller points --------------------------------------------------------------------------------
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_files_respect_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        gio.atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


def test_second_run_into_a_locked_folder_refuses_naming_the_pid(tmp_path):
    out = tmp_path / "o"
    fd = api.acquire_lock(out)
    try:
        r = small_run(out)
        clean(r, 1, f"in use by another gensample run (pid {os.getpid()})")
        assert not (out / "run.json").exists()
    finally:
        api.release_lock(fd)
    clean(small_run(out), 0)


def test_log_progress_lines_when_not_a_terminal():
    import io

    buf = io.StringIO()
    p = api.LogProgress(100, "ddim", stream=buf, every_s=0.0, min_s=0.0)
    for _ in range(10):
        p.update(10)
    p.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("ddim: 10% (10/100 steps") and lines[-1].startswith("ddim: 100%")
    assert len(lines) == 10 and sum("100%" in line for line in lines) == 1  # one line per mark; 100% once
    quiet = io.StringIO()
    q = api.LogProgress(100, "ddim", stream=quiet)  # a short run stays quiet
    q.update(100)
    q.close()
    assert quiet.getvalue() == ""


def test_list_columns_fit_long_names(monkeypatch):
    import gensample.cli as cli

    data = {"samplers": [["a-very-long-sampler-name-indeed", "desc A", "gmm2d"], ["ddim", "desc B", "gmm2d"]],
            "zoo": [["z", "zoo desc"]], "prefixes": [["gmm", "mixture"]]}
    monkeypatch.setattr(cli, "listing", lambda: data)
    lines = invoke("list").output.splitlines()
    rows = [line for line in lines if line.startswith("  ")]
    starts = {line.index(desc) for line, desc in zip(rows, ["desc A", "desc B", "zoo desc", "mixture"])}
    assert len(starts) == 1  # one description column, after the longest name
    assert "a-very-long-sampler-name-indeed  desc A" in lines[1]


def test_2d_runs_draw_samples_over_density(tmp_path):
    clean(small_run(tmp_path / "o"), 0)
    png = (tmp_path / "o" / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_help_shows_per_sampler_defaults():
    out = " ".join(invoke("run", "--help").output.split())
    assert "fkc: default 1.0" in out and "ddim, oms, ts-ddim: default 0.0" in out
    assert "--max-samples" in out and "runs/<sampler>-<model>-<hash" in out


def test_comparison_figures_get_titles():
    from gensample.eval.images import make_grid, with_titles

    grid = make_grid(np.zeros((4, 8, 8, 1), dtype=np.uint8), ncol=4, scale=4)
    titled = with_titles(grid, ["truth", "y", "sample 1", "sample 2"])
    band = titled[: titled.shape[0] - grid.shape[0]]
    assert titled.shape[1] == grid.shape[1] and band.shape[0] > 8
    assert (band < 128).any() and (band == 255).any()  # dark text on a white band
    np.testing.assert_array_equal(titled[band.shape[0]:, :, 0], grid[..., 0])


def test_yaml_numbers_as_strings_parse_like_click_or_refuse(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('sampler: ddim\nmodel: gmm2d\nsteps: "3"\nnum-samples: "2"\neta: "0.5"\n')
    res = api.run(config=str(cfg), progress=False)
    assert res.record["config"]["steps"] == 3 and res.x.shape == (2, 2) and res.record["config"]["eta"] == 0.5
    cfg.write_text('sampler: ddim\nmodel: gmm2d\nsteps: "three"\n')
    clean(invoke("run", "--config", cfg, "-o", tmp_path / "o"), 2, "--steps must be an integer")
    cfg.write_text('sampler: ddim\nmodel: gmm2d\nsteps: true\n')
    clean(invoke("run", "--config", cfg, "-o", tmp_path / "o"), 2, "--steps must be an integer")
    assert not (tmp_path / "o").exists()
