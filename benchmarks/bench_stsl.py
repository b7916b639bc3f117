"""STSL vs DPS vs PSLD benchmarks (specs/stsl.md sec. 6-7; issue 6 "Must show").

Part 1 (oracle): distance of each sampler to the exact Gaussian-mixture posterior on gmm2d and
gmm-digits, for a random-inpainting mask and a dense `matrix:` operator, at equal paper NFE.
Part 2 (trained models): held-out digits, box inpainting and 2x bicubic SR, with digits-ddpm
(pixel, when present in the zoo), digits-ldm (latent) and gmm-digits (pixel, exact mixture prior
fitted to digits; the stand-in pixel model): PSNR / SSIM / classifier accuracy for
DPS, PSLD, STSL at equal paper NFE, and STSL at 1/4 of PSLD's NFE.

    python benchmarks/bench_stsl.py [--part oracle|digits|trace|all] [--n 64] [--json out.json]
Single-threaded; every number comes with its seed set and sample size.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time

import numpy as np
import torch

from gensample.models.posterior import GaussianMixturePosterior, posterior_distance
from gensample.samplers.operators import MatrixOperator, make_operator
from gensample.samplers.stsl import reconstruct


def oracle_part(n: int = 500, nfe: int = 250) -> list[dict]:
    from gensample.zoo.analytic import gmm2d, gmm_digits

    rows = []
    rng = np.random.default_rng(0)
    for model_fn in (gmm2d, gmm_digits):
        model = model_fn()
        mix = model.extras["mixture"]
        shape = mix.event_shape
        d = mix.dim
        mat = np.array([[0.6, 0.8]]) if d == 2 else rng.normal(size=(d // 2, d)) / math.sqrt(d)
        ops = {
            "inpaint-random(0.5)": make_operator("inpaint-random", shape, seed=1, missing=0.5),
            f"matrix({mat.shape[0]}x{d})": MatrixOperator(shape, mat),
        }
        x_true = mix.sample(1, torch.Generator().manual_seed(3))
        for op_name, op in ops.items():
            sigma = 0.1 if d > 2 else 0.3
            y = op.measure(x_true, sigma, [torch.Generator().manual_seed(0)])
            post = GaussianMixturePosterior(mix, op.matrix(), y.reshape(-1), sigma)
            methods = {
                "gold(exact)": None,
                f"stsl N={nfe // 5} K=5": ("stsl", dict(steps=nfe // 5, inner_steps=5)),
                f"stsl-1st N={nfe // 5} K=5 (eta=0)": ("stsl", dict(steps=nfe // 5, inner_steps=5, trace_weight=0.0)),
                f"dps N={nfe}": ("dps", dict(steps=nfe, zeta=1.0)),
                f"psld N={nfe}": ("psld", dict(steps=nfe, gamma=0.0, omega=1.0)),
                f"stsl N={nfe // 20} K=5 (1/4 NFE)": ("stsl", dict(steps=nfe // 20, inner_steps=5)),
            }
            for name, spec in methods.items():
                t0 = time.time()
                if spec is None:
                    x = post.sample(n, torch.Generator().manual_seed(0)).float()
                else:
                    x, _ = reconstruct(model, op, y, spec[0], list(range(n)), **spec[1])
                dist = posterior_distance(x, post).as_dict()
                rows.append({"model": model.name, "task": op_name, "sigma_y": sigma, "method": name, "n": n,
                             "seconds": round(time.time() - t0, 1), **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in dist.items()}})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def digits_part(n: int = 64, psld_steps: int = 200, only: str | None = None, models=None) -> list[dict]:
    from gensample.eval.digits import classify
    from gensample.eval.digits_data import real_digits
    from gensample.eval.restoration import psnr, ssim
    from gensample.models.loading import load_model
    from gensample.zoo import discover

    zoo = discover()
    x_all, labels = real_digits("test")
    x_true = torch.from_numpy(x_all[:n]).double()
    lab = labels[:n]
    rows = []
    for model_name in models or ("digits-ddpm", "digits-ldm", "gmm-digits"):
        if model_name not in zoo:
            print(f"# {model_name} not in the zoo; skipped", flush=True)
            continue
        model = load_model(model_name)
        for task in ("inpaint-box", "sr-bicubic"):
            op = make_operator(task, (1, 8, 8), seed=0, sr_factor=2)
            y = op.measure(x_true, 0.05, [torch.Generator().manual_seed(100 + i) for i in range(n)])
            k = 5
            methods = {
                f"dps N={psld_steps}": ("dps", dict(steps=psld_steps, zeta=1.0)),
                f"psld N={psld_steps}": ("psld", dict(steps=psld_steps, gamma=0.1 if "vae" in model.extras else 0.0, omega=1.0)),
                f"stsl N={psld_steps // k} K={k} (equal NFE)": ("stsl", dict(steps=psld_steps // k, inner_steps=k)),
                f"stsl N={psld_steps // (4 * k)} K={k} (1/4 NFE)": ("stsl", dict(steps=psld_steps // (4 * k), inner_steps=k)),
                f"stsl N={psld_steps // k} K={k} delta=0.01": ("stsl", dict(steps=psld_steps // k, inner_steps=k, probe_scale=0.01)),
                f"stsl N={psld_steps // k} K={k} eta=0 (first order)": ("stsl", dict(steps=psld_steps // k, inner_steps=k, trace_weight=0.0)),
                f"stsl N={psld_steps // (4 * k)} K={k} eta=0 (1/4 NFE)": ("stsl", dict(steps=psld_steps // (4 * k), inner_steps=k, trace_weight=0.0)),
            }
            for name, (method, params) in methods.items():
                if only and not re.search(only, name):
                    continue
                t0 = time.time()
                x, c = reconstruct(model, op, y, method, list(range(n)), **params)
                p, s = psnr(x, x_true), ssim(x, x_true)
                acc = float((classify(x.clamp(-1, 1).float()) == lab).mean())
                rows.append({"model": model_name, "task": task, "method": name, "n": n,
                             "psnr": round(p.mean().item(), 2), "psnr_se": round(p.std().item() / math.sqrt(n), 2),
                             "ssim": round(s.mean().item(), 3), "ssim_se": round(s.std().item() / math.sqrt(n), 3),
                             "class_acc": round(acc, 3), "seconds": round(time.time() - t0, 1), **c.as_stats()})
                print(json.dumps(rows[-1]), flush=True)
            if only:
                continue
            # reference: the measurement itself (back-projected) and class accuracy of the truth
            bp = op.back_project(y.float()).clamp(-1, 1)
            rows.append({"model": model_name, "task": task, "method": "A^T y (no prior)", "n": n,
                         "psnr": round(psnr(bp, x_true).mean().item(), 2), "ssim": round(ssim(bp, x_true).mean().item(), 3),
                         "class_acc": round(float((classify(bp) == lab).mean()), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def trace_direction_part(n: int = 400) -> list[dict]:
    """Where does the trace term move mass? Two-component 2-D mixture (equal weights, stds 0.3 and
    1.0), noiseless measurement of the coordinate that does not separate them (y = 0): share of
    samples in the narrow component as the trace weight eta grows (N = 50, K = 2), against the
    exact posterior share at sigma_y = 0.05 (w'_k prop. to w_k N(0; 0, s_k^2 + sigma^2))."""
    from gensample.models.gmm import GaussianMixture
    from gensample.models.loading import gmm_model

    model = gmm_model("two-widths", GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.3, 1.0]))
    op = MatrixOperator((2,), [[0.0, 1.0]])
    exact = GaussianMixturePosterior(model.extras["mixture"], op.matrix(), torch.zeros(1), 0.05).weights[0].item()
    rows = []
    for eta in (0.0, 0.02, 2.0, 20.0):
        x, _ = reconstruct(model, op, torch.tensor([[0.0]]), "stsl", list(range(n)), steps=50, inner_steps=2, trace_weight=eta)
        share = (x[:, 0] < 0).double().mean().item()
        rows.append({"part": "trace-direction", "eta": eta, "n": n, "narrow_share": round(share, 4),
                     "narrow_share_se": round(math.sqrt(share * (1 - share) / n), 4),
                     "exact_share_sigma_0.05": round(exact, 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("oracle", "digits", "trace", "all"), default="all")
    ap.add_argument("--n", type=int, default=None, help="samples (oracle: 500) / held-out digits (digits: 64)")
    ap.add_argument("--nfe", type=int, default=200, help="paper NFE for the equal-cost comparison")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="regex: run only the methods whose name matches (digits part)")
    ap.add_argument("--models", default=None, help="comma-separated model names (digits part)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    if args.part in ("oracle", "all"):
        rows += oracle_part(args.n or 500, args.nfe)
    if args.part in ("trace", "all"):
        rows += trace_direction_part(args.n or 400)
    if args.part in ("digits", "all"):
        rows += digits_part(args.n or 64, args.nfe, args.only, args.models.split(",") if args.models else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
