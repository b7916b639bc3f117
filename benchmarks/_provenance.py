"""Provenance for stored benchmark results: every file under ``benchmarks/results/`` records how
it was made, so a reader can regenerate it and see when it went stale.

    from _provenance import write_result            # benchmarks/ is on sys.path when run as a script
    write_result("benchmarks/results/fkc_digits.json", payload, models=["digits-ddpm"])

``write_result`` wraps ``payload`` as ``{"provenance": {...}, **payload}`` and writes it atomically.
The provenance block holds the exact command line, the git commit (and whether the tree was
dirty), the SHA-256 of each named model's shipped weight files, the machine (CPU, cores, GPU) and
library versions. ``benchmarks/run_all.py`` regenerates every stored file; ``tests/test_results_provenance.py``
checks that every stored file carries this block and the fields its script writes, that its
command writes that very file, and that its model checksums equal those of the weights shipped now.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PROVENANCE_FIELDS = ("command", "script", "git_commit", "git_dirty", "models", "machine", "versions", "created_utc")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def model_checksums(models) -> dict:
    """SHA-256 of every weight/config file a zoo model ships (or of a file/folder given by path)."""
    out = {}
    for name in models or ():
        files = []
        p = Path(name)
        if p.exists():
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        else:
            data = Path(__file__).resolve().parents[1] / "gensample" / "zoo" / "data"
            cand = data / name
            if cand.exists():
                files = sorted(f for f in cand.rglob("*") if f.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        out[str(name)] = {"sha256": h.hexdigest() if files else None, "files": len(files)}
    return out


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("gensample", "torch", "diffusers", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = None
    return out


def provenance(models=()) -> dict:
    import datetime

    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else None
    return {
        "command": " ".join(["python", *(sys.argv or [])]),
        "script": script,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "models": model_checksums(models),
        "machine": machine(),
        "versions": versions(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_result(path, payload: dict, models=()) -> dict:
    """Write ``{"provenance": ..., **payload}`` atomically to ``path``; return what was written."""
    from gensample.io import atomic_write_bytes

    record = {"provenance": provenance(models), **payload}
    atomic_write_bytes(Path(path), (json.dumps(record, indent=1, default=str) + "\n").encode())
    return record
