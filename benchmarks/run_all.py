"""Regenerate every stored benchmark result from the command recorded in it.

Each file under ``benchmarks/results/`` is written by a committed script through
``_provenance.write_result``, which stores the exact command line. This script reruns those
commands (from the repository root), in file-name order, so the whole folder is remade at the current
commit:

    python benchmarks/run_all.py --list          # what would run, and how stale each file is
    python benchmarks/run_all.py                 # rerun everything (CPU: tens of minutes)
    python benchmarks/run_all.py --only fkc      # files whose name contains "fkc"
    python benchmarks/run_all.py --dry-run       # print the commands only

Files without a provenance block cannot be regenerated and are listed as such (the provenance
test in ``tests/test_results_provenance.py`` fails on them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def stored_results() -> list[tuple[Path, dict | None]]:
    out = []
    for f in sorted(RESULTS.rglob("*.json")):
        try:
            prov = json.loads(f.read_text()).get("provenance")
        except (OSError, json.JSONDecodeError, AttributeError):
            prov = None
        out.append((f, prov if isinstance(prov, dict) else None))
    return out


def head_commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list stored results and their provenance")
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    ap.add_argument("--only", default=None, help="only files whose name contains this text")
    args = ap.parse_args(argv)
    head = head_commit()
    commands: dict[str, list[Path]] = {}
    missing = []
    for f, prov in stored_results():
        if args.only and args.only not in f.name:
            continue
        rel = f.relative_to(ROOT)
        if prov is None or not prov.get("command"):
            missing.append(rel)
            continue
        if args.list:
            stale = "current" if prov.get("git_commit") == head and not prov.get("git_dirty") else f"made at {str(prov.get('git_commit'))[:10]}"
            print(f"{rel}  [{stale}]  {prov['command']}")
        commands.setdefault(prov["command"], []).append(rel)
    for rel in missing:
        print(f"{rel}: no provenance block; cannot be regenerated", file=sys.stderr)
    if args.list:
        return 1 if missing else 0
    failed = 0
    for cmd, files in commands.items():  # one command may write several files
        print(f"$ {cmd}    # -> {', '.join(map(str, files))}", flush=True)
        if args.dry_run:
            continue
        argv_ = shlex.split(cmd)
        if argv_ and argv_[0] == "python":
            argv_[0] = sys.executable
        r = subprocess.run(argv_, cwd=ROOT)
        failed += r.returncode != 0
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
