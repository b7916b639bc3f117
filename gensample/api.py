"""Python API mirroring the CLI: ``gensample.run(sampler=..., model=..., **options)``.

The run is organised around *sample indices*: sample i is drawn from a generator seeded with
``sample_seed(seed, i)``, so the set of samples does not depend on batch size, shards, processes
or resumption. Output (when ``output`` is given) is written shard by shard, atomically
(temp file + rename), and a rerun of the same command finishes only the missing indices.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import parallel
from .io import atomic_save_npz, atomic_write_bytes, atomic_write_json  # noqa: F401  (re-exported: old import path)
from .io import json_default as _json_default
from .eval.images import save_images, scatter_over_density_png
from .samplers import registry
from .samplers.registry import RunContext, parse_bool, sample_seed  # noqa: F401
# option validation lives in the torch-free gensample.options (the CLI checks options before importing torch)
from .options import (COMMON_KEYS, MAX_SAMPLES, NON_SEMANTIC, _bool, _float, _int, _intlike,  # noqa: F401
                      _text_options, load_config_file, resolve_options)
from . import threads as _threads

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    samples: dict  # name -> np.ndarray; "x" (n, *event) float32 or "tokens" (n, L) int64
    record: dict  # what run.json holds
    is_main: bool = True  # False on the non-main processes of a multi-process launch

    @property
    def x(self) -> np.ndarray:
        return self.samples.get("x", self.samples.get("tokens"))


def resolve_device(device: str | None) -> torch.device:
    device = device or "auto"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        m = re.fullmatch(r"cuda(?::(\d+))?", device)
        if m is None:  # the syntax first: "cuda:abc" is a typo, not a missing GPU
            raise ValueError(f"--device {device!r} is malformed; use cuda or cuda:N with N a GPU index (0, 1, ...), "
                             f"cpu or auto")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but CUDA is not available on this machine; use --device cpu or auto")
        count = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= count:
            raise ValueError(f"--device {device}: there is no GPU {int(m.group(1))}; {count} visible "
                             f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("--device mps requested but MPS is not available")
        return torch.device("mps")
    raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def semantic_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in NON_SEMANTIC}


def versions() -> dict:
    import diffusers

    from . import __version__

    return {"gensample": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


# atomic file helpers live in gensample.io (imported above, still importable from here)


# -- shards ----------------------------------------------------------------------------------
def completed_indices(out_dir: Path) -> set[int]:
    done: set[int] = set()
    for f in sorted((out_dir / "shards").glob("*.npz")):
        try:
            with np.load(f) as z:
                done.update(int(i) for i in z["indices"])
        except Exception:  # a foreign or broken file: ignore, it will be redone
            continue
    return done


def load_shards(out_dir: Path, n: int) -> dict:
    parts: dict[str, list] = {}
    idx_all = []
    for f in sorted((out_dir / "shards").glob("*.npz")):
        try:
            with np.load(f) as z:
                shard = {k: z[k] for k in z.files}
        except Exception:  # unreadable: completed_indices skipped it too, so it was redone
            continue
        if "indices" not in shard:
            continue
        idx_all.append(shard.pop("indices"))
        for k, v in shard.items():
            parts.setdefault(k, []).append(v)
    if not idx_all:
        return {}
    idx = np.concatenate(idx_all)
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    keep = np.concatenate([[True], idx[1:] != idx[:-1]])  # never duplicate
    out = {k: np.concatenate(v)[order][keep] for k, v in parts.items()}
    if len(idx[keep]) != n or not np.array_equal(idx[keep], np.arange(n)):
        raise RuntimeError(f"output is incomplete: {len(idx[keep])} of {n} samples present")
    return out


def remove_stale_temp_files(out_dir: Path) -> None:
    """Delete temp files (``.NAME.XXXX.tmp``) left by a process killed mid-write."""
    for sub in (out_dir, out_dir / "shards", out_dir / "images"):
        if sub.is_dir():
            for f in sub.glob(".*.tmp"):
                f.unlink(missing_ok=True)


def check_existing_run(out_dir: Path, cfg: dict) -> None:
    """Refuse to resume into ``out_dir`` unless its run.json holds the same semantic config.

    Keys added to the configuration since the old run was written (with their default value)
    do not count as a difference only if the old record lacks them and the new value is None."""
    record_path = out_dir / "run.json"
    has_shards = (out_dir / "shards").is_dir() and any((out_dir / "shards").glob("*.npz"))
    if not record_path.exists():
        if has_shards:
            raise ValueError(f"{out_dir} holds sample shards but no run.json, so its configuration is unknown; "
                             f"pass --overwrite to start fresh or choose another --output")
        return
    try:
        old = json.loads(record_path.read_text())
        old_cfg = old["semantic_config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the existing run record {record_path} ({err.__class__.__name__}); "
                         f"pass --overwrite to start fresh or choose another --output") from None
    if not has_shards and old.get("status") != "complete":
        return  # a run that drew no sample (failed / interrupted before its first shard) does not claim the folder
    new_cfg = json.loads(json.dumps(semantic_config(cfg), default=_json_default))
    diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    if diff:
        details = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in diff)
        raise ValueError(f"{out_dir} holds a run with a different configuration ({details}); "
                         f"pass --overwrite to start fresh or choose another --output")


def clear_run(out_dir: Path) -> None:
    """--overwrite: remove a previous run's files (only those gensample writes)."""
    import shutil

    for sub in ("shards", "images"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    for f in ("run.json", "samples.npz", "grid.png", "samples.png"):
        (out_dir / f).unlink(missing_ok=True)


def _combine_stats(total: dict, stats: dict) -> None:
    """Merge already-merged stats (another process's or a previous invocation's) into total."""
    for k, v in stats.items():
        if isinstance(v, list) and isinstance(total.get(k, []), list):
            total.setdefault(k, []).extend(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(total.get(k, 0), (int, float)):
            total[k] = total.get(k, 0) + v
        else:
            total[k] = v


def _merge_stats(total: dict, stats: dict) -> None:
    for k, v in stats.items():
        if isinstance(v, bool):
            total[k] = v
        elif isinstance(v, (int, float, np.integer, np.floating)):
            total[k] = total.get(k, 0) + v
        elif isinstance(v, (list, tuple, np.ndarray, torch.Tensor)):
            total.setdefault(k, []).append(np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v).tolist())
        else:
            total[k] = v


SHARD_SECONDS = 5.0  # aim: one shard on disk per this many seconds of sampling work
FIRST_BATCH = 8  # samples in the first batch, before the time per sample is known


def next_batch_size(prev: int, elapsed_s: float, cap: int, group: int = 1, target_s: float = SHARD_SECONDS) -> int:
    """Size of the next batch: as many samples as fit in ``target_s`` at the pace of the last
    batch (``prev`` samples in ``elapsed_s``), growing at most 4x per batch, never below
    FIRST_BATCH nor above ``cap``, a multiple of ``group``. Samples do not depend on it
    (per-sample seeds)."""
    pace = target_s * prev / max(elapsed_s, 1e-6)
    # never below the first batch: tiny batches cost nearly as much as full ones (per-call overhead)
    n = int(max(min(cap, FIRST_BATCH), min(cap, 4 * prev, pace)))
    return max(group, n // group * group)


def generate(cfg: dict, model, indices: list[int], out_dir: Path | None, ctx: RunContext, bar=None,
             max_batch: int | None = None):
    """Draw the given sample indices in batches; write one shard per batch if out_dir is set.

    The batch size adapts (``next_batch_size``): it starts at FIRST_BATCH samples and then
    grows or shrinks so that a shard reaches the disk every few seconds, never above
    ``cfg["batch_size"]`` nor ``max_batch`` (the memory guard's cap), and always a whole number
    of particle groups. Returns (arrays or None, stats)."""
    spec = registry.get(cfg["sampler"])
    stats: dict = {}
    collected: dict[str, list] = {}
    group = spec.group_size(cfg) if spec.group_size is not None else 1
    cap = min(cfg["batch_size"], max_batch or cfg["batch_size"])
    cap = max(group, cap // group * group)
    bs = max(group, min(cap, FIRST_BATCH) // group * group)
    pos = 0
    while pos < len(indices):
        batch = indices[pos : pos + bs]
        pos += len(batch)
        if bar is not None:
            bar.batch = len(batch)
        seeds = [sample_seed(cfg["seed"], i) for i in batch]
        t0 = time.perf_counter()
        with torch.no_grad():
            if hasattr(model, "prepare_batch"):
                model.prepare_batch(batch)  # text models: sample i gets prompt i % len(prompts)
            res = spec.fn(model, cfg, seeds, ctx)
            arrays = _batch_arrays(res, spec)
            if hasattr(model, "add_decoded"):
                arrays = model.add_decoded(arrays)  # latent models: + "images", the VAE-decoded pixels
        for k, v in arrays.items():
            if len(v) != len(batch):
                raise RuntimeError(f"sampler {spec.name} returned {len(v)} rows for {k!r}, expected {len(batch)}")
        key = "tokens" if spec.output == "tokens" else "x"
        if key == "x" and not np.isfinite(arrays[key]).all():  # never write garbage samples
            raise FloatingPointError(f"{spec.name}: non-finite values (NaN/Inf) in the final samples "
                                     f"of indices {batch[0]}-{batch[-1]}")
        _merge_stats(stats, {**res.stats, "batches": 1})
        if out_dir is not None:
            atomic_save_npz(out_dir / "shards" / f"{batch[0]:06d}-{batch[-1]:06d}.npz",
                            {"indices": np.asarray(batch, dtype=np.int64), **arrays})
        else:
            for k, v in arrays.items():
                collected.setdefault(k, []).append(v)
        bs = next_batch_size(len(batch), time.perf_counter() - t0, cap, group)
    if out_dir is None:
        return {k: np.concatenate(v) for k, v in collected.items()}, stats
    return None, stats


def _batch_arrays(res, spec) -> dict:
    x = res.x.detach().cpu()
    key = "tokens" if spec.output == "tokens" else "x"
    x = x.long().numpy() if key == "tokens" else x.float().numpy()
    arrays = {key: x}
    for k, v in res.extras.items():
        arrays[k] = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
    return arrays


def prepare_model(cfg: dict, device: torch.device, cast: bool = True, loaded=None):
    """The run's LoadedModel, checked against the options and cast to ``cfg["dtype"]`` on
    ``device``. ``loaded``: a model the caller holds (``models.loading.from_object``), used as
    it is: never loaded, cast nor moved (``run`` takes its device and dtype)."""
    from .models.loading import load_model

    spec = registry.get(cfg["sampler"])
    if loaded is not None:
        model = loaded
    else:
        with quiet_loading(not cfg.get("progress", True)):
            model = load_model(cfg["model"], variant=cfg.get("weights_variant"))
    if model.kind not in spec.model_kinds:
        raise ValueError(f"sampler {spec.name!r} needs a model of kind {list(spec.model_kinds)}; "
                         f"{cfg['model']!r} is {model.kind!r}")
    model = _flow_form(cfg, model, spec)
    if model.kind == "diffusion" and cfg.get("steps") is not None and cfg["steps"] > model.num_train_timesteps:
        raise ValueError(f"--steps must be <= the training schedule's {model.num_train_timesteps} timesteps, got {cfg['steps']}")
    if cfg.get("class_label") is not None and not model.num_classes:
        raise ValueError(f"model {cfg['model']!r} is unconditional; --class-label is not allowed")
    if cfg.get("class_label") is not None and cfg["class_label"] >= model.num_classes:
        raise ValueError(f"--class-label must be in [0, {model.num_classes - 1}] for model {cfg['model']!r}, got {cfg['class_label']}")
    present = getattr(model.extras.get("mixture"), "labels", None)  # a mixture may skip labels (e.g. [0, 5])
    if cfg.get("class_label") is not None and present is not None and cfg["class_label"] not in set(present.tolist()):
        raise ValueError(f"--class-label {cfg['class_label']} is not a label of model {cfg['model']!r}; "
                         f"its labels are {sorted(set(present.tolist()))}")
    if cfg.get("guidance_scale", 1.0) != 1.0 and model.kind == "diffusion" and (not model.num_classes or model.null_class is None) and not model.extras.get("text_conditional"):
        raise ValueError(f"--guidance-scale needs a class-conditional model with a null class; {cfg['model']!r} is unconditional")
    if model.kind == "diffusion" and hasattr(model, "configure_run"):
        model.configure_run(cfg)  # prompts, negative prompt, guidance_rescale, height/width, T5 length
    elif cfg.get("max_sequence_length") is not None:
        raise ValueError(f"--max-sequence-length {cfg['max_sequence_length']} (the T5 prompt length) applies to SD3 / "
                         f"Flux pipelines; model {cfg['model']!r} is of kind {model.kind!r}")
    if spec.validate is not None:
        spec.validate(cfg, model)
    dtype = DTYPES[cfg.get("dtype", "fp32")]
    borrowed = getattr(model, "borrowed", False)
    if dtype != torch.float32 and device.type == "cpu" and not borrowed:  # an object's own dtype is respected
        raise ValueError(f"--dtype {cfg['dtype']} needs --device cuda; CPU runs in fp32")
    if not cast or borrowed:  # validation only (the parent of a multi-process launch), or the caller's object
        return model, dtype
    cast_module = parallel.cast_module
    # network weights in `dtype`; float64 schedule/probability tensors stay float64
    for part in [model.unet, *model.extras.values()]:
        if isinstance(part, torch.nn.Module):
            cast_module(part, device, None if dtype == torch.float32 else dtype)
    if cfg.get("compile") and isinstance(model.unet, torch.nn.Module):
        model.unet = torch.compile(model.unet)
    return model, dtype


def _flow_form(cfg: dict, model, spec):
    """--flow / --flow-shift (the flow form of an analytic mixture, ``models.gmm.as_flow_model``),
    then the flow refusals: a sampler that does not run on flow-matching models, and the One More
    Step start (docs/flow_matching.md "What does not apply")."""
    if cfg.get("flow"):
        from .models.gmm import as_flow_model

        model = as_flow_model(model, 1.0 if cfg.get("flow_shift") is None else float(cfg["flow_shift"]))
    if getattr(model, "prediction_type", None) == "flow":
        reason = registry.flow_refusal(spec)
        if reason is not None:
            raise ValueError(f"sampler {spec.name!r} does not run on the flow-matching model {model.name!r}: {reason}")
        if cfg.get("oms_module") is not None:
            raise ValueError(f"--oms-module does not apply to the flow-matching model {model.name!r}: "
                             f"{registry.FLOW_REFUSALS['oms']}")
    return model


@contextlib.contextmanager
def quiet_loading(quiet: bool):
    """While loading with progress off: diffusers', transformers' and huggingface_hub's own
    progress bars ("Loading weights", downloads) disabled, restored afterwards."""
    if not quiet:
        yield
        return
    import importlib

    restore = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if mod.is_progress_bar_enabled():
            mod.disable_progress_bar()
            restore.append(mod.enable_progress_bar)
    try:
        import huggingface_hub.utils as hub_utils

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
    except ImportError:
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()


def borrow_model(model, options: dict):
    """``model=<object>`` (the Python API): (the spec string standing for it, its LoadedModel);
    (model, None) for a spec string. The object's device and dtype become the run's: an explicit
    ``device`` / ``dtype`` that differs is refused (the object is used as it is, never moved or
    cast). ``options`` is updated in place."""
    if model is None or isinstance(model, str):
        return model, None
    from .models.loading import from_object

    loaded = from_object(model)  # TypeError for a wrong kind of object, ValueError for unsupported models
    origin = loaded.origin
    own = torch.device(origin["device"])
    want = options.get("device")
    if want is not None and str(want) != "auto":
        asked = resolve_device(str(want))
        if asked.type != own.type or (asked.index is not None and asked.index != (own.index or 0)):
            raise ValueError(f"device={want!r}, but the model object lives on {own}; the object is used as it is (never "
                             f"moved): leave device out, or move the object first (pipe.to({str(asked)!r}))")
    options["device"] = str(own)
    names = {v: k for k, v in DTYPES.items()}
    own_dtype = getattr(torch, origin["dtype"], None)
    if own_dtype not in names:
        raise ValueError(f"the model object's UNet is {origin['dtype']}; a run takes fp32, fp16 or bf16 weights: cast "
                         f"the object first (e.g. pipe.to(torch.float32))")
    want = options.get("dtype")
    if want is not None and want != names[own_dtype]:
        raise ValueError(f"dtype={want!r}, but the model object's UNet is {origin['dtype']} ({names[own_dtype]}); the "
                         f"object is used as it is (never cast): leave dtype out, or cast the object first")
    options["dtype"] = names[own_dtype]
    return loaded.name, loaded


class OutputError(OSError):
    """The output folder cannot be written (read-only, full, not a folder, in use); exit 1."""


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM during a run (SIGINT raises plain KeyboardInterrupt); the CLI exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _output_error(out_dir: Path, err: OSError) -> OutputError:
    what = err.strerror or str(err)
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    hint = {errno.ENOSPC: "free some space", errno.EROFS: "choose a writable place",
            errno.EACCES: "check its permissions"}.get(err.errno, "check that it is a writable folder")
    return OutputError(f"cannot write to --output {out_dir}: {what}{where}; {hint} or choose another --output")


class _SigtermRaises:
    """While active (main thread only), SIGTERM raises RunInterrupted so the run can record it."""

    def __enter__(self):
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise RunInterrupted(signum)

            self.old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


LOCK_NAME = ".gensample.lock"


def acquire_lock(out_dir: Path):
    """Exclusive lock on ``out_dir`` (flock on ``.gensample.lock``, holding our pid): a second
    run into the same folder refuses with the holder's pid instead of drawing the same samples.
    Released when the returned descriptor is closed or the process dies. None where flock is
    unavailable (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"--output {out_dir} is in use by another gensample run (pid {holder}); "
                              f"wait for it to finish (then rerun to resume) or choose another --output") from None
        # a file left by a dead run holds no flock and does not block; but the previous holder
        # may have removed the file between our open and our flock: then lock the one there now
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:  # pragma: no cover - five removals in a row: another run is starting and ending right now
        raise OutputError(f"--output {out_dir}: could not take the lock {path}; try again")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    handle = LockHandle(fd)
    handle.path = path
    return handle


class LockHandle(int):
    """The descriptor of a held ``.gensample.lock`` (an int) and the lock file's ``path``."""

    path: Path | None = None


def release_lock(fd) -> None:
    """Remove the lock file (while still holding it, so no other run sees a file nobody guards)
    and close it: a finished, failed or interrupted run leaves no ``.gensample.lock`` behind."""
    if fd is None:
        return
    path = getattr(fd, "path", None)
    try:
        if path is not None and os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


class LogProgress:
    """Progress for logs (stderr not a terminal): one line at most every ``every_s`` seconds, and
    at 10% marks once ``min_s`` seconds have passed; quiet for runs shorter than that."""

    def __init__(self, total: int, desc: str, stream=None, every_s: float = 10.0, min_s: float = 2.0):
        self.total, self.desc, self.stream = max(1, total), desc, stream or sys.stderr
        self.every_s, self.min_s = every_s, min_s
        self.done, self.t0 = 0, time.monotonic()
        self.last_t, self.last_mark, self.printed = self.t0, 0, False
        self.printed_done = -1  # the count of the last line printed

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        mark = int(10 * self.done / self.total)
        if now - self.last_t >= self.every_s or (mark > self.last_mark and now - self.t0 >= self.min_s):
            self._line(now)
            self.last_mark = mark

    def _line(self, now) -> None:
        self.stream.write(f"{self.desc}: {100 * self.done / self.total:.0f}% ({int(self.done + 1e-6)}/{self.total} steps, "
                          f"{now - self.t0:.1f} s)\n")
        self.stream.flush()
        self.last_t, self.printed, self.printed_done = now, True, self.done

    def close(self) -> None:
        if self.printed and self.done >= self.total and self.printed_done != self.done:  # the 100% line once
            self._line(time.monotonic())


def _progress_bar(spec, cfg, n_todo: int):
    """A progress object counting sample-steps; its ``batch`` attribute scales step callbacks."""
    per = spec.progress_total(cfg) if spec.progress_total else (cfg.get("steps") or 1)
    total = per * n_todo
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=cfg["sampler"], unit="step", file=sys.stderr, leave=False)
    else:
        bar = LogProgress(total, cfg["sampler"])
    bar.batch = 1
    return bar


# -- resource guard --------------------------------------------------------------------------
def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: mem_get_info; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - unknown is fine: no guard
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_bytes_per_sample(model) -> int:
    """Working memory one sample needs while it is drawn (a rough upper estimate).

    Event tensors: ~16 float64 copies. An analytic mixture of K components builds several
    (batch, K) float64 tables per model call (squared distances, logits, softmax, mask), ~12 K
    numbers per sample. Learned networks are not estimated beyond their event size."""
    import math

    numel = int(math.prod(model.event_shape)) if model.event_shape else 1
    per = 16 * 8 * numel
    mixture = model.extras.get("mixture") if isinstance(getattr(model, "extras", None), dict) else None
    if mixture is not None and hasattr(mixture, "weights"):
        per += 12 * 8 * int(mixture.weights.numel())
    return per


def _gb(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_resources(cfg: dict, model, spec, device: torch.device, out_dir: Path | None, n_todo: int | None = None) -> int:
    """The memory guard: the largest batch that fits in half the free memory of ``device``
    (a ValueError with the numbers if not even one sample or particle group fits), and, with an
    output folder, a refusal when the samples would not fit on its disk. Returns the batch cap."""
    import shutil

    group = spec.group_size(cfg) if spec.group_size is not None else 1
    per = estimate_bytes_per_sample(model)
    free = available_memory_bytes(device)
    cap = cfg["batch_size"]
    if free is not None:
        budget = free // 2
        if per * group > budget:
            raise ValueError(f"model {cfg['model']!r} needs about {_gb(per * group)} of working memory per "
                             f"{'particle group' if group > 1 else 'sample'}, but only {_gb(free)} is free on {device}; "
                             f"use a smaller model (fewer mixture components) or a machine with more memory")
        cap = min(cap, max(group, budget // per // group * group))
    if out_dir is not None:
        import math

        numel = int(math.prod(model.event_shape)) if model.event_shape else 1
        need = 2 * 4 * numel * (cfg["num_samples"] if n_todo is None else n_todo)  # shards + samples.npz, float32
        probe = out_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            usage = shutil.disk_usage(probe)
            disk_free = usage.free if usage.total > 0 else None  # /proc and friends report 0: no guard
        except OSError:
            disk_free = None
        if disk_free is not None and need > disk_free:
            raise OutputError(f"--output {out_dir}: {cfg['num_samples']} samples need about {_gb(need)} on disk, "
                              f"only {_gb(disk_free)} is free; free some space, lower --num-samples or choose another --output")
    return cap


# -- the run ---------------------------------------------------------------------------------
def default_output_dir(cfg: dict, root: str | os.PathLike = "runs") -> Path:
    """``runs/<sampler>-<model slug>-<8 hex of the semantic config>``: the same command resumes
    its own folder, any other configuration gets another folder (the CLI's default --output)."""
    # unset (None) options are left out, so options added in later versions keep old folders' names
    sem = json.dumps({k: v for k, v in semantic_config(cfg).items() if v is not None}, sort_keys=True, default=_json_default)
    digest = hashlib.sha256(sem.encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(cfg["model"])).strip("-").lower()[-40:].strip("-") or "model"
    return Path(root) / f"{cfg['sampler']}-{slug}-{digest}"


def run(sampler: str = None, model: str | None = None, *, config: str | None = None, **options) -> RunResult:
    """Draw samples; write them (if ``output``) and return them with the run record.

    Every CLI option is a keyword: steps, num_samples, batch_size, class_label, guidance_scale,
    seed, device, dtype, output, overwrite, progress, compile, max_samples, num_processes; for
    text-to-image / latent models prompt (str or list: sample i gets prompt i % len), negative_prompt,
    guidance_rescale, height, width, weights_variant (docs/text_to_image.md), max_sequence_length
    (SD3 / Flux: the T5 prompt length, docs/flow_matching.md); plus
    the sampler's own options (``gensample list`` / ``gensample run --help``). Booleans are
    strict: True/False or click's words ("false", "no", ...), never any non-empty string.

    Order: every option and the model are checked first (ValueError/TypeError), then the output
    folder (a different configuration there is refused unless ``overwrite=True``; a folder in
    use by another run is refused, OutputError), then memory and disk (the batch is lowered or
    the run refused with the numbers). SIGTERM/Ctrl-C mark run.json ``interrupted`` and keep the
    finished shards: the same call again resumes.

    Under a multi-process launch (``accelerate launch``, torchrun, or ``num_processes=N``) each
    process draws a contiguous chunk of sample indices (whole particle groups) into
    ``output/shards``; the main process merges them after a barrier and writes samples.npz,
    images and run.json (on other processes the returned ``samples`` is empty).
    """
    num_processes = options.pop("num_processes", None)
    if num_processes is not None and _int("num_processes", num_processes, 1) > 1:
        return launch_local(_int("num_processes", num_processes, 1), sampler=sampler, model=model,
                            config=config, **options)
    model, loaded = borrow_model(model, options)  # model=<pipeline / UNet object>: used as it is
    cfg, spec, device, out_dir = plan_run(sampler, model, config, options)
    sampler = cfg["sampler"]
    info = parallel.process_info(device)
    if loaded is not None and info.device != device:
        raise ValueError(f"this process of the launch runs on {info.device}, but the model object lives on {device}; "
                         f"move the object to the process's device first (pipe.to(accelerator.device))")
    device = info.device
    if info.world_size > 1 and out_dir is None:
        raise ValueError("a multi-process run needs --output DIR (the processes write shards there)")
    model_obj, dtype = prepare_model(cfg, device, loaded=loaded)  # every input check before the output folder is looked at
    check_output(out_dir, cfg)
    max_batch = check_resources(cfg, model_obj, spec, device, out_dir)
    info.wait()  # every process has checked the old run before the main process changes it

    record_path = out_dir / "run.json" if out_dir is not None else None
    record = {
        "sampler": sampler,
        "model": cfg["model"],
        "config": cfg,
        "semantic_config": semantic_config(cfg),
        "versions": versions(),
        "device": str(device),
        "num_processes": info.world_size,
        "status": "running",
        "num_samples": cfg["num_samples"],
    }
    if max_batch < cfg["batch_size"]:
        record["batch_size_capped_by_memory"] = max_batch
    if getattr(model_obj, "origin", None):
        record["model_origin"] = model_obj.origin  # an in-memory object: class, _name_or_path, dtype, device, adapters
    record["threads"] = _threads.apply(cfg, model_obj, device, max_batch)  # --threads (gensample.threads)
    if getattr(model_obj, "text_conditional", False):
        record["text_conditioning"] = model_obj.text_record()  # says when the empty prompt was used
        if spec.prompt_of_sample is not None:
            record["text_conditioning"]["prompt_of_sample"] = spec.prompt_of_sample(cfg)
    prev: dict = {}
    lock = None
    created = out_dir is not None and not out_dir.exists()
    with _SigtermRaises():
        try:
            if record_path is not None and info.is_main:
                lock = acquire_lock(out_dir)
                if cfg["overwrite"]:
                    clear_run(out_dir)
                remove_stale_temp_files(out_dir)
                prev = json.loads(record_path.read_text()) if record_path.exists() else {}
                if not any((out_dir / "shards").glob("*.npz")):
                    prev = {}  # a record without samples (a run that failed before its first shard): nothing to carry on
                record["wall_time_s"] = prev.get("wall_time_s", 0.0)
                atomic_write_json(record_path, record)
        except OSError as err:
            release_lock(lock)
            if created:  # leave nothing behind when the folder could not even take run.json
                _remove_if_only_ours(out_dir)
            raise err if isinstance(err, OutputError) else _output_error(out_dir, err) from None
        discard = False
        try:
            with model_obj.frozen() if getattr(model_obj, "borrowed", False) else contextlib.nullcontext():
                return _run_body(cfg, spec, model_obj, dtype, device, info, out_dir, record, prev, max_batch)
        except BaseException as err:
            if record_path is not None and info.is_main:
                interrupted = isinstance(err, KeyboardInterrupt)
                record.update(status="interrupted" if interrupted else "failed",
                              error=f"{err.__class__.__name__}: {err}" if not interrupted else str(err) or "KeyboardInterrupt")
                record["samples_done"] = len(completed_indices(out_dir))
                # a user error (exit 2) before the first sample: the folder is left as it was found (no run.json);
                # other failures keep their record for diagnosis, which claims nothing (check_existing_run)
                discard = isinstance(err, (ValueError, TypeError)) and not record["samples_done"] and not prev
                try:
                    if discard:
                        record_path.unlink(missing_ok=True)
                    else:
                        atomic_write_json(record_path, record)
                except OSError:
                    pass  # the disk that failed the shard may fail this too; the shards tell the truth
            if isinstance(err, OSError) and not isinstance(err, OutputError) and out_dir is not None:
                raise _output_error(out_dir, err) from None
            raise
        finally:
            release_lock(lock)
            if discard and created:
                _remove_if_only_ours(out_dir)


def _remove_if_only_ours(out_dir: Path) -> None:
    try:
        leftovers = [p for p in out_dir.rglob("*") if p.is_file() and p.name != LOCK_NAME and not p.name.endswith(".tmp")]
        if not leftovers:
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
    except OSError:
        pass


def _run_body(cfg, spec, model_obj, dtype, device, info, out_dir, record, prev, max_batch) -> RunResult:
    sampler = cfg["sampler"]
    record_path = out_dir / "run.json" if out_dir is not None else None
    info.wait()  # run.json exists before any shard
    group = spec.group_size(cfg) if spec.group_size is not None else 1
    mine = parallel.split_indices(range(cfg["num_samples"]), info.world_size, info.index, group)
    done = completed_indices(out_dir) if out_dir is not None else set()
    todo = [i for i in mine if i not in done]

    bar = None
    if cfg.get("progress", True) and todo and info.is_main:
        bar = _progress_bar(spec, cfg, len(todo))
    ctx = RunContext(sampler=sampler, device=device, dtype=dtype,
                     progress=(lambda k: bar.update(k * bar.batch)) if bar is not None else None)
    t0 = time.perf_counter()
    try:
        arrays, stats = generate(cfg, model_obj, todo, out_dir, ctx, bar, max_batch=max_batch)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    stats = json.loads(json.dumps(stats, default=_json_default))  # plain numbers/lists, picklable
    per_process = info.gather_object({"stats": stats, "drawn": len(todo)})
    stats = {}
    for part in per_process:  # rank order = index order (contiguous chunks)
        _combine_stats(stats, part["stats"])
    drawn = sum(part["drawn"] for part in per_process)
    if out_dir is not None and not info.is_main:
        info.wait()  # the main process has written samples.npz, images and run.json
        return RunResult(samples={}, record=record, is_main=False)
    if out_dir is not None:
        arrays = load_shards(out_dir, cfg["num_samples"])
        prev_stats = prev.get("stats") or {}
        merged_stats = json.loads(json.dumps(prev_stats)) if drawn < cfg["num_samples"] else {}
        _combine_stats(merged_stats, stats)
        stats = merged_stats
    record["stats"] = stats
    # NFE per sample trajectory (sequential model calls of one batch, averaged over batches);
    # the sum over batches is kept as nfe_total_calls.
    record["nfe_total_calls"] = stats.get("nfe")
    nfe = None if stats.get("nfe") is None else stats["nfe"] / max(1, stats.get("batches", 1))
    record["nfe"] = int(nfe) if nfe is not None and float(nfe).is_integer() else nfe
    record["wall_time_s"] = record.get("wall_time_s", 0.0) + wall
    record["wall_time_this_invocation_s"] = wall
    record["samples_drawn_this_invocation"] = drawn
    record["status"] = "complete"
    if out_dir is not None:
        write_outputs(out_dir, arrays, model_obj, spec)
        atomic_write_json(record_path, record)
        info.wait()
    return RunResult(samples=arrays, record=record)


def plan_run(sampler, model, config, options: dict):
    """Resolve and check the options (no model loaded, nothing read from the output folder).

    Returns (cfg, spec, device, out_dir). Raises ValueError/TypeError for every user error;
    OutputError when ``output`` exists and is not a folder. The existing-run check
    (``check_existing_run``) comes after the model checks in ``run``.
    """
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be the path of a YAML/JSON recipe file (str or os.PathLike), got {type(config).__name__}")
    if sampler is None:
        if config is None:
            raise ValueError("sampler is required (or a config file with a sampler key)")
        sampler = load_config_file(config).get("sampler")
        if sampler is None:
            raise ValueError(f"config file {config} has no sampler key; pass sampler=")
    if not isinstance(sampler, str):
        raise TypeError(f"sampler must be a sampler name (str), got {type(sampler).__name__}")
    cfg = resolve_options(sampler, config=config, model=model, **options)
    device = resolve_device(cfg["device"])
    spec = registry.get(cfg["sampler"])
    out_dir = Path(cfg["output"]) if cfg.get("output") else None
    return cfg, spec, device, out_dir


def check_output(out_dir: Path | None, cfg: dict) -> None:
    """The output-folder checks (after every input check): a folder, and unless ``overwrite``
    no run of another configuration in it."""
    if out_dir is None:
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output {out_dir} exists and is not a directory")
    if not cfg["overwrite"]:
        check_existing_run(out_dir, cfg)


def write_outputs(out_dir: Path, arrays: dict, model, spec) -> None:
    """samples.npz, and for image models images/NNNNNN.png + grid.png; for 2-D analytic models
    samples.png (the samples over the model's density)."""
    atomic_save_npz(out_dir / "samples.npz", arrays)
    if "x" in arrays and getattr(model, "is_image", False):
        pixels = arrays.get("images", arrays["x"])  # latent models: the decoded images, x keeps the latents
        save_images(pixels, out_dir, value_range=getattr(model, "value_range", (-1.0, 1.0)))
    mixture = model.extras.get("mixture") if isinstance(getattr(model, "extras", None), dict) else None
    if "x" in arrays and arrays["x"].ndim == 2 and arrays["x"].shape[1] == 2 and hasattr(mixture, "log_prob"):
        try:
            png = scatter_over_density_png(arrays["x"], lambda g: mixture.log_prob(torch.from_numpy(g)).cpu().numpy(),
                                           title=f"{spec.name} on {model.name}: {len(arrays['x'])} samples over the density")
        except ImportError:  # no matplotlib: the picture is a nicety, the samples are written
            png = None
        if png is not None:
            atomic_write_bytes(out_dir / "samples.png", png)
    hook = getattr(spec, "write_extra", None)
    if hook is not None:
        hook(out_dir, arrays, model)


# -- local launch (`gensample run --num-processes N`) -------------------------------------------
_EXIT_USAGE, _EXIT_NONFINITE, _EXIT_ERROR = 2, 3, 1
_CHILD_CODE = "import sys; from gensample.api import _child_main; sys.exit(_child_main(sys.argv[1], sys.argv[2]))"


def launch_local(num_processes: int, sampler=None, model=None, config=None, **options):
    """Run :func:`run` in ``num_processes`` local processes; return the merged RunResult.

    The options are checked here first (a user error stops before any process starts, with the
    same ValueError a one-process run raises). Each child gets the launcher environment torchrun
    would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT on a free port) and runs
    ``gensample.api._child_main`` (``python -c``); accelerate's PartialState then joins them (gloo on CPU,
    NCCL on CUDA: one GPU per process, so N must not exceed the visible GPUs for --device cuda).
    If any child fails the others are stopped and the first child's error is re-raised here:
    ValueError (exit 2 in the CLI), FloatingPointError (NaN/Inf stop, exit 1) or ChildProcessError
    (a crashed or killed process, exit 1).
    """
    import subprocess
    import tempfile

    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"--num-processes must be an integer >= 1, got {num_processes!r}")
    if model is not None and not isinstance(model, str):
        from .models.loading import short_repr

        raise ValueError(f"--num-processes {num_processes} needs a model spec string (folder, hub id, zoo name): an "
                         f"in-memory model object ({short_repr(model)}) lives in this process only and cannot be "
                         f"shared with new processes; save it (pipe.save_pretrained(DIR)) and pass model=DIR, or run "
                         f"with one process")
    if parallel.env_world_size() > 1:
        raise ValueError("--num-processes cannot be used inside a multi-process launch (accelerate launch / torchrun "
                         "already started the processes); drop --num-processes")
    cfg, spec, device, out_dir = plan_run(sampler, model, config, dict(options))
    if out_dir is None:
        raise ValueError("a multi-process run needs --output DIR (the processes write shards there)")
    prepare_model(cfg, device, cast=False)  # user errors about the model, before any process starts
    check_output(out_dir, cfg)
    if device.type == "cuda" and torch.cuda.device_count() < num_processes:
        raise ValueError(f"--num-processes {num_processes} with --device {cfg['device']} needs {num_processes} GPUs; "
                         f"{torch.cuda.device_count()} visible")
    request = {"sampler": sampler, "model": model, "config": config, "options": options}
    with tempfile.TemporaryDirectory(prefix="gensample-launch-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "request.json").write_text(json.dumps(request, default=str))
        port = parallel.free_port()
        procs = []
        for rank in range(num_processes):
            env = dict(os.environ)
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_processes),
                       LOCAL_WORLD_SIZE=str(num_processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            if not env.get("OMP_NUM_THREADS", "").strip():  # unset or empty ("OMP_NUM_THREADS=" breaks the children)
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))
            cmd = [sys.executable, "-c", _CHILD_CODE, str(tmp_path), str(rank)]
            procs.append(subprocess.Popen(cmd, env=env))
        failed: list[int] = []
        try:
            while any(p.poll() is None for p in procs):
                failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
                if failed:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        failed = failed or [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            _raise_child_error(tmp_path, failed, procs)
        record = json.loads((tmp_path / "record.json").read_text())
    arrays = load_shards(out_dir, cfg["num_samples"])
    return RunResult(samples=arrays, record=record)


def _raise_child_error(tmp, failed: list[int], procs) -> None:
    """Re-raise the cause: a user or NaN error if any process reported one, else the first
    process that died (its peers' "connection closed" errors are consequences, not causes)."""

    errors = {}
    for rank in range(len(procs)):
        f = tmp / f"error-{rank}.json"
        if f.exists():
            errors[rank] = json.loads(f.read_text())
    for kind, exc in (("ValueError", ValueError), ("OutputError", OutputError), ("FloatingPointError", FloatingPointError)):
        for rank in [*failed, *sorted(errors)]:
            if rank in errors and errors[rank]["type"] == kind:
                raise exc(errors[rank]["message"])
    hard = [r for r in failed if r not in errors]  # killed or crashed without a Python error: the cause
    rank = hard[0] if hard else failed[0]
    rc = procs[rank].returncode
    if rank in errors:
        detail = errors[rank]["traceback"].rstrip()
    elif rc is not None and rc < 0:
        detail = f"killed by signal {-rc}"
    else:
        detail = f"exit code {rc}"
    raise ChildProcessError(f"process {rank} of {len(procs)} failed ({detail}); the other processes were stopped. "
                            f"Run the same command again to finish the missing samples.")


def _child_main(tmp: str, rank: str) -> int:
    """Entry point of one launched process (``python -c _CHILD_CODE TMPDIR RANK``)."""
    import traceback

    tmp_path = Path(tmp)
    request = json.loads((tmp_path / "request.json").read_text())
    try:
        result = run(request["sampler"], request["model"], config=request["config"], **request["options"])
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, which re-raises it cleanly
        kind = "ValueError" if isinstance(err, (ValueError, TypeError, FileNotFoundError)) else type(err).__name__
        atomic_write_json(tmp_path / f"error-{rank}.json",
                              {"type": kind, "message": str(err), "traceback": traceback.format_exc()})
        return {"ValueError": _EXIT_USAGE, "FloatingPointError": _EXIT_NONFINITE}.get(kind, _EXIT_ERROR)
    if int(rank) == 0:
        atomic_write_json(tmp_path / "record.json", result.record)
    return 0
