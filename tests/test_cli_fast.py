"""Usage errors and help answer before torch is imported (issue 30, item 2).

The CLI checks options against the sampler manifest (``gensample.options``): JSON built from the
registry, keyed by the SHA-256 of the files the registry is made of, so a stale copy is never
used (it is rebuilt into the user cache instead). These tests check that the answer comes without
torch (in-process: ``sys.modules`` at the point of failure), in a fresh process within 2 s (target
< 1 s; the margin is for loaded CI machines), that the shipped manifest is current, and that the
torch-free checks say exactly what the full registry says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from gensample import api, options
from gensample.samplers import registry

USAGE_ERRORS = [
    (["run", "--sampler", "ddim", "--steps", "0"], "--steps must be >= 1"),
    (["run", "--sampler", "nope"], "'nope' is not one of"),
    (["run", "--sampler", "ddim", "--eta", "-1"], "--eta must be >= 0"),
    (["run", "--sampler", "ddim", "--particles", "4"], "does not apply to sampler 'ddim'"),
    (["run", "--sampler", "fkc", "--fkc-target", "nope"], "'nope' is not one of"),
    (["run", "--sampler", "ddim", "--threads", "0"], "--threads must be auto or an integer >= 1"),
    (["run", "--sampler", "ddim", "--guidance-scale", "-3"], "--guidance-scale must be >= 0"),
    (["run", "--config", "MISSING"], "cannot read config file"),
    (["run", "--sampler", "ddim", "--prompts", "MISSING"], "cannot read the file"),
    (["run", "--sampler", "ddim", "-o", "AFILE"], "is a file"),
    (["run", "--sampler", "ddim", "-o", "AFILE/sub"], "is a file, not a folder"),
]
HELPS = [["run", "--help"], ["help", "ddim"], ["run", "--sampler", "ddim", "--help"], ["help", "fkc"], ["--help"]]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A user cache holding a current manifest (built now when the shipped one is stale, as a
    user's first call would), so the checks below see the steady state."""
    cache = tmp_path_factory.mktemp("cache")
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", "from gensample.options import manifest; manifest()"], env=env, check=True,
                   timeout=600, capture_output=True)
    return env


def _fill(args, tmp):
    (tmp / "AFILE").write_text("x")
    return [str(tmp / a) if a in ("MISSING", "AFILE", "AFILE/sub") else a for a in args]


def test_usage_errors_and_help_never_import_torch(env, tmp_path):
    cases = [(_fill(a, tmp_path), m) for a, m in USAGE_ERRORS] + [(h, None) for h in HELPS]
    code = ("import json, sys\nimport click\nfrom gensample import options\n"
            "if options.manifest().source == 'built':\n    print('RESULT stale')\n    sys.exit(0)\n"
            "from gensample.cli import main\nout = []\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    try:\n        main(args, standalone_mode=False)\n        msg = ''\n"
            "    except click.ClickException as err:\n        msg = err.format_message()\n"
            "    except SystemExit:\n        msg = ''\n"
            "    out.append([msg, 'torch' in sys.modules, 'diffusers' in sys.modules])\n"
            "print('RESULT ' + json.dumps(out))\n")
    for _ in range(3):  # a source file edited meanwhile (a developer's tree): the manifest is rebuilt; ask again
        res = subprocess.run([sys.executable, "-c", code, json.dumps([a for a, _ in cases])], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:]
        if line != "stale":
            break
    got = json.loads(line)
    for (args, msg), (text, torch_loaded, diffusers_loaded) in zip(cases, got):
        if msg is not None:
            assert msg in text, (args, text)
        assert not torch_loaded and not diffusers_loaded, f"{args}: torch/diffusers imported before the answer"


@pytest.mark.parametrize("args", [["run", "--sampler", "ddim", "--steps", "0"], ["help", "ddim"]])
def test_usage_error_and_help_answer_within_two_seconds(env, args):
    walls = []
    for _ in range(3):  # the best of three: one slow start on a loaded machine is not the CLI's cost
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "gensample", *args], env=env, capture_output=True, text=True, timeout=300)
        walls.append(time.perf_counter() - t0)
        assert res.returncode == (2 if args[0] == "run" else 0), res.stderr
    assert min(walls) < 2.0, f"gensample {' '.join(args)}: {walls}"


def test_shipped_manifest_is_current():
    assert options.shipped_is_current(), (
        "gensample/options_manifest.json is stale (a sampler's options changed): run `python -m gensample.options --write`")


def test_manifest_says_what_the_registry_says():
    """Round trip: every sampler, default and option declaration of the registry, exactly."""
    man = options._from_data(registry.manifest_data(deps=[]), "built")
    reg = registry.discover()
    assert sorted(man.samplers) == sorted(reg)
    for name, spec in reg.items():
        m = man.samplers[name]
        assert (m.description, m.default_model, m.output) == (spec.description, spec.default_model, spec.output)
        assert m.default_steps == (None if callable(spec.default_steps) else spec.default_steps)
        assert [(o.name, o.type, o.default, o.help, o.min, o.max) for o in m.options] == \
               [(o.name, o.type, o.default, o.help, o.min, o.max) for o in spec.options], name


def test_a_stale_manifest_is_never_used(tmp_path, monkeypatch):
    """A manifest whose key does not match today's sources is ignored and rebuilt (then cached)."""
    data = registry.manifest_data(deps=["io.py"])
    data["samplers"]["ddim"]["default_steps"] = 7  # what an outdated file might say
    data["key"] = "0" * 64
    stale = tmp_path / "shipped.json"
    stale.write_text(json.dumps(data))
    monkeypatch.setattr(options, "SHIPPED", stale)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(options, "_MANIFEST", None)
    man = options.manifest()
    assert man.source == "built" and man.samplers["ddim"].default_steps == registry.get("ddim").default_steps
    monkeypatch.setattr(options, "_MANIFEST", None)
    assert options.manifest().source == "cache"  # the rebuilt copy is reused while current
    # a change to a file the registry is built from invalidates the cached copy too
    cached = json.loads(options._cache_file().read_text())
    assert options.source_key(cached["deps"]) == cached["key"]
    assert options.source_key(cached["deps"] + ["no/such/file.py"]) != cached["key"]


@pytest.mark.parametrize("kw", [dict(sampler="ddim", steps=0), dict(sampler="ddim", eta=-1), dict(sampler="ddim", particles=3),
                                dict(sampler="fkc", resample="nope"), dict(sampler="ddim", threads="many"),
                                dict(sampler="ddim", guidance_scale=-1), dict(sampler="ddim", nope=1),
                                dict(sampler="ddim", batch_size="x"), dict(sampler="nope")])
def test_torch_free_checks_match_the_full_registry(kw):
    kw = dict(kw)
    sampler = kw.pop("sampler")
    with pytest.raises(ValueError) as full:
        api.resolve_options(sampler, **kw)
    with pytest.raises(ValueError) as light:
        options.resolve_options(sampler, _catalog=options.manifest(), **kw)
    assert str(full.value) == str(light.value)
