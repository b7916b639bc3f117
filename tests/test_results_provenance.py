"""Every stored benchmark result can be traced to the script and commit that made it.

For each ``benchmarks/results/**/*.json``: it carries a ``provenance`` block with all of
``_provenance.PROVENANCE_FIELDS``; its command names a script under ``benchmarks/`` that exists;
that script declares the file in its ``RESULT_FIELDS`` (read statically, the script is not run)
and the file's top-level keys are exactly the declared ones plus ``provenance``.
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
