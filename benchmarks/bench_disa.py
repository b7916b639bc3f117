"""DiSA on mar-digits (issue 7, docs/disa.md): quality vs head budget, one run.

Conditions (K = 8 AR iterations, MAR cosine unmasking, DDPM head):
  full       constant 50 head steps (the `mar` sampler)          400 calls / 800 rows per image
  disa       linear 50 -> 5 (the `disa` sampler, the paper's rule) 217 / 344
  cosine     cosine 50 -> 5                                        217 / 330
  two-stage  two-stage 50 -> 5                                     220 / 305
  const5     constant 5                                             40 / 80
  const27    constant 27 (about DiSA's sequential call budget)     216 / 432
For each condition and seed: digits-FID (gensample.eval.digits, features of the shipped digits
CNN vs the held-out split), the spec's PCA-20 Frechet distance (PCA fitted on real training
images, vs the held-out split), class accuracy of the shipped classifier against the sampled
labels, head calls/rows, head seconds and total seconds. Ratios are against `full` for the
same seed. With --evidence, per-iteration head sample variance and path straightness (sec. 6).

    python benchmarks/bench_disa.py --n 500 --seeds 0 1 2 --out benchmarks/results/disa.json
    python benchmarks/bench_disa.py --conditions --evidence --out benchmarks/results/disa_evidence.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULT_FIELDS = {  # a literal: tests/test_results_provenance.py reads it statically
    "disa.json": ["args", "rows", "summary", "fid_floor"],
    "disa_evidence.json": ["args", "rows", "summary", "fid_floor", "evidence"],
}

CONDITIONS = {
    "full": dict(sampler="mar", head_steps_max=50),
    "disa": dict(sampler="disa", schedule="linear", head_steps_max=50, head_steps_min=5),
    "cosine": dict(sampler="disa", schedule="cosine", head_steps_max=50, head_steps_min=5),
    "two-stage": dict(sampler="disa", schedule="two-stage", head_steps_max=50, head_steps_min=5),
    "const5": dict(sampler="mar", head_steps_max=5),
    "const27": dict(sampler="mar", head_steps_max=27),
}


def pca_fd(x: np.ndarray, x_ref: np.ndarray, x_fit: np.ndarray, dim: int = 20) -> float:
    """Frechet distance of Gaussians fitted in a PCA-`dim` space of real training images (docs/disa.md)."""
    from scipy import linalg
    from sklearn.decomposition import PCA

    pca = PCA(dim, random_state=0).fit(x_fit.reshape(len(x_fit), -1))
    a, b = (pca.transform(v.reshape(len(v), -1)).astype(np.float64) for v in (x, x_ref))
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def run_condition(name: str, n: int, seed: int, ar_steps: int, guidance: float, clip: int | None = None) -> dict:
    from gensample import api
    from gensample.eval.digits import class_accuracy, digits_fid
    from gensample.eval.digits_data import real_digits

    opts = dict(CONDITIONS[name])
    sampler = opts.pop("sampler")
    # One batch of n per condition, so that sequential head calls and timings compare across
    # conditions (the API otherwise sizes batches by elapsed time; the samples are the same).
    api.FIRST_BATCH, api.SHARD_SECONDS = n, float("inf")
    t0 = time.perf_counter()
    res = api.run(sampler, "mar-digits", num_samples=n, batch_size=n, seed=seed, device="cpu", progress=False,
                  ar_steps=ar_steps, guidance_scale=guidance, timestep_clip=clip, **opts)
    total = time.perf_counter() - t0
    x, labels = res.samples["x"], res.samples["class_labels"]
    st = res.record["stats"]
    x_train, x_test = real_digits("train")[0], real_digits("test")[0]
    return {
        "condition": name, "seed": seed, "n": n,
        "digits_fid": digits_fid(x), "pca20_fd": pca_fd(x, x_test, x_train),
        "class_acc": class_accuracy(x, labels),
        "head_calls": st["head_calls"], "head_rows": st["head_rows"], "batches": len(st["head_steps"]),
        "head_time_s": st["head_time_s"], "backbone_time_s": st["backbone_time_s"], "total_time_s": total,
    }


def evidence(n: int, seed: int, ar_steps: int, draws: int = 32) -> dict:
    """Per-iteration head variance (fixed z, `draws` samples) and path straightness (docs/disa.md)."""
    from scipy.stats import spearmanr

    from gensample.models.loading import load_model
    from gensample.samplers.disa import HeadDDPM, evidence_metrics

    model = load_model("mar-digits")
    parts = model.extras
    gens = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(n)]
    with torch.no_grad():
        ev = evidence_metrics(parts["backbone"], parts["head"], HeadDDPM(model.alphas_cumprod), gens,
                              torch.arange(n) % 10, num_tokens=parts["num_tokens"], token_dim=parts["token_dim"],
                              ar_steps=ar_steps, draws=draws, null_class=model.null_class, seed=seed)
    ks = list(range(ar_steps))
    ev["k"] = ks
    ev["spearman_straightness"] = float(spearmanr(ks, ev["straightness"])[0])
    ev["spearman_variance"] = float(spearmanr(ks, ev["variance"])[0])
    return ev


def summarise(rows: list[dict]) -> dict:
    out = {}
    by_seed_full = {r["seed"]: r for r in rows if r["condition"] == "full"}
    for name in CONDITIONS:
        rs = [r for r in rows if r["condition"] == name]
        if not rs:
            continue
        agg = {}
        for key in ("digits_fid", "pca20_fd", "class_acc", "head_calls", "head_rows", "head_time_s", "total_time_s"):
            v = np.array([r[key] for r in rs], dtype=float)
            agg[key] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        if by_seed_full:
            for key, ref in (("nfe_ratio", "head_calls"), ("rows_ratio", "head_rows"),
                             ("head_time_ratio", "head_time_s"), ("total_time_ratio", "total_time_s")):
                v = np.array([by_seed_full[r["seed"]][ref] / r[ref] for r in rs if r["seed"] in by_seed_full])
                agg[key] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        out[name] = agg
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="samples per condition and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ar-steps", type=int, default=8)
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    ap.add_argument("--timestep-clip", type=int, default=None, help="applied to every condition (reference: 950)")
    ap.add_argument("--conditions", nargs="*", default=list(CONDITIONS), choices=list(CONDITIONS),
                    help="conditions to run (none: only --evidence)")
    ap.add_argument("--evidence", action="store_true", help="also the sec. 6 variance / straightness trends")
    ap.add_argument("--evidence-images", type=int, default=20, help="images per seed for --evidence")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gensample.eval.digits import fid_floor

    rows = []
    for seed in args.seeds:
        for name in args.conditions:
            r = run_condition(name, args.n, seed, args.ar_steps, args.guidance_scale, args.timestep_clip)
            rows.append(r)
            print(f"seed {seed} {name:<9} dFID {r['digits_fid']:7.3f}  PCA-FD {r['pca20_fd']:7.3f}  "
                  f"acc {r['class_acc']:.3f}  calls {r['head_calls']:5d}  rows {r['head_rows']:7d}  "
                  f"head {r['head_time_s']:6.2f}s  total {r['total_time_s']:6.2f}s", flush=True)
    summary = summarise(rows)
    print(f"\nmar-digits, K={args.ar_steps}, w={args.guidance_scale}, clip={args.timestep_clip}, n={args.n} per seed, seeds {args.seeds}; "
          f"digits-FID floor (real train vs test) {fid_floor():.3f}; mean +- sd over seeds")
    print(f"{'condition':<10} {'digits-FID':>15} {'PCA20-FD':>15} {'class acc':>15} {'calls':>9} "
          f"{'NFE ratio':>9} {'rows ratio':>10} {'head-time x':>11} {'total-time x':>12}")
    for name, a in summary.items():
        def f(key, fmt):
            m, s = a[key]
            return f"{m:{fmt}}+-{s:{fmt}}"
        print(f"{name:<10} {f('digits_fid', '.3f'):>15} {f('pca20_fd', '.3f'):>15} {f('class_acc', '.3f'):>15} "
              f"{a['head_calls'][0]:9.0f} {a.get('nfe_ratio', (0,))[0]:9.2f} {a.get('rows_ratio', (0,))[0]:10.2f} "
              f"{a.get('head_time_ratio', (0,))[0]:11.2f} {a.get('total_time_ratio', (0,))[0]:12.2f}")
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows, "summary": summary, "fid_floor": fid_floor()}
    if args.evidence:
        ev = [evidence(args.evidence_images, s, args.ar_steps) for s in args.seeds]
        result["evidence"] = ev
        for e in ev:
            print("straightness by k", np.round(e["straightness"], 3).tolist(), f"rho {e['spearman_straightness']:.2f}")
            print("variance by k    ", np.round(e["variance"], 4).tolist(), f"rho {e['spearman_variance']:.2f}")
    if args.out is not None:  # atomic, with the command, commit, model checksums and machine
        from _provenance import write_result

        write_result(args.out, result, models=["mar-digits"])


if __name__ == "__main__":
    main()
