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
    "seed", "device", "dtype", "output", "overwrite", "progress",
)
# keys that may differ between an interrupted run and its resumption without changing samples
NON_SEMANTIC = ("output", "overwrite", "progress", "batch_size", "device", "num_processes")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    samples: dict  # name -> np.ndarray; "x" (n, *event) float32 or "tokens" (n, L) int64
    record: dict  # what run.json holds

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
        if "sampler" in merged and merged["sampler"] != sampler and options.get("sampler") is None:
            sampler = merged["sampler"]
            spec = registry.get(sampler)
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
            f.flush()
            os.fsync(f.fileno())
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
        with np.load(f) as z:
            idx_all.append(z["indices"])
            for k in z.files:
                if k != "indices":
                    parts.setdefault(k, []).append(z[k])
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


def _batches(indices: list[int], batch_size: int) -> Iterable[list[int]]:
    for i in range(0, len(indices), batch_size):
        yield indices[i : i + batch_size]


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
        _merge_stats(stats, res.stats)
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


def prepare_model(cfg: dict, device: torch.device):
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
    model.to(device=device, dtype=None if dtype == torch.float32 else dtype)
    return model, dtype


def _progress_units(spec, cfg, n_batches: int) -> int:
    per = spec.progress_total(cfg) if spec.progress_total else (cfg.get("steps") or 1)
    return per * n_batches


def run(sampler: str = None, model: str | None = None, *, config: str | None = None, **options) -> RunResult:
    """Draw samples; write them (if ``output``) and return them with the run record.

    Every CLI option is a keyword: steps, num_samples, batch_size, class_label, guidance_scale,
    seed, device, dtype, output, overwrite, progress, plus the sampler's own options
    (``gensample list`` / ``gensample run --help``).
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

    todo = list(range(cfg["num_samples"]))
    record_path = None
    if out_dir is not None:
        record_path = out_dir / "run.json"
        if out_dir.exists() and cfg["overwrite"]:
            import shutil

            for sub in ("shards", "images"):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
            for f in ("run.json", "samples.npz", "grid.png"):
                (out_dir / f).unlink(missing_ok=True)
        if record_path.exists():
            try:
                old = json.loads(record_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old is not None and old.get("semantic_config") != json.loads(json.dumps(semantic_config(cfg), default=_json_default)):
                raise ValueError(f"{out_dir} holds a run with a different configuration; "
                                 f"pass --overwrite to start fresh or choose another --output")
        done = completed_indices(out_dir)
        todo = [i for i in todo if i not in done]

    model_obj, dtype = prepare_model(cfg, device)
    bar = None
    n_batches = (len(todo) + cfg["batch_size"] - 1) // cfg["batch_size"]
    if cfg.get("progress", True) and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=_progress_units(spec, cfg, n_batches), desc=f"{sampler}", unit="step",
                   file=sys.stderr, disable=None, leave=False)
    ctx = RunContext(sampler=sampler, device=device, dtype=dtype, progress=(bar.update if bar else None))
    record = {
        "sampler": sampler,
        "model": cfg["model"],
        "config": cfg,
        "semantic_config": semantic_config(cfg),
        "versions": versions(),
        "device": str(device),
        "status": "running",
        "num_samples": cfg["num_samples"],
    }
    if record_path is not None:
        prev = json.loads(record_path.read_text()) if record_path.exists() else {}
        record["wall_time_s"] = prev.get("wall_time_s", 0.0)
        atomic_write_json(record_path, record)
    t0 = time.perf_counter()
    try:
        arrays, stats = generate(cfg, model_obj, todo, out_dir, ctx, bar)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    if out_dir is not None:
        arrays = load_shards(out_dir, cfg["num_samples"])
        prev_stats = (json.loads(record_path.read_text()).get("stats") or {}) if record_path.exists() else {}
        merged_stats = dict(prev_stats) if len(todo) < cfg["num_samples"] else {}
        _merge_stats(merged_stats, {k: v for k, v in stats.items()})
        stats = merged_stats
    record["stats"] = stats
    record["nfe"] = stats.get("nfe")
    record["wall_time_s"] = record.get("wall_time_s", 0.0) + wall
    record["wall_time_this_invocation_s"] = wall
    record["samples_drawn_this_invocation"] = len(todo)
    record["status"] = "complete"
    if out_dir is not None:
        write_outputs(out_dir, arrays, model_obj, spec)
        atomic_write_json(record_path, record)
    return RunResult(samples=arrays, record=record)


def write_outputs(out_dir: Path, arrays: dict, model, spec) -> None:
    """samples.npz, and for image models images/NNNNNN.png + grid.png."""
    atomic_save_npz(out_dir / "samples.npz", arrays)
    if "x" in arrays and getattr(model, "is_image", False):
        from .eval.images import save_images

        save_images(arrays["x"], out_dir, value_range=getattr(model, "value_range", (-1.0, 1.0)))
    hook = getattr(spec, "write_extra", None)
    if hook is not None:
        hook(out_dir, arrays, model)
