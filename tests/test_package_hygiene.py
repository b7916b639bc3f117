"""Package hygiene that a reviewer would otherwise check by hand.

1. No import cycle inside ``gensample``: every ``import`` / ``from ... import`` statement of every
   module (at module level *and* inside functions, since a function-local import that exists only
   to dodge a cycle is still a cycle) is an edge of a graph over gensample's modules; the graph must
   be acyclic. Plugin discovery by ``importlib.import_module(name)`` with a computed name is not a
   static edge and is how registries find their entries.
2. Nothing in the package, tests, benchmarks, scripts or docs cites a file outside the repository
   (our private paper notes live outside it): a reader of the repository must be able to follow
   every reference. References go to paper equations and to ``docs/``.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gensample"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def owner(name: str) -> str | None:  # the longest gensample module that `name` names or lies in
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                # `from pkg import sub` imports the submodule pkg.sub when it is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t.split(".")[0] != "gensample":
                    continue
                dst = owner(t)
                if dst is not None and dst != mod and not mod.startswith(dst + "."):
                    # importing one's own parent package (`from .. import x` inside it) is how
                    # Python loads any submodule; it is not a cycle of ours unless the parent imports back
                    graph[mod].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    """The checker itself can fail."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_gensample():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The notes folder outside the repository, and the two ways its items were cited (a T-number, a section).
_OUTSIDE = re.compile(r"\b" + "spec" + r"s/[\w./-]+|\b" + "spec" + r"(?:'s)?\s+(?:T\d+|sec(?:tion)?\.?\s*\d+)", re.I)


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        files = [ROOT / f for f in out]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    keep = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".json"}
    return [f for f in files if f.suffix in keep and f.is_file() and f.stat().st_size < 2_000_000]


def test_citation_pattern_matches_what_it_must():
    assert _OUTSIDE.search("see " + "spec" + "s/fkc.md sec. 2")
    assert _OUTSIDE.search("(" + "spec" + " T7)")
    assert not _OUTSIDE.search("see docs/fkc.md section 2 and eq. (12) of the paper")


def test_no_citation_of_files_outside_the_repository():
    hits = []
    for f in _tracked_text_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, f"{len(hits)} references to files outside the repository:\n" + "\n".join(hits[:40])
