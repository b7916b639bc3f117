"""Deprecated import paths (one release): the diffusers scheduler faces moved from
``gensample.samplers.<method>`` to ``gensample.schedulers.<method>``.

Pipeline folders saved before the move record the old module as the scheduler's library in
model_index.json. diffusers imports that module, asks it for the class, and also looks up the base
classes there (``getattr(library, "SchedulerMixin")`` picks ``from_pretrained``). ``moved`` builds the
module-level ``__getattr__`` (PEP 562) that answers both lazily: the method modules import neither
diffusers nor gensample.schedulers at import time (the faces import them, not the reverse).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Iterable

LOADER_BASES = ("SchedulerMixin", "ConfigMixin")  # what diffusers' loader asks the recorded module for


def moved(old_module: str, new_module: str, names: Iterable[str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``old_module``: each of ``names`` comes from ``new_module`` with a
    FutureWarning naming the new path; diffusers' base classes come from diffusers, silently."""
    names = frozenset(names)

    def __getattr__(name: str):
        if name in names:
            warnings.warn(f"{old_module}.{name} moved to {new_module}.{name}; the old path works for one more "
                          f"release. Import it from {new_module} (a folder saved with the old path loads; save it "
                          f"again to record the new one)", FutureWarning, stacklevel=2)
            return getattr(importlib.import_module(new_module), name)
        if name in LOADER_BASES:
            return getattr(importlib.import_module("diffusers"), name)
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")

    return __getattr__
