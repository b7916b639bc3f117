"""Named embedded models (``gensample list``).

Each module in this package registers its entries on import with ``@register(name, description)``
on a zero-argument loader returning a ``LoadedModel``. ``discover()`` imports every module here,
so adding a model is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    loader: Callable


ZOO: dict[str, ZooEntry] = {}
_discovered = False


def register(name: str, description: str):
    def deco(fn):
        ZOO[name] = ZooEntry(name, description, fn)
        return fn

    return deco


def discover() -> dict[str, ZooEntry]:
    global _discovered
    if not _discovered:
        _discovered = True
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{__name__}.{mod.name}")
    return ZOO
