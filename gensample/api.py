"""Python API mirroring the CLI: ``gensample.run(sampler=..., model=..., **options)``.

The run is organised around *sample indices*: sample i is drawn from a generator seeded with
``sample_seed(seed, i)``, so the set of samples does not depend on batch size, shards, processes
or resumption. Output (when ``output`` is given) is written shard by shard, atomically
(temp file + rename), and a rerun of the same command finishes only the missing indices.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .samplers import registry
from .samplers.registry import RunContext, sample_seed

COMMON_KEYS = (
    "sampler", "model", "steps", "num_samples", "batch_size", "class_label", "guidance_scale",
    "seed", "device", "dtype", "output", "overwrite", "progress", "compile",
)
# keys that may differ between an interrupted run and its resumption without changing samples
NON_SEMANTIC = ("output", "overwrite", "progress", "batch_size", "device", "num_processes", "compile")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    samples: dict  # name -> np.ndarray; "x" (n, *event) float32 or "tokens" (n, L) int64
    record: dict  # what run.json holds
    is_main: bool = True  # False on the non-main processes of a multi-process launch

    @property
    def x(self) -> np.ndarray:
        return self.samples.get("x", self.samples.get("tokens"))


def load_config_file(path: str | os.PathLike) -> dict:
    """YAML/JSON recipe -> dict of option defaults (dash or underscore keys)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read config file {path}: {err}") from err
    try:
        data = yaml.safe_load(text) if p.suffix != ".json" else json.loads(text)
    except Exception as err:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"config file {path} is not valid YAML/JSON: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    if isinstance(data.get("run"), dict):  # allow a `run:` table (click default_map style)
        data = data["run"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_device(device: str | None) -> torch.device:
    device = device or "auto"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but CUDA is not available on this machine; use --device cpu or auto")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("--device mps requested but MPS is not available")
        return torch.device("mps")
    raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def resolve_options(sampler: str, config: str | None = None, **options) -> dict:
    """Merge recipe file < explicit options; validate everything; fill defaults."""
    spec = registry.get(sampler)
    merged: dict[str, Any] = {}
    if config is not None:
        merged.update(load_config_file(config))
        # an explicit sampler wins over the recipe's `sampler:` key (run() reads the key when none is given)
    merged.update({k: v for k, v in options.items() if v is not None})
    merged["sampler"] = sampler
    allowed_specific = {o.key: o for o in spec.options}
    known_elsewhere = registry.all_options()
    unknown = [k for k in merged if k not in COMMON_KEYS and k not in allowed_specific and k != "num_processes"]
    for k in unknown:
        if k in known_elsewhere:
            raise ValueError(f"option {known_elsewhere[k].flag} does not apply to sampler {sampler!r}; "
                             f"its options: {sorted(o.flag for o in spec.options) or 'none'}")
        raise ValueError(f"unknown option {k!r}; allowed: {sorted(set(COMMON_KEYS) | set(allowed_specific))}")
    out: dict[str, Any] = {"sampler": sampler}
    out["model"] = merged.get("model") or spec.default_model
    steps = merged.get("steps")
    if steps is None:
        steps = spec.default_steps(merged) if callable(spec.default_steps) else spec.default_steps
    out["steps"] = _int("steps", steps, 1) if steps is not None else None
    out["num_samples"] = _int("num_samples", merged.get("num_samples", 16), 1)
    out["batch_size"] = _int("batch_size", merged.get("batch_size", 256), 1)
    cl = merged.get("class_label")
    out["class_label"] = None if cl is None else _int("class_label", cl, 0)
    gs = merged.get("guidance_scale", 1.0)
    out["guidance_scale"] = _float("guidance_scale", gs)
    out["seed"] = _int("seed", merged.get("seed", 0), 0)
    out["device"] = str(merged.get("device", "auto"))
    dt = str(merged.get("dtype", "fp32"))
    if dt not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dt!r}")
    out["dtype"] = dt
    out["output"] = merged.get("output")
    out["overwrite"] = bool(merged.get("overwrite", False))
    out["progress"] = merged.get("progress", True)
    out["compile"] = _bool("compile", merged.get("compile", False))
    for key, opt in allowed_specific.items():
        value = merged.get(key, opt.default)
        out[key] = opt.validate(value)
    if spec.group_size is not None:
        g = spec.group_size(out)
        if out["num_samples"] % g:
            raise ValueError(f"--num-samples ({out['num_samples']}) must be a multiple of the group size {g} for sampler {sampler!r}")
        out["batch_size"] = max(g, out["batch_size"] // g * g)
    return out


def _int(name, value, lo):
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (isinstance(value, (float, str)) and _intlike(value)):
        raise ValueError(f"{flag} must be an integer, got {value!r}")
    value = int(float(value)) if isinstance(value, (float, str)) else int(value)
    if value < lo:
        raise ValueError(f"{flag} must be >= {lo}, got {value}")
    return value


def _intlike(v) -> bool:
    try:
        return float(v).is_integer()
    except (TypeError, ValueError):
        return False


def _bool(name, value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"--{name.replace('_', '-')} must be true or false, got {value!r}")


def _float(name, value):
    flag = "--" + name.replace("_", "-")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be a number, got {value!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{flag} must be finite, got {value}")
    return value


def semantic_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in NON_SEMANTIC}


def versions() -> dict:
    import diffusers

    from . import __version__

    return {"gensample": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


# -- atomic file helpers ---------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            # no fsync: rename is atomic against a killed process (our threat model); fsync on
            # every PNG made large runs I/O bound.
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def atomic_save_npz(path: Path, arrays: dict) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


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
    """Refuse to resume into ``out_dir`` unless its run.json holds the same semantic config."""
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
    new_cfg = json.loads(json.dumps(semantic_config(cfg), default=_json_default))
    if old_cfg != new_cfg:
        diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        details = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in diff)
        raise ValueError(f"{out_dir} holds a run with a different configuration ({details}); "
                         f"pass --overwrite to start fresh or choose another --output")


def clear_run(out_dir: Path) -> None:
    """--overwrite: remove a previous run's files (only those gensample writes)."""
    import shutil

    for sub in ("shards", "images"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    for f in ("run.json", "samples.npz", "grid.png"):
        (out_dir / f).unlink(missing_ok=True)


def _batches(indices: list[int], batch_size: int) -> Iterable[list[int]]:
    for i in range(0, len(indices), batch_size):
        yield indices[i : i + batch_size]


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


def generate(cfg: dict, model, indices: list[int], out_dir: Path | None, ctx: RunContext, bar=None):
    """Draw the given sample indices in batches; write one shard per batch if out_dir is set.
    Returns (arrays or None, stats)."""
    spec = registry.get(cfg["sampler"])
    stats: dict = {}
    collected: dict[str, list] = {}
    bs = cfg["batch_size"]
    for batch in _batches(indices, bs):
        seeds = [sample_seed(cfg["seed"], i) for i in batch]
        with torch.no_grad():
            res = spec.fn(model, cfg, seeds, ctx)
        arrays = _batch_arrays(res, spec)
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


def prepare_model(cfg: dict, device: torch.device, cast: bool = True):
    from .models.loading import load_model

    spec = registry.get(cfg["sampler"])
    model = load_model(cfg["model"])
    if model.kind not in spec.model_kinds:
        raise ValueError(f"sampler {spec.name!r} needs a model of kind {list(spec.model_kinds)}; "
                         f"{cfg['model']!r} is {model.kind!r}")
    if model.kind == "diffusion" and cfg.get("steps") is not None and cfg["steps"] > model.num_train_timesteps:
        raise ValueError(f"--steps must be <= the training schedule's {model.num_train_timesteps} timesteps, got {cfg['steps']}")
    if cfg.get("class_label") is not None and not model.num_classes:
        raise ValueError(f"model {cfg['model']!r} is unconditional; --class-label is not allowed")
    if cfg.get("class_label") is not None and cfg["class_label"] >= model.num_classes:
        raise ValueError(f"--class-label must be in [0, {model.num_classes - 1}] for model {cfg['model']!r}, got {cfg['class_label']}")
    if cfg.get("guidance_scale", 1.0) != 1.0 and model.kind == "diffusion" and (not model.num_classes or model.null_class is None) and not model.extras.get("text_conditional"):
        raise ValueError(f"--guidance-scale needs a class-conditional model with a null class; {cfg['model']!r} is unconditional")
    if spec.validate is not None:
        spec.validate(cfg, model)
    dtype = DTYPES[cfg.get("dtype", "fp32")]
    if dtype != torch.float32 and device.type == "cpu":
        raise ValueError(f"--dtype {cfg['dtype']} needs --device cuda; CPU runs in fp32")
    if not cast:  # validation only (the parent of a multi-process launch)
        return model, dtype
    from .parallel import cast_module

    # network weights in `dtype`; float64 schedule/probability tensors stay float64
    for part in [model.unet, *model.extras.values()]:
        if isinstance(part, torch.nn.Module):
            cast_module(part, device, None if dtype == torch.float32 else dtype)
    if cfg.get("compile") and isinstance(model.unet, torch.nn.Module):
        model.unet = torch.compile(model.unet)
    return model, dtype


def _progress_units(spec, cfg, n_batches: int) -> int:
    per = spec.progress_total(cfg) if spec.progress_total else (cfg.get("steps") or 1)
    return per * n_batches


def run(sampler: str = None, model: str | None = None, *, config: str | None = None, **options) -> RunResult:
    """Draw samples; write them (if ``output``) and return them with the run record.

    Every CLI option is a keyword: steps, num_samples, batch_size, class_label, guidance_scale,
    seed, device, dtype, output, overwrite, progress, compile, num_processes, plus the sampler's
    own options (``gensample list`` / ``gensample run --help``).

    Under a multi-process launch (``accelerate launch``, torchrun, or ``num_processes=N``) each
    process draws a contiguous chunk of sample indices (whole particle groups) into
    ``output/shards``; the main process merges them after a barrier and writes samples.npz,
    images and run.json (on other processes the returned ``samples`` is empty).
    """
    from . import parallel

    num_processes = options.pop("num_processes", None)
    if num_processes is not None and _int("num_processes", num_processes, 1) > 1:
        return parallel.launch_local(_int("num_processes", num_processes, 1), sampler=sampler, model=model,
                                     config=config, **options)
    cfg, spec, device, out_dir = plan_run(sampler, model, config, options)
    sampler = cfg["sampler"]
    info = parallel.process_info(device)
    device = info.device
    if info.world_size > 1 and out_dir is None:
        raise ValueError("a multi-process run needs --output DIR (the processes write shards there)")
    model_obj, dtype = prepare_model(cfg, device)
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
    prev: dict = {}
    if record_path is not None and info.is_main:
        if cfg["overwrite"]:
            clear_run(out_dir)
        remove_stale_temp_files(out_dir)
        prev = json.loads(record_path.read_text()) if record_path.exists() else {}
        record["wall_time_s"] = prev.get("wall_time_s", 0.0)
        atomic_write_json(record_path, record)
    info.wait()  # run.json exists before any shard

    group = spec.group_size(cfg) if spec.group_size is not None else 1
    mine = parallel.split_indices(range(cfg["num_samples"]), info.world_size, info.index, group)
    done = completed_indices(out_dir) if out_dir is not None else set()
    todo = [i for i in mine if i not in done]

    bar = None
    n_batches = (len(todo) + cfg["batch_size"] - 1) // cfg["batch_size"]
    if cfg.get("progress", True) and todo and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=_progress_units(spec, cfg, n_batches), desc=f"{sampler}", unit="step",
                   file=sys.stderr, disable=None, leave=False)
    ctx = RunContext(sampler=sampler, device=device, dtype=dtype, progress=(bar.update if bar else None))
    t0 = time.perf_counter()
    try:
        arrays, stats = generate(cfg, model_obj, todo, out_dir, ctx, bar)
    except BaseException as err:
        if record_path is not None and info.is_main:
            record.update(status="failed", error=f"{err.__class__.__name__}: {err}")
            atomic_write_json(record_path, record)
        raise
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
    """Resolve and check everything a run needs before it touches the output directory.

    Returns (cfg, spec, device, out_dir). Raises ValueError for every user error, including an
    existing run in ``output`` with a different configuration (unless ``overwrite``).
    """
    if sampler is None:
        if config is None:
            raise ValueError("sampler is required (or a config file with a sampler key)")
        sampler = load_config_file(config).get("sampler")
        if sampler is None:
            raise ValueError(f"config file {config} has no sampler key; pass sampler=")
    cfg = resolve_options(sampler, config=config, model=model, **options)
    device = resolve_device(cfg["device"])
    spec = registry.get(cfg["sampler"])
    out_dir = Path(cfg["output"]) if cfg.get("output") else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--output {out_dir} exists and is not a directory")
        if not cfg["overwrite"]:
            check_existing_run(out_dir, cfg)
    return cfg, spec, device, out_dir


def write_outputs(out_dir: Path, arrays: dict, model, spec) -> None:
    """samples.npz, and for image models images/NNNNNN.png + grid.png."""
    atomic_save_npz(out_dir / "samples.npz", arrays)
    if "x" in arrays and getattr(model, "is_image", False):
        from .eval.images import save_images

        save_images(arrays["x"], out_dir, value_range=getattr(model, "value_range", (-1.0, 1.0)))
    hook = getattr(spec, "write_extra", None)
    if hook is not None:
        hook(out_dir, arrays, model)
