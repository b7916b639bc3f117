"""The brightness-flaw table (docs/oms.md "Results") on the shipped digits-flawed family.

    python benchmarks/bench_oms.py [--n 1500] [--steps 50] [--seed 0] [--out docs/oms]
    # or in parallel: --rows 0,1 & --rows 2,3 & ... then a plain invocation writes the report

Rows: data / base from forward-noised real x_T / plain DDIM from pure noise (leading, trailing) /
OMS (leading, trailing) / zero-terminal-SNR rescale + v-pred (trailing) / offset noise delta = 0.1
(sampled from N(0, I), and from the offset law eps + 0.1 n). Columns: fraction of images with
|mean| > 0.3, std of per-image means, per-class means (rows that know the class), Wasserstein-1
to the data's per-image-mean distribution. Writes brightness.json and brightness.png to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gensample import api
from gensample.models.loading import load_model
from gensample.models.oms_training import LEVELS, brightness_digits
from gensample.samplers.oms import base_scheduler, first_alpha_bar, run_base
from gensample.samplers.registry import RunContext, sample_seed


def brightness_stats(means: np.ndarray, ref: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """frac |mean| > 0.3, std of means, per-class means, W1 to the reference means."""
    from scipy.stats import wasserstein_distance

    out = {"frac_abs_gt_0.3": float((np.abs(means) > 0.3).mean()), "std_of_means": float(means.std()),
           "mean": float(means.mean()), "w1_to_data": float(wasserstein_distance(means, ref)), "n": int(means.size)}
    if labels is not None:
        out["per_class_means"] = [float(means[labels == k].mean()) for k in range(len(LEVELS))]
    return out


def sample_means(sampler: str, model: str, n: int, steps: int, seed: int, **opts):
    res = api.run(sampler=sampler, model=model, num_samples=n, steps=steps, seed=seed, progress=False,
                  device="cpu", batch_size=500, **opts)
    x = res.samples["x"]
    return x.mean(axis=(1, 2, 3)), res.samples.get("oms_class")


def forward_noised_means(n: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Base DDIM started from x_T = sqrt(a) x0 + sqrt(1-a) eps at its first timestep (real x0)."""
    model = load_model("digits-flawed")
    gen = torch.Generator().manual_seed(seed + 1)
    x0, labels = brightness_digits(n, gen)
    ctx = RunContext(sampler="ddim")
    opts = {"guidance_scale": 1.0, "eta": 0.0}
    sched, direct = base_scheduler(model, "ddim", steps, opts, "cpu")
    a = first_alpha_bar(sched)
    x_T = a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=gen)
    seeds = [sample_seed(seed, i) for i in range(n)]
    with torch.no_grad():
        x = run_base(sched, direct, x_T, model.cond_for(None, n, "cpu"), opts, ctx.generators(seeds), ctx, model.denoiser())
    return x.mean(dim=(1, 2, 3)).numpy(), labels.numpy()


def _same_run(f: Path, n: int, steps: int, seed: int) -> bool:
    with np.load(f) as z:
        return "run" in z.files and z["run"].tolist() == [n, steps, seed]


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows if k != "data"]
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(3.2 * ((len(names) + 1) // 2), 5.6), sharex=True)
    bins = np.linspace(-1, 1, 41)
    for ax, name in zip(axes.ravel(), names):
        ax.hist(rows["data"], bins=bins, density=True, alpha=0.4, color="gray", label="data")
        ax.hist(rows[name], bins=bins, density=True, histtype="step", lw=1.6, color="C3", label=name)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle("per-image mean brightness: data (grey) vs sampler (red)", fontsize=9)
    fig.supxlabel("per-image mean", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("docs/oms"))
    p.add_argument("--rows", default=None, help="comma-separated row indices to compute (default: all)")
    p.add_argument("--report", action="store_true", help="with --rows: also write the table from saved rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, steps, seed = args.n, args.steps, args.seed

    x0, lab = brightness_digits(n, torch.Generator().manual_seed(seed))
    data = x0.mean(dim=(1, 2, 3)).numpy()
    lab = lab.numpy()
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    jobs = {
        "base, x_T forward-noised real": lambda: forward_noised_means(n, steps, seed),
        "plain DDIM, pure noise (leading)": lambda: sample_means("ddim", "digits-flawed", n, steps, seed),
        "plain DDIM, pure noise (trailing)": lambda: sample_means("oms", "digits-flawed", n, steps, seed, skip_oms=True,
                                                                  oms_spacing="trailing"),
        "OMS (leading)": lambda: sample_means("oms", "digits-flawed", n, steps, seed, skip_compare=True),
        "OMS (trailing)": lambda: sample_means("oms", "digits-flawed", n, steps, seed, skip_compare=True,
                                               oms_spacing="trailing"),
        "zero-SNR rescale + v-pred (trailing)": lambda: sample_means("ddim", "digits-flawed-zsnr", n, steps, seed,
                                                                      rescale_zero_snr=True),
        "offset noise 0.1, N(0,I) start": lambda: sample_means("ddim", "digits-flawed-offset", n, steps, seed),
        "offset noise 0.1, offset start": lambda: sample_means("ddim", "digits-flawed-offset", n, steps, seed,
                                                               offset_noise=0.1),
    }
    names = list(jobs)
    todo = names if args.rows is None else [names[int(i)] for i in args.rows.split(",")]
    t_start = time.time()
    for i, name in enumerate(names):  # each row is saved, so rows can run in separate processes
        f = rows_dir / f"row{i}.npz"
        if name not in todo or (args.rows is None and f.exists() and _same_run(f, n, steps, seed)):
            continue  # saved by an earlier (possibly parallel) invocation with the same settings
        m, labels = jobs[name]()
        np.savez(f, means=m, labels=np.asarray([] if labels is None else labels), run=np.asarray([n, steps, seed]))
        print(f"{name}: done ({time.time() - t_start:.0f} s)", file=sys.stderr)
    if args.rows is not None and not args.report:
        return 0
    means, stats = {"data": data}, {"data": brightness_stats(data, data, lab)}
    for i, name in enumerate(names):
        f = rows_dir / f"row{i}.npz"
        if not f.exists():
            print(f"missing row {i} ({name}); run with --rows {i}", file=sys.stderr)
            continue
        z = np.load(f)
        if not _same_run(f, n, steps, seed):
            print(f"row {i} ({name}) was computed with other --n/--steps/--seed; recompute it", file=sys.stderr)
            continue
        means[name] = z["means"]
        stats[name] = brightness_stats(z["means"], data, z["labels"] if z["labels"].size else None)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/bench_oms.py " + " ".join(argv or sys.argv[1:]), "n": n, "steps": steps,
              "seed": seed, "rows": stats}
    (args.out / "brightness.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(means, args.out / "brightness.png")
    print("| setting | frac abs(mean)>0.3 | std of means | per-class means | W1 to data |")
    print("|---|---|---|---|---|")
    for name, s in stats.items():
        pcm = "/".join(f"{v:+.3f}" for v in s["per_class_means"]) if "per_class_means" in s else "-"
        print(f"| {name} | {s['frac_abs_gt_0.3']:.3f} | {s['std_of_means']:.3f} | {pcm} | {s['w1_to_data']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
