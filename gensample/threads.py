"""How many CPU threads a run gives torch (``--threads auto|N``, run.json ``threads``).

torch's default uses every core for every operation. For the small models of the demos (an
analytic mixture, an 8x8 UNet, batches of 16) each operation is microseconds of work, so on a
CPU that other jobs share the extra threads only wait for each other: issue 30 measured the dps
demo's sampling at 34.4 s with torch's 2 threads and 5.1 s with one, three busy processes beside
it. ``auto`` therefore estimates the multiply-adds of one model call (``estimate_macs``, an upper
estimate) and gives one thread per ``MACS_PER_THREAD`` of them, at most the cores this process
may use: the demo models get one thread, a Stable Diffusion UNet (about 3.5e12 by this estimate per
512x512 image) every core. The machine's load is deliberately not an input: a CPU kernel's
summation order may depend on its thread count, and the same command must draw the same samples
whatever else the machine is doing (the load is only recorded in run.json's reason).

Threads the user chose are kept: ``--threads N`` / ``threads=N``, an ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` or ``TORCH_NUM_THREADS`` in the environment, or a ``torch.set_num_threads``
call made after ``gensample.api`` was imported. CUDA runs keep torch's setting (the GPU does the work).
"""

from __future__ import annotations

import math
import os
import sys

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS")
# Estimated multiply-adds per model call worth one more thread. Measured (2 cores, load 4-6, median
# of 7 UNet calls, 1 vs 2 threads): digits-ddpm batch 16 (estimate 1.1e9) 13.5 vs 203 ms, batch 256
# (1.8e10) 223 vs 578 ms; digits-flawed batch 16 (7.9e8) 11.5 vs 1227 ms, batch 256 (1.3e10) 125 vs
# 91 ms. A second thread pays off only from ~1e10 by this (over-)estimate, and then only on free cores.
MACS_PER_THREAD = 2e10

# torch's thread count when this module was imported (gensample.api imports it): a later change is the user's
_baseline: int | None = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
_ours: int | None = None  # the count this module last set


def _torch():
    import torch

    return torch


def available_cores() -> int:
    """Cores this process may use: its CPU affinity shared among the processes of a local
    multi-process launch (``LOCAL_WORLD_SIZE``), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def _remember_baseline() -> None:
    global _baseline
    if _baseline is None:
        _baseline = _torch().get_num_threads()


def user_setting() -> tuple[int, str] | None:
    """(threads, where) when the user chose torch's thread count, else None."""
    for var in ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                continue
            if n >= 1:
                return _torch().get_num_threads(), f"environment {var}={value}"
    _remember_baseline()
    now = _torch().get_num_threads()
    if now != _baseline and now != _ours:
        return now, "torch.set_num_threads"
    return None


def estimate_macs(model, batch: int) -> float:
    """Multiply-adds of one model call on ``batch`` rows (a rough upper estimate).

    A network: its parameters times the rows times, for an image event (C, H, W), the H*W
    positions a convolution weight is applied at. An analytic mixture: K components times the
    event size per row. Anything else: the event size per row."""
    event = tuple(getattr(model, "event_shape", ()) or ())
    numel = math.prod(event) if event else 1
    positions = math.prod(event[1:]) if len(event) >= 3 else 1
    params = 0
    torch = _torch()
    parts = [getattr(model, "unet", None)]
    extras = getattr(model, "extras", None)
    if isinstance(extras, dict):
        parts += list(extras.values())
    seen = set()
    for part in parts:
        if isinstance(part, torch.nn.Module) and id(part) not in seen:
            seen.add(id(part))
            params += sum(p.numel() for p in part.parameters())
    macs = float(params) * batch * positions
    mixture = extras.get("mixture") if isinstance(extras, dict) else None
    weights = getattr(mixture, "weights", None)
    if weights is not None and hasattr(weights, "numel"):
        macs += float(weights.numel()) * numel * batch
    return max(macs, float(numel * batch))


def machine_load() -> float:
    """The 1-minute load average (runnable processes), 0 where unknown."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def auto_threads(macs: float, cores: int | None = None) -> int:
    """One thread per MACS_PER_THREAD multiply-adds of a model call, between 1 and ``cores`` (the
    cores this process may use, ``available_cores``)."""
    cores = available_cores() if cores is None else cores
    return int(min(cores, max(1, macs // MACS_PER_THREAD)))


def apply(cfg: dict, model, device, batch: int | None = None) -> dict:
    """Set torch's intra-op thread count for this run; return what run.json records:
    ``{"requested": "auto" | N, "used": n, "reason": ...}``."""
    global _ours
    torch = _torch()
    requested = cfg.get("threads", "auto")
    batch = int(batch or cfg.get("batch_size") or 1)
    batch = min(batch, int(cfg.get("num_samples") or batch))
    if requested != "auto":
        n, reason = int(requested), "--threads"
    elif str(device).startswith("cuda"):
        return {"requested": requested, "used": torch.get_num_threads(), "reason": "CUDA run: torch's setting kept"}
    else:
        user = user_setting()
        if user is not None:
            n, reason = user[0], f"kept the user's setting ({user[1]})"
            return {"requested": requested, "used": n, "reason": reason}
        macs, load = estimate_macs(model, batch), machine_load()
        n = auto_threads(macs)
        reason = f"auto: ~{macs:.2g} multiply-adds per model call, {available_cores()} core(s), load {load:.1f}"
    if torch.get_num_threads() != n:
        _remember_baseline()
        torch.set_num_threads(n)
    _ours = n
    return {"requested": requested, "used": n, "reason": reason}
