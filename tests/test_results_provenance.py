"""Every stored benchmark result can be traced to the script and commit that made it.

For each ``benchmarks/results/**/*.json``: it carries a ``provenance`` block with all of
``_provenance.PROVENANCE_FIELDS``; its command names a script under ``benchmarks/`` that exists;
that script declares the file in its ``RESULT_FIELDS`` (read statically, the script is not run)
and the file's top-level keys are exactly the declared ones plus ``provenance``. Its command is
``python benchmarks/SCRIPT ...`` and, when it passes ``--out``, writes this very file; its recorded
model checksums equal those of the weights shipped now; and ``benchmarks/run_all.py --list`` names
it with that command.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
from _provenance import PROVENANCE_FIELDS, provenance, write_result  # noqa: E402

RESULT_FILES = sorted((BENCH / "results").rglob("*.json")) if (BENCH / "results").is_dir() else []


def declared_fields(script: Path) -> dict:
    """The script's ``RESULT_FIELDS`` read statically: a dict literal whose keys may also be
    module-level string constants (``OUT_FILE = "x.json"``)."""
    tree = ast.parse(script.read_text())
    consts: dict[str, str] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if not names or node.value is None:
            continue
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            consts.update({n: node.value.value for n in names})
        if "RESULT_FIELDS" in names and isinstance(node.value, ast.Dict):
            out = {}
            for k, v in zip(node.value.keys, node.value.values):
                key = consts.get(k.id) if isinstance(k, ast.Name) else ast.literal_eval(k)
                out[key] = ast.literal_eval(v)
            return out
    return {}


def test_write_result_records_provenance(tmp_path):
    rec = write_result(tmp_path / "r.json", {"rows": [1, 2]}, models=["digits-ddpm"])
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored == json.loads(json.dumps(rec))
    assert set(PROVENANCE_FIELDS) <= set(stored["provenance"])
    assert stored["rows"] == [1, 2]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp file left
    if (ROOT / "gensample" / "zoo" / "data" / "digits-ddpm").exists():
        assert stored["provenance"]["models"]["digits-ddpm"]["sha256"]


def test_provenance_names_the_commit():
    p = provenance()
    assert p["git_commit"] is None or len(p["git_commit"]) == 40


@pytest.mark.parametrize("path", RESULT_FILES, ids=[str(p.relative_to(BENCH)) for p in RESULT_FILES])
def test_stored_result_matches_its_script(path):
    data = json.loads(path.read_text())
    prov = data.get("provenance")
    assert isinstance(prov, dict), f"{path.name} has no provenance block: regenerate it with its script"
    missing = [f for f in PROVENANCE_FIELDS if f not in prov]
    assert not missing, f"{path.name}: provenance lacks {missing}"
    script = BENCH / str(prov["script"])
    assert script.is_file(), f"{path.name}: the script {prov['script']!r} that wrote it is not in benchmarks/"
    fields = declared_fields(script)
    assert path.name in fields, f"{script.name} does not declare {path.name} in RESULT_FIELDS"
    assert set(data) - {"provenance"} == set(fields[path.name]), (
        f"{path.name}: keys {sorted(set(data) - {'provenance'})} != what {script.name} writes {sorted(fields[path.name])}")


@pytest.mark.parametrize("path", RESULT_FILES, ids=[str(p.relative_to(BENCH)) for p in RESULT_FILES])
def test_stored_result_command_regenerates_this_file(path):
    """The recorded command runs the recorded script and, when it names an output, names this file,
    so `benchmarks/run_all.py` rewrites exactly this file."""
    import shlex

    prov = json.loads(path.read_text()).get("provenance") or {}
    argv = shlex.split(str(prov.get("command", "")))
    assert argv[:1] == ["python"] and len(argv) >= 2, f"{path.name}: command {prov.get('command')!r} is not `python SCRIPT ...`"
    assert Path(argv[1]).name == prov.get("script") and (ROOT / argv[1]).is_file(), (path.name, argv[1])
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
        assert (ROOT / out).resolve() == path.resolve(), f"{path.name}: its command writes {out}"


@pytest.mark.parametrize("path", RESULT_FILES, ids=[str(p.relative_to(BENCH)) for p in RESULT_FILES])
def test_stored_result_was_made_with_the_shipped_models(path):
    """A stored number measured with other weights than the ones shipped now is stale: the
    recorded SHA-256 of every named model must equal that of today's files. A model without
    shipped files (an analytic zoo model defined in code, e.g. gmm-digits) records none; the git
    commit pins it, and its name must still be a zoo model."""
    from _provenance import model_checksums

    from gensample import zoo

    recorded = (json.loads(path.read_text()).get("provenance") or {}).get("models") or {}
    current = model_checksums(list(recorded))
    for name, rec in recorded.items():
        if not rec.get("sha256"):
            assert name in zoo.discover() and current[name]["files"] == 0, (
                f"{path.name}: no checksum recorded for {name}, which is not a file-less zoo model")
            continue
        assert rec == current[name], f"{path.name} was made with other {name} weights: regenerate it (benchmarks/run_all.py --only {path.stem})"


def test_run_all_lists_a_command_for_every_stored_file(capsys):
    """`benchmarks/run_all.py --list` names every results file with the command that produces it."""
    import run_all

    assert run_all.main(["--list"]) == 0
    out = capsys.readouterr().out
    for path in RESULT_FILES:
        line = next((ln for ln in out.splitlines() if ln.startswith(str(path.relative_to(ROOT)) + " ")), None)
        assert line is not None, f"run_all --list does not list {path.name}"
        assert json.loads(path.read_text())["provenance"]["command"] in line
