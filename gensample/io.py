"""Atomic file writes (temp file in the target folder + ``os.replace``), a leaf module.

A killed process leaves either the old file or the new one, never half a file (a stale
``.NAME.XXXX.tmp`` at worst, which ``gensample.api.remove_stale_temp_files`` deletes on resume).
Files get the mode ``0o666 & ~umask`` like ``open()`` would give them (``mkstemp`` alone makes
0600 files, which breaks shared run folders). Only numpy is imported here; torch tensors are
converted to JSON lazily through their ``tolist``.
"""

from __future__ import annotations

import io as _io
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; the parent folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            # no fsync: rename is atomic against a killed process (our threat model); fsync on
            # every PNG made large runs I/O bound.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_default(o):
    """JSON fallback for numpy scalars/arrays, tensors (anything with ``tolist``) and paths."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray) or (hasattr(o, "tolist") and hasattr(o, "detach")):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=json_default) + "\n").encode())


def atomic_save_npz(path: Path, arrays: dict) -> None:
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
