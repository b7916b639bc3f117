"""Per-sampler help: `gensample run --sampler S --help` and `gensample help S` list only S's own
flags, each with S's own default (read from S's `Option`, the one home of that default)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gensample.cli import main
from gensample.samplers import registry

SAMPLERS = registry.discover()
TEXT_KEYS = ("prompt", "negative_prompt", "guidance_rescale", "height", "width", "weights_variant")


def _help(*args) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _flags(text: str) -> set[str]:
    return {word.rstrip(",") for word in text.split() if word.startswith("--")}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_run_help_for_one_sampler_lists_only_its_flags(name):
    text = _help("run", "--sampler", name, "--help")
    shown = _flags(text)
    own = {o.flag for o in SAMPLERS[name].options if o.key not in TEXT_KEYS}
    others = {o.flag for o in registry.all_options().values() if o.key not in TEXT_KEYS} - own
    assert own <= shown, f"{name}: missing {sorted(own - shown)}"
    assert not (others & shown), f"{name}: shows other samplers' flags {sorted(others & shown)}"
    flat = " ".join(text.split()).replace("- ", "-")  # help wraps long names at their hyphens
    for opt in SAMPLERS[name].options:
        if opt.default is not None and opt.key not in TEXT_KEYS:
            assert f"[{name}: default {opt.default}]" in flat, f"{name}: {opt.flag} lacks its default {opt.default!r}"


def test_eta_default_is_the_samplers_own():
    fkc = " ".join(_help("run", "--sampler", "fkc", "--help").split())
    ddim = " ".join(_help("run", "--sampler=ddim", "-h").split())
    assert "[fkc: default 1.0]" in fkc and "ddim, oms" not in fkc
    assert "[ddim: default 0.0]" in ddim and "fkc: default" not in ddim
    assert "--particles" in fkc and "--particles" not in ddim


def test_help_command_matches_run_help():
    assert _help("help", "fkc") == _help("run", "--sampler", "fkc", "--help")
    assert "run" in _help("help") and "list" in _help("help")


def test_help_for_an_unknown_sampler_is_a_usage_error():
    result = CliRunner().invoke(main, ["help", "nosuch"])
    assert result.exit_code == 2 and "unknown sampler 'nosuch'" in result.output


def test_plain_run_help_still_lists_every_sampler_flag():
    shown = _flags(_help("run", "--help"))
    every = {o.flag for o in registry.all_options().values() if o.key not in TEXT_KEYS}
    assert every <= shown
