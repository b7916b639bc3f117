"""Sampler registry: what `gensample run --sampler NAME` can run.

A sampler module registers a ``SamplerSpec`` with ``register(spec)``. Its ``fn`` draws one batch:

    fn(model: LoadedModel, opts: dict, seeds: list[int], ctx: RunContext) -> SampleBatch

``seeds`` holds one derived seed per output sample (see ``sample_seed``); a sampler makes one
CPU ``torch.Generator`` per sample from them (``ctx.generators(seeds)``) so results do not depend
on batch size, sharding or device. ``opts`` is the resolved option dict (common options plus the
sampler's own ``options``). Method-specific CLI flags are declared as ``Option``s on the spec and
become `gensample run` flags automatically.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.noise import normal_rows


@dataclass(frozen=True)
class Option:
    """A sampler-specific option: CLI flag ``--name-with-dashes``, API keyword ``name_with_underscores``.

    type: int | float | str | bool, or a tuple of allowed strings (a choice).
    min/max: inclusive numeric bounds checked for CLI and API alike.
    """

    name: str
    type: Any
    default: Any = None
    help: str = ""
    min: float | None = None
    max: float | None = None
    check: Any = None  # optional callable(value) raising ValueError with its own message (e.g. "auto" or a number)

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value):
        if value is None:
            return None
        if isinstance(self.type, tuple):
            if value not in self.type:
                raise ValueError(f"{self.flag} must be one of {list(self.type)}, got {value!r}")
            return value
        if self.type is bool:
            return parse_bool(self.flag, value)
        try:
            if self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not np.isfinite(value):
                    raise ValueError
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            tname = getattr(self.type, "__name__", str(self.type))
            raise ValueError(f"{self.flag} must be a finite {tname}, got {value!r}") from None
        if self.min is not None and value < self.min:
            raise ValueError(f"{self.flag} must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{self.flag} must be <= {self.max}, got {value}")
        if self.check is not None:
            self.check(value)
        return value


TRUE_WORDS = ("1", "true", "t", "yes", "y", "on")  # click.BOOL's words
FALSE_WORDS = ("0", "false", "f", "no", "n", "off")


def parse_bool(flag: str, value) -> bool:
    """A strict boolean: True/False (numpy too) or one of click's words (``"false"``, ``"no"``,
    ``"off"``, ``"0"``, ... case-insensitive) or the integers 0/1. Anything else (another string,
    another number, None)
    is a ValueError naming ``flag``: a string is never truthy just for being non-empty."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):  # click.BOOL takes 0/1 too (YAML `overwrite: 0`)
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(f"{flag} must be true or false (or one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}), got {value!r}")


@dataclass
class SampleBatch:
    """One batch of output. x: (n, *event_shape) float samples, or (n, L) int64 tokens.
    extras: per-sample arrays (first dim n) saved into samples.npz beside x.
    stats: counters summed over batches (nfe, head_calls, ...) and traces (lists) kept per batch.
    """

    x: torch.Tensor
    extras: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


@dataclass
class RunContext:
    sampler: str
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    progress: Callable[[int], None] | None = None  # called with the number of steps just done
    show_progress: bool = False

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One CPU generator per sample (EDM / diffusers convention: CPU noise, then move)."""
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def randn(self, gens: Sequence[torch.Generator], shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """(len(gens), *shape) standard normal, row b from gens[b] (CPU generators: drawn on CPU), then moved."""
        return normal_rows(gens, shape, device=self.device, dtype=dtype)

    def step_done(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress(n)


@dataclass
class SamplerSpec:
    name: str
    description: str
    fn: Callable[..., SampleBatch]
    default_model: str
    options: Sequence[Option] = ()
    default_steps: int | Callable[[dict], int] | None = 50
    model_kinds: tuple = ("diffusion",)
    # samples that must stay together in one batch (FKC: particles of one group)
    group_size: Callable[[dict], int] | None = None
    # how many progress units one batch takes (defaults to steps)
    progress_total: Callable[[dict], int] | None = None
    output: str = "continuous"  # "continuous" (x float) | "tokens"
    validate: Callable[[dict, Any], None] | None = None  # extra checks (opts, LoadedModel)
    # extra files after a run: write_extra(out_dir: Path, arrays: dict, model) (ess.png, samples.txt)
    write_extra: Callable[[Any, dict, Any], None] | None = None
    # text models: run.json's rule for which prompt sample i gets, when not prompts[i % P] (FKC groups)
    prompt_of_sample: Callable[[dict], str] | None = None


SAMPLERS: dict[str, SamplerSpec] = {}
_discovered = False


def register(spec: SamplerSpec) -> SamplerSpec:
    SAMPLERS[spec.name] = spec
    return spec


def discover() -> dict[str, SamplerSpec]:
    """Import every module of gensample.samplers and gensample.runs (the run glue of methods whose
    math file holds no CLI code) so their specs register."""
    global _discovered
    if not _discovered:
        _discovered = True
        for package in ("gensample.samplers", "gensample.runs"):
            pkg = importlib.import_module(package)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if mod.name not in ("registry",) and not mod.name.startswith("_"):
                    importlib.import_module(f"{package}.{mod.name}")
    return SAMPLERS


def get(name: str) -> SamplerSpec:
    discover()
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def all_options() -> dict[str, Option]:
    """Every sampler-specific option by key (first declaration wins; types must agree)."""
    discover()
    out: dict[str, Option] = {}
    for spec in SAMPLERS.values():
        for opt in spec.options:
            out.setdefault(opt.key, opt)
    return out


def sample_seed(seed: int, index: int) -> int:
    """Per-sample seed from (global seed, sample index): independent of batch, shard and world size."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1
