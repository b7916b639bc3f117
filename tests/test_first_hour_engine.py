"""The run engine in a new user's first hour (issue 30, items 3 and 8): a failed run leaves its
folder free, the last progress line prints once, --no-progress silences the loaders' bars, no
stale lock, a malformed --device is named, an offline hub id is refused at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from gensample import api
from gensample.cli import main
from gensample.models import loading


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from sd_models import save_sd_pipeline

    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd1", 1, "nested")


# -- 30.3: a run that drew no sample does not claim its folder -----------------------------------
def test_late_validation_error_leaves_the_folder_free(sd_folder, tmp_path):
    out = tmp_path / "out"
    bad = invoke("run", "--sampler", "oms", "--oms-module", "digits-flawed-oms", "--model", sd_folder, "-o", out,
                 "--steps", 2, "-n", 1, "--no-progress")
    assert bad.exit_code == 2 and "1 input channels" in bad.output and "Traceback" not in bad.output
    assert not out.exists()  # it created the folder and drew nothing: nothing is left
    good = invoke("run", "--sampler", "ddim", "--model", sd_folder, "-o", out, "--steps", 2, "-n", 1, "--no-progress")
    assert good.exit_code == 0, good.output
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    # into a folder that already held files, the failed run removes only its own record
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("user file")
    bad = invoke("run", "--sampler", "oms", "--oms-module", "digits-flawed-oms", "--model", sd_folder, "-o", keep,
                 "--steps", 2, "-n", 1, "--no-progress")
    assert bad.exit_code == 2 and sorted(p.name for p in keep.iterdir()) == ["notes.txt"]


def test_failed_record_without_samples_claims_nothing(tmp_path):
    """A run that failed or was interrupted before its first shard keeps its record (diagnosis),
    but another configuration may use the folder; a complete run still protects it."""
    out = tmp_path / "o"
    out.mkdir()
    cfg = api.resolve_options("ddim", model="gmm2d", steps=3, num_samples=2)
    other = {**api.semantic_config(cfg), "steps": 7}
    for status in ("failed", "interrupted", "running"):
        (out / "run.json").write_text(json.dumps({"status": status, "semantic_config": other}))
        api.check_existing_run(out, cfg)  # no error
    (out / "run.json").write_text(json.dumps({"status": "complete", "semantic_config": other}))
    with pytest.raises(ValueError, match="different configuration"):
        api.check_existing_run(out, cfg)


# -- 30.8: small things ------------------------------------------------------------------------
# (the final progress line printed once: tests/test_first_hour.py::test_log_progress_lines_when_not_a_terminal)

def test_no_progress_hides_the_loaders_bars(sd_folder, capfd):
    capfd.readouterr()
    api.run("ddim", str(sd_folder), steps=1, num_samples=1, progress=False)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()  # restored after loading


def test_finished_and_failed_runs_leave_no_lock_and_a_dead_holder_does_not_block(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no longer running
    (out / api.LOCK_NAME).write_text(str(dead.pid))
    r = invoke("run", "--sampler", "ddim", "--model", "gmm2d", "-n", 2, "--steps", 2, "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert not (out / api.LOCK_NAME).exists()
    fd = api.acquire_lock(out)  # (a failed run's exit path: test_late_validation_error_leaves_the_folder_free)
    try:
        assert (out / api.LOCK_NAME).read_text() == str(os.getpid())
    finally:
        api.release_lock(fd)
    assert not (out / api.LOCK_NAME).exists()


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:", "cuda0", "cuda:1x"])
def test_malformed_cuda_device_is_named(device, tmp_path):
    with pytest.raises(ValueError, match="malformed"):
        api.resolve_device(device)
    r = invoke("run", "--sampler", "ddim", "--model", "gmm2d", "--device", device, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "malformed" in r.output and "CUDA is not available" not in r.output, r.output


def test_offline_hub_id_is_refused_at_once(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))

    def never(*a, **kw):
        raise AssertionError("the network must not be tried when offline")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", never)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        loading.load_model("someone/no-such-model")
    assert time.perf_counter() - t0 < 5.0
    msg = str(err.value)
    assert "offline" in msg and "HF_HUB_OFFLINE" in msg and "hf download someone/no-such-model" in msg
    r = invoke("run", "--sampler", "ddim", "--model", "someone/no-such-model", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "hf download" in r.output and "Traceback" not in r.output


def test_offline_hub_id_in_the_cache_loads(monkeypatch, tmp_path):
    """The local cache is used offline: a repository laid out as huggingface_hub caches it."""
    import huggingface_hub
    from sd_models import build_pixel_unet

    repo = tmp_path / "cache" / "models--someone--tiny-ddpm"
    snap = repo / "snapshots" / "abc123"
    build_pixel_unet(3).save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    m = loading.load_model("someone/tiny-ddpm")
    assert type(m.unet).__name__ == "UNet2DModel" and m.event_shape == (3, 8, 8)


def test_unresolvable_hub_host_is_refused_without_retries(monkeypatch, tmp_path):
    import socket

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))

    def no_dns(*a, **kw):
        raise socket.gaierror(-2, "Name or service not known")

    def slow(*a, **kw):
        time.sleep(30)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", slow)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="does not resolve"):
        loading.load_model("someone/no-such-model")
    assert time.perf_counter() - t0 < 5.0
