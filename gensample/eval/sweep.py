"""`gensample eval CONFIG.yaml`: samplers x step counts x seeds on one model -> table + plot.

Config (YAML):

    model: digits-ddpm            # any --model spec
    steps: [5, 10, 20, 50]        # default step counts (an entry may override with its own list)
    seeds: [0]                    # global seeds passed to gensample.run
    num_samples: 1000
    metric: auto                  # auto | digits-fid | oracle | inception
    samplers:                     # names, or mappings with sampler-specific options
      - ddim
      - {sampler: ddim, eta: 1.0, label: ddim-eta1}
      - {sampler: ts-ddim, window: 30, label: ts-ddim-w30, steps: [10, 20]}
    # optional, passed to every run unless an entry overrides: batch_size, device, class_label,
    # guidance_scale, dtype; for metric inception: inception_ref (folder / .npz), inception_weights

Metrics (lower is better):
- digits-fid: Frechet distance in the digits feature network's space to the held-out test split
  (gensample.eval.digits); with a class_label also ``class_accuracy`` (shipped classifier).
- oracle (analytic Gaussian-mixture models): Frechet distance between the Gaussian fitted to the
  samples and the exact mean/covariance of the (class-conditional) mixture, i.e. the distance
  that vanishes for exact samples up to O(1/n) sampling error; plus mean error and relative
  covariance error.
- inception: Inception-v3 FID against ``inception_ref`` (gensample.eval.fid).

Runs whose samples carry non-uniform ``weights`` (FKC ``--final weighted``) are scored with those
weights (weighted moments / accuracy); the row records ``weighted: true``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

METRICS = ("auto", "digits-fid", "oracle", "inception")
TOP_KEYS = ("model", "steps", "seeds", "num_samples", "metric", "samplers", "output", "batch_size", "device",
            "class_label", "guidance_scale", "dtype", "inception_ref", "inception_weights", "inception_dims", "title")
RUN_KEYS = ("batch_size", "device", "class_label", "guidance_scale", "dtype")
ENTRY_RESERVED = ("sampler", "label", "steps", "seeds")
CSV_COLUMNS = ("label", "sampler", "steps", "seed", "nfe", "wall_time_s", "metric", "value", "class_accuracy",
               "mean_error", "cov_rel_error", "num_samples", "weighted", "options")


@dataclass(frozen=True)
class SweepEntry:
    label: str
    sampler: str
    steps: tuple
    seeds: tuple
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SweepConfig:
    model: str
    entries: tuple
    num_samples: int = 1000
    metric: str = "auto"
    run_options: dict = field(default_factory=dict)
    inception_ref: str | None = None
    inception_weights: str | None = None
    inception_dims: int = 2048
    title: str = ""


def _int_list(name: str, value) -> tuple:
    vals = value if isinstance(value, (list, tuple)) else [value]
    if not vals or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"{name} must be an integer or a list of integers, got {value!r}")
    return tuple(vals)


def parse_config(data: dict) -> SweepConfig:
    """Validate a sweep mapping (see the module docstring) into a SweepConfig."""
    if not isinstance(data, dict):
        raise ValueError(f"an eval config must be a mapping, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"unknown eval config keys {unknown}; allowed: {list(TOP_KEYS)}")
    for key in ("model", "samplers"):
        if key not in data:
            raise ValueError(f"eval config needs `{key}:`")
    metric = data.get("metric", "auto")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "inception" and not data.get("inception_ref"):
        raise ValueError("metric: inception needs `inception_ref:` (a folder of images or a mu/sigma .npz)")
    steps = _int_list("steps", data.get("steps", [10]))
    seeds = _int_list("seeds", data.get("seeds", [0]))
    num_samples = data.get("num_samples", 1000)
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    samplers = data["samplers"]
    if not isinstance(samplers, list) or not samplers:
        raise ValueError("samplers must be a non-empty list of names or {sampler: NAME, ...} mappings")
    entries, labels = [], set()
    for item in samplers:
        if isinstance(item, str):
            item = {"sampler": item}
        if not isinstance(item, dict) or "sampler" not in item:
            raise ValueError(f"each samplers entry must be a name or a mapping with `sampler:`, got {item!r}")
        item = {str(k).replace("-", "_"): v for k, v in item.items()}
        label = str(item.get("label", item["sampler"]))
        if label in labels:
            raise ValueError(f"duplicate sampler label {label!r}; give entries distinct `label:` values")
        labels.add(label)
        opts = {k: v for k, v in item.items() if k not in ENTRY_RESERVED}
        entries.append(SweepEntry(label, str(item["sampler"]), _int_list(f"{label}: steps", item.get("steps", steps)),
                                  _int_list(f"{label}: seeds", item.get("seeds", seeds)), opts))
    run_options = {k: data[k] for k in RUN_KEYS if data.get(k) is not None}
    return SweepConfig(model=str(data["model"]), entries=tuple(entries), num_samples=num_samples, metric=metric,
                       run_options=run_options, inception_ref=data.get("inception_ref"),
                       inception_weights=data.get("inception_weights"), inception_dims=int(data.get("inception_dims", 2048)),
                       title=str(data.get("title", "")))


def load_sweep(path: str | Path) -> tuple[SweepConfig, dict]:
    from ..api import load_config_file

    raw = load_config_file(path)
    return parse_config(raw), raw


def resolve_metric(cfg: SweepConfig, model) -> str:
    """auto -> digits-fid for digits models, oracle for analytic mixtures, else an error."""
    if cfg.metric != "auto":
        if cfg.metric == "oracle" and "mixture" not in model.extras:
            raise ValueError(f"metric oracle needs an analytic mixture model; {cfg.model!r} has none")
        return cfg.metric
    if "mixture" in model.extras:
        return "oracle"
    if model.extras.get("dataset") == "digits" or (model.is_image and tuple(model.event_shape) == (1, 8, 8)):
        return "digits-fid"
    raise ValueError(f"no automatic metric for model {cfg.model!r}; set `metric: inception` with `inception_ref:`")


def oracle_metrics(x: np.ndarray, mixture, class_label: int | None, weights=None) -> dict:
    """Gaussian-vs-sample Frechet distance to the exact mixture moments, float64.

    x: (n, *event_shape); weights: optional (n,) sample weights (FKC ``--final weighted``), giving
    the weighted mean and reliability-weights covariance. Returns {"value": FD, "mean_error":
    ||mu_hat - mu||, "cov_rel_error": ||S_hat - S||_F / ||S||_F}.
    """
    from .fid import FeatureStats, effective_weights, frechet_distance

    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)  # (n, D)
    mu = mixture.mean(class_label).reshape(-1).double().cpu().numpy()
    cov = mixture.covariance(class_label).double().cpu().numpy()
    mu_hat, cov_hat = FeatureStats(flat.shape[1]).update(flat, effective_weights(weights)).mean_cov()
    return {"value": frechet_distance(mu_hat, cov_hat, mu, cov),
            "mean_error": float(np.linalg.norm(mu_hat - mu)),
            "cov_rel_error": float(np.linalg.norm(cov_hat - cov) / np.linalg.norm(cov))}


def evaluate_samples(x: np.ndarray, metric: str, model, cfg: SweepConfig, class_label: int | None, weights=None) -> dict:
    """Score samples x (n, ...) by ``metric``; weights (n,) (FKC ``--final weighted``) make every
    metric weighted (weighted feature / sample moments, weighted class accuracy)."""
    from .fid import effective_weights

    if weights is not None and np.asarray(weights).reshape(-1).shape[0] != len(x):
        raise ValueError(f"got {np.asarray(weights).reshape(-1).shape[0]} sample weights for {len(x)} samples")
    weights = effective_weights(weights)
    if metric == "digits-fid":
        from . import digits

        out = {"value": digits.digits_fid(x, weights)}
        if class_label is not None:
            out["class_accuracy"] = digits.class_accuracy(x, class_label, weights)
        return out
    if metric == "oracle":
        return oracle_metrics(x, model.extras["mixture"], class_label, weights)
    if metric == "inception":
        import tempfile

        from .fid import inception_fid

        with tempfile.TemporaryDirectory() as tmp:
            arrays = {"x": x} if weights is None else {"x": x, "weights": weights}
            np.savez(Path(tmp) / "samples.npz", **arrays)
            device = cfg.run_options.get("device", "auto")
            return {"value": inception_fid(Path(tmp) / "samples.npz", cfg.inception_ref, cfg.inception_weights,
                                           device="cpu" if device == "auto" else device, dims=cfg.inception_dims)}
    raise ValueError(f"metric must be one of {METRICS[1:]}, got {metric!r}")


def run_sweep(config: str | Path | dict, output: str | Path, *, progress: bool = True, echo=print) -> list[dict]:
    """Run every (entry, steps, seed); write results.csv, results.md, fid_vs_nfe.png to OUTPUT.

    Each finished row is also kept in OUTPUT/rows/ so an interrupted sweep resumes where it stopped.
    """
    from .. import api
    from ..models.loading import load_model
    from .fid import effective_weights

    cfg = parse_config(config) if isinstance(config, dict) else load_sweep(config)[0]
    out = Path(output)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model)
    metric = resolve_metric(cfg, model)
    class_label = cfg.run_options.get("class_label")
    rows = []
    for entry in cfg.entries:
        for steps in entry.steps:
            for seed in entry.seeds:
                key = f"{_slug(entry.label)}__steps{steps}__seed{seed}.json"
                cached = out / "rows" / key
                if cached.exists():
                    rows.append(json.loads(cached.read_text()))
                    continue
                opts = {**cfg.run_options, **entry.options}
                res = api.run(sampler=entry.sampler, model=cfg.model, steps=steps, seed=seed,
                              num_samples=cfg.num_samples, progress=progress, **opts)
                label_here = opts.get("class_label", class_label)
                weights = res.samples.get("weights") if isinstance(getattr(res, "samples", None), dict) else None
                scores = evaluate_samples(res.x, metric, model, cfg, label_here, weights)
                row = {"label": entry.label, "sampler": entry.sampler, "steps": steps, "seed": seed,
                       "nfe": nfe_per_sample(res.record), "wall_time_s": res.record.get("wall_time_s"),
                       "metric": metric, "num_samples": cfg.num_samples,
                       "options": json.dumps(entry.options, sort_keys=True), "weighted": effective_weights(weights) is not None, **scores}
                api.atomic_write_json(cached, row)
                rows.append(row)
                echo(f"{entry.label:<20} steps {steps:>4} seed {seed}: {metric} {row['value']:.4g}  NFE {row['nfe']}  "
                     f"{row['wall_time_s']:.1f} s")
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown_table(rows, cfg.model, metric, cfg.title))
    plot(rows, out / "fid_vs_nfe.png", cfg.model, metric)
    return rows


def nfe_per_sample(record: dict) -> float | None:
    """Network evaluations per sample trajectory (older run.json files summed ``nfe`` over batches)."""
    nfe = record.get("nfe")
    if nfe is None:
        return None
    if "nfe_total_calls" in record:  # run.json already reports NFE per sample trajectory
        return float(nfe)
    bs = record["config"].get("batch_size") or record["num_samples"]
    return nfe / math.ceil(record["num_samples"] / bs)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (label, steps) cell, in input order."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["label"], r["steps"]), []).append(r)
    out = []
    for (label, steps), rs in groups.items():
        vals = np.array([r["value"] for r in rs], dtype=np.float64)
        acc = [r["class_accuracy"] for r in rs if r.get("class_accuracy") not in (None, "")]
        out.append({"label": label, "sampler": rs[0]["sampler"], "steps": steps, "seeds": len(rs),
                    "nfe": float(np.mean([r["nfe"] for r in rs])) if all(r.get("nfe") is not None for r in rs) else None,
                    "wall_time_s": float(np.mean([r["wall_time_s"] for r in rs])),
                    "mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
                    "class_accuracy": float(np.mean(acc)) if acc else None})
    return out


def markdown_table(rows: list[dict], model: str, metric: str, title: str = "") -> str:
    agg = aggregate(rows)
    has_acc = any(a["class_accuracy"] is not None for a in agg)
    head = ["sampler", "steps", "NFE", f"{metric} (mean ± sd over seeds)", "seeds", "wall s"] + (["class acc"] if has_acc else [])
    lines = [f"# {title or 'Sampler sweep'}: {model}", "", f"Metric: {metric} (lower is better); n = {rows[0]['num_samples'] if rows else 0} samples per run.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in agg:
        sd = "" if math.isnan(a["std"]) else f" ± {a['std']:.3g}"
        nfe = "" if a["nfe"] is None else f"{a['nfe']:.0f}"
        cells = [a["label"], str(a["steps"]), nfe, f"{a['mean']:.4g}{sd}", str(a["seeds"]), f"{a['wall_time_s']:.1f}"]
        if has_acc:
            cells.append("" if a["class_accuracy"] is None else f"{a['class_accuracy']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, model: str, metric: str) -> None:
    """Two panels: metric vs NFE and metric vs wall time, one line per sampler label (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(a["label"] for a in agg):
        pts = sorted((a for a in agg if a["label"] == label), key=lambda a: a["steps"])
        y = [a["mean"] for a in pts]
        err = [0.0 if math.isnan(a["std"]) else a["std"] for a in pts]
        axes[0].errorbar([a["nfe"] if a["nfe"] is not None else a["steps"] for a in pts], y, yerr=err, marker="o", label=label, capsize=2)
        axes[1].errorbar([a["wall_time_s"] for a in pts], y, yerr=err, marker="o", label=label, capsize=2)
    from matplotlib.ticker import NullFormatter

    for ax, xl in zip(axes, ("NFE (network evaluations per sample)", "wall time per run (s)")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xl)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    if any(a["mean"] > 0 for a in agg):
        for ax in axes:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: {metric} vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
