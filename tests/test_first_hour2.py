"""The first hour, second pass (issue 30): threads from the work, OMS without dead ends, fkc in one
try, the README's claims, clean warnings, long prompts, negative guidance, mixture labels.

(Item 2, usage errors without torch: tests/test_cli_fast.py; item 7, FID caveats: tests/test_fid.py.)
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from gensample import api, threads
from gensample.cli import main
from cli_helpers import clean, invoke  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keep_threads(monkeypatch):
    """Restore torch's thread count and drop the user's thread variables for the test."""
    before = torch.get_num_threads()
    for var in threads.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_baseline", before)
    yield
    torch.set_num_threads(before)


# -- 1. threads chosen from the work, recorded in run.json ------------------------------------------
def test_auto_threads_one_for_tiny_work_all_cores_for_big(monkeypatch):
    assert threads.auto_threads(1e4, cores=8) == 1
    assert threads.auto_threads(threads.MACS_PER_THREAD * 3.5, cores=8) == 3
    assert threads.auto_threads(1e15, cores=8) == 8  # an SD-size UNet: every core
    # the machine's load is no input (samples must not depend on what else runs)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0), raising=False)
    assert threads.auto_threads(1e15, cores=8) == 8


@pytest.mark.parametrize("name,batch", [("digits-ddpm", 16), ("digits-ddpm", 256), ("gmm-digits", 256), ("digits-flawed", 256)])
def test_demo_models_get_one_thread(name, batch):
    from gensample.models.loading import load_model

    assert threads.auto_threads(threads.estimate_macs(load_model(name), batch), cores=16) == 1


def test_local_processes_share_the_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.available_cores() == 2 and threads.auto_threads(1e15) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert threads.available_cores() == 8


def test_tiny_demo_runs_on_one_thread_and_records_it(tmp_path, keep_threads):
    torch.set_num_threads(2)
    threads._baseline = 2  # torch's default on a 2-core machine, not a choice of the user
    api.run("ddim", "gmm2d", num_samples=4, steps=3, progress=False, output=str(tmp_path / "o"))
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["threads"]["requested"] == "auto" and rec["threads"]["used"] == 1
    assert torch.get_num_threads() == 1 and "multiply-adds" in rec["threads"]["reason"]
    assert rec["config"]["threads"] == "auto" and "threads" not in rec["semantic_config"]


def test_explicit_threads_and_user_settings_are_kept(tmp_path, keep_threads, monkeypatch):
    r = invoke("run", "--sampler", "ddim", "-n", "2", "--steps", "2", "--threads", "2", "-o", tmp_path / "a", "--no-progress")
    clean(r, 0)
    assert json.loads((tmp_path / "a" / "run.json").read_text())["threads"]["used"] == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    rec = api.run("ddim", "gmm2d", num_samples=2, steps=2, progress=False).record
    assert rec["threads"]["used"] == 2 and "OMP_NUM_THREADS" in rec["threads"]["reason"]
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    threads._baseline, threads._ours = 1, 1  # the user called torch.set_num_threads(2) after import
    rec = api.run("ddim", "gmm2d", num_samples=2, steps=2, progress=False).record
    assert rec["threads"]["used"] == 2 and "torch.set_num_threads" in rec["threads"]["reason"]


# -- 4. OMS on a model without a module: point only to what works ----------------------------------
def test_oms_without_a_module_points_to_released_modules(tmp_path):
    r = invoke("run", "--sampler", "oms", "--model", "digits-ddpm", "-n", "1", "-o", tmp_path / "o")
    clean(r, 2, "ships no OMS module", "--oms-module", "h1t/oms_b_openclip_15_21")
    assert "train oms" not in r.output


# -- 5. fkc in one try ----------------------------------------------------------------------------
def test_fkc_group_error_gives_the_whole_fix():
    with pytest.raises(ValueError) as err:
        api.resolve_options("fkc", num_samples=2, guidance_scale=3.0)
    msg = str(err.value)
    for fix in ("-n 16", "--particles 2", "--final one_per_group"):
        assert fix in msg, msg
    for kw in ({"num_samples": 16}, {"num_samples": 2, "particles": 2}, {"num_samples": 2, "final": "one_per_group"}):
        api.resolve_options("fkc", guidance_scale=3.0, **kw)  # each way out the message names is accepted


def test_guidance_scale_alone_implies_the_cfg_target(tmp_path):
    r = invoke("run", "--sampler", "fkc", "--class-label", "0", "--guidance-scale", "2", "-n", "4", "--particles", "4",
               "--steps", "4", "-o", tmp_path / "o", "--no-progress")
    clean(r, 0)
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["config"]["fkc_target"] == "cfg" and rec["stats"]["fkc"]["target"] == "cfg"
    assert api.resolve_options("fkc")["fkc_target"] == "anneal"  # no scale: annealing, as before
    assert api.resolve_options("fkc", guidance_scale=2.0, beta=2.0)["fkc_target"] == "anneal"  # --beta: annealing asked
    # an explicit target still wins, and a clash is still refused
    with pytest.raises(ValueError, match="applies to --fkc-target cfg only"):
        api.run("fkc", "gmm2d", fkc_target="anneal", guidance_scale=2.0, num_samples=4, particles=4, steps=2, progress=False)


# -- 6. README ------------------------------------------------------------------------------------
def test_readme_covers_text_to_image_commands_outputs_and_installs():
    text = (REPO / "README.md").read_text()
    assert "--prompt" in text and "docs/text_to_image.md" in text and "stable-diffusion" in text.lower()
    for cmd in ("help", "eval", "fid", "fid-stats", "list", "train", "run"):
        assert re.search(rf"gensample {re.escape(cmd)}\b", text), f"CLI reference lacks `gensample {cmd}`"
    for name in ("before_after.png", "compare.png", "ess.png", "samples.txt", "metrics.json"):
        assert name in text, name
    assert "enable_time_shift(pipe)" in text and "from_pretrained" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert "HF_HUB_OFFLINE" in text or "needs the hub" in text.lower()


def test_readme_per_method_files_are_the_ones_the_samplers_write():
    """The README's table "file: samplers" matches the samplers' write_extra functions."""
    from gensample.samplers import registry

    text = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+\.(?:png|txt|json))` \| ([^|]+)\|", text, re.M))
    assert {"ess.png", "samples.txt", "compare.png", "before_after.png", "metrics.json"} <= set(rows)
    writers = {}
    for name, spec in registry.discover().items():
        if spec.write_extra is not None:
            writers[name] = inspect.getsource(spec.write_extra)
    for fname, cell in rows.items():
        said = set(re.findall(r"`([a-z0-9-]+)`", cell))
        really = {name for name, src in writers.items() if fname in src}
        assert said == really, f"README says {sorted(said)} write {fname}; the samplers that do: {sorted(really)}"


# -- 8. small things ------------------------------------------------------------------------------
def test_warnings_print_as_one_clean_line():
    import click
    import warnings

    @main.command(name="_warn_probe")
    def probe():
        warnings.warn("something to know", UserWarning)
        click.echo("done")

    try:
        r = invoke("_warn_probe")
    finally:
        main.commands.pop("_warn_probe", None)
    clean(r, 0, "warning: something to know", "done")
    assert "UserWarning" not in r.output and "warnings.warn(" not in r.output and ".py:" not in r.output


def test_long_prompt_warns_once_and_counts_tokens(tmp_path):
    pytest.importorskip("transformers")
    from sd_models import MAX_TOKENS, build_text_encoder, build_tokenizer

    from gensample.models.text import encode_prompts, token_usage

    tok = build_tokenizer(tmp_path / "tok")
    enc = build_text_encoder(len(tok))
    long = "a cat " * 2000  # 12,000 characters
    usage = token_usage(tok, ["a cat", long], enc)
    assert usage["max_tokens"] == MAX_TOKENS and usage["truncated"] == [1]
    assert usage["tokens"][1] > 1000 and usage["tokens_used"] == [usage["tokens"][0], MAX_TOKENS]
    with pytest.warns(UserWarning, match=rf"reads only the first {MAX_TOKENS}") as rec:
        encode_prompts(tok, enc, [long], "cpu")
    assert len(rec) == 1
    with _no_warning():
        encode_prompts(tok, enc, ["a cat"], "cpu")


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.rec = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not [w for w in self.rec if "reads only" in str(w.message)]
        return False


@pytest.mark.parametrize("value", ["-3", "-0.5"])
def test_negative_guidance_scale_is_refused(tmp_path, value):
    r = invoke("run", "--sampler", "ddim", "--guidance-scale", value, "-o", tmp_path / "o")
    clean(r, 2, "--guidance-scale must be >= 0", "unconditional")
    assert not (tmp_path / "o").exists()
    assert api.resolve_options("ddim", guidance_scale=0.0)["guidance_scale"] == 0.0  # w = 0: the unconditional model


@pytest.mark.parametrize("labels,extra,bad", [([0, 1.5], {}, "1.5"), ([0, 5], {"num_classes": 2}, "label 5"),
                                              ([0, -1], {}, "label -1"), ([True, 0], {}, "True")])
def test_mixture_labels_outside_the_classes_are_refused(tmp_path, labels, extra, bad):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"weights": [1, 1], "means": [[-1.0, 0.0], [1.0, 0.0]], "stds": [0.3, 0.3], "labels": labels, **extra}))
    r = invoke("run", "--sampler", "ddim", "--model", f"gmm:{f}", "-n", "2", "--steps", "2", "-o", tmp_path / "o")
    clean(r, 2, bad)
    assert not (tmp_path / "o").exists()


def test_declared_class_count_gives_the_null_class(tmp_path):
    from gensample.models.gmm import GaussianMixture

    f = tmp_path / "m.json"
    f.write_text(json.dumps({"weights": [1, 1], "means": [[-1.0], [1.0]], "stds": [0.3, 0.3], "labels": [0, 1], "num_classes": 3}))
    m = GaussianMixture.from_json(f)
    assert m.num_classes == 3 and m.is_null(3) and not m.is_null(2)
    assert GaussianMixture.from_json(f).to_json()["num_classes"] == 3


# -- 5 and 8 on a (tiny random) Stable Diffusion folder: the issue's own scenario --------------------
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from sd_models import save_sd_pipeline

    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd1", 1, "nested")


def test_fkc_on_a_text_model_in_one_try(sd_folder, tmp_path):
    base = ["run", "--sampler", "fkc", "--model", sd_folder, "--prompt", "a cat", "--guidance-scale", "3", "--steps", "2",
            "--no-progress"]
    r = invoke(*base, "-n", "2", "-o", tmp_path / "a")
    clean(r, 2, "-n 16", "--particles 2", "--final one_per_group")  # one message, every fix
    r = invoke(*base, "-n", "2", "--particles", "2", "-o", tmp_path / "b")  # the first fix just works
    clean(r, 0)
    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert rec["config"]["fkc_target"] == "cfg" and rec["stats"]["fkc"]["target"] == "cfg"


def test_long_prompt_in_a_run_is_one_clean_warning(sd_folder, tmp_path):
    r = invoke("run", "--sampler", "ddim", "--model", sd_folder, "--prompt", "a cat " * 1700, "-n", "1", "--steps", "1",
               "--no-progress", "-o", tmp_path / "o")
    clean(r, 0)
    lines = [ln for ln in r.output.splitlines() if "reads only the first" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: prompt 'a cat a cat")
    assert "UserWarning" not in r.output and "warnings.warn" not in r.output
