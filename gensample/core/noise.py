"""Standard normal draws from per-sample generators: the one home of the samplers' noise helpers.

Every draw is made on the generator's own device (a ``torch.Generator("cuda")`` works, and a CPU
generator gives the same numbers whatever device the samples live on), then moved to ``device``.
The generators are called in list order, one ``torch.randn`` call each, so a sample's noise
depends only on its own generator (batch-size and device independent). ``dtype=None`` is torch's
default dtype (float32). Pure torch.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def normal(shape: Sequence[int], generator: torch.Generator | None = None, *, device=None, dtype=None) -> torch.Tensor:
    """(*shape) standard normal: one draw from ``generator`` (None: the global CPU generator) on its
    own device, then moved to ``device`` (None: left there)."""
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=_gen_device(generator))
    return z if device is None else z.to(device)


def normal_rows(generators: Sequence[torch.Generator | None], shape: Sequence[int], *, device=None,
                dtype=None) -> torch.Tensor:
    """(len(generators), *shape) standard normal: row b is one (*shape) draw from ``generators[b]``
    on that generator's own device, the rows stacked and moved to ``device`` (None: the generators'
    device, which must then be one)."""
    rows = [normal(shape, g, dtype=dtype) for g in generators]
    if device is not None and len({r.device for r in rows}) > 1:
        rows = [r.to(device) for r in rows]
    z = torch.stack(rows)
    return z if device is None else z.to(device)


def normal_blocks(generators: Sequence[torch.Generator | None], rows: int, shape: Sequence[int], *, device=None,
                  dtype=None) -> torch.Tensor:
    """(rows, *shape) standard normal: ``rows / len(generators)`` consecutive rows from each
    generator, drawn as one (rows / len, *shape) block on that generator's own device, the blocks
    concatenated in order and moved to ``device`` (None: the generators' device, which must then be one).
    SMC particles: generator g owns the block of its system's K particles."""
    if rows % len(generators):
        raise ValueError(f"rows ({rows}) must be a multiple of the number of generators ({len(generators)})")
    per = rows // len(generators)
    return normal_rows(generators, (per, *shape), device=device, dtype=dtype).flatten(0, 1)


def normal_like(sample: torch.Tensor, generator) -> torch.Tensor:
    """Noise shaped like ``sample``, in its dtype and on its device: one draw per row from a list of
    per-sample generators (``normal_rows``), else one draw from ``generator`` (``normal``). The
    stochastic steps' noise (DDIMScheduler's convention: drawn in the sample's dtype)."""
    if isinstance(generator, (list, tuple)):
        return normal_rows(generator, tuple(sample.shape[1:]), device=sample.device, dtype=sample.dtype)
    return normal(tuple(sample.shape), generator, device=sample.device, dtype=sample.dtype)
