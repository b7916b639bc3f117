"""DPS / PSLD / STSL against the exact posterior and on held-out digits (docs/stsl.md, "Measured").

Part "oracle": distance of each sampler to the exact Gaussian-mixture posterior at equal paper NFE
(100), with the default step rule (auto) and with the papers' raw weights (paper), on five problems:
the 2-D two-mode case (modes (+-1.5, +-1.5), sd 0.5, y = x_1 = 0.2, sigma_y = 0.3), gmm2d random
inpainting, gmm-digits random inpainting at sigma_y 0.05 and 0.3, gmm-digits with a dense 32x64
matrix. Columns: share of samples outside the prior's 99.9% region, mode-mass error
max_k |mean r_k - w'_k|, error of the mean along the rows of A (prior-std units), Bures W2 per
sqrt(D). `exact` rows are n exact posterior draws (the Monte Carlo floor).
Part "digits": held-out digits, box inpainting and 2x bicubic SR, digits-ddpm (pixel) and digits-ldm
(latent): PSNR / SSIM (mean +- SE over the digits) and classifier accuracy, DPS / PSLD / STSL at
equal paper NFE and STSL at 1/4, default rule, plus first-order STSL (eta=0), STSL with the
linearised log det trace term (trace=logdet; docs/stsl.md, "The trace term") and the paper-rule rows.

    python benchmarks/bench_stsl.py [--part oracle|digits|all] [--n 200] [--n-digits 32]
Single-threaded; seeds fixed; results go to benchmarks/results/stsl_{oracle,digits}.json through
_provenance.write_result, with the markdown tables of docs/stsl.md in "table_md".
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import write_result  # noqa: E402

from gensample.models.gmm import GaussianMixture  # noqa: E402
from gensample.models.loading import gmm_model  # noqa: E402
from gensample.models.posterior import GaussianMixturePosterior, posterior_distance  # noqa: E402
from gensample.samplers.operators import MatrixOperator, make_operator, random_inpaint  # noqa: E402
from gensample.samplers.stsl import reconstruct  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RESULT_FIELDS = {  # a literal: tests/test_results_provenance.py reads it statically
    "stsl_oracle.json": ["args", "rows", "table_md"],
    "stsl_digits.json": ["args", "rows", "table_md"],
}
NFE = 100  # paper NFE of every oracle row
ORACLE_METHODS = {
    "DPS N=100": ("dps", dict(steps=100)),
    "PSLD N=100": ("psld", dict(steps=100)),
    "STSL N=20 K=5": ("stsl", dict(steps=20, inner_steps=5)),
    "STSL N=20 K=5 eta=0": ("stsl", dict(steps=20, inner_steps=5, trace_weight=0.0)),
    "STSL N=20 K=5 trace=logdet": ("stsl", dict(steps=20, inner_steps=5, trace_rule="logdet")),
}


def oracle_problems():
    from gensample.zoo.analytic import gmm2d, gmm_digits

    mix = GaussianMixture([0.5, 0.5], [[1.5, 1.5], [-1.5, -1.5]], [0.5, 0.5])
    yield "2-D two-mode, x_1 observed, s=0.3", gmm_model("two-mode", mix), MatrixOperator((2,), [[1.0, 0.0]]), torch.tensor([[0.2]]), 0.3
    g2 = gmm2d()
    op = random_inpaint((2,), missing=0.5, seed=1)
    x = torch.tensor([[0.3, 3.5]], dtype=torch.float64)
    yield "gmm2d inpaint-random, s=0.3", g2, op, op.measure(x, 0.3, [torch.Generator().manual_seed(0)]), 0.3
    gd = gmm_digits()
    xt = gd.extras["mixture"].sample(1, torch.Generator().manual_seed(3))
    for s in (0.05, 0.3):
        op = random_inpaint((1, 8, 8), missing=0.5, seed=1)
        yield f"gmm-digits inpaint-random(0.5), s={s}", gd, op, op.measure(xt, s, [torch.Generator().manual_seed(0)]), s
    op = MatrixOperator((1, 8, 8), np.random.default_rng(0).normal(size=(32, 64)) / 8)
    yield "gmm-digits matrix 32x64, s=0.1", gd, op, op.measure(xt, 0.1, [torch.Generator().manual_seed(0)]), 0.1


def _outside(mix, x, thr):
    return float((mix.log_prob(x.double().reshape(len(x), -1)) < thr).double().mean())


def oracle_part(n: int) -> list[dict]:
    rows = []
    for name, model, op, y, s in oracle_problems():
        mix = model.extras["mixture"]
        prior = mix.sample(20000, torch.Generator().manual_seed(0)).reshape(20000, -1)
        thr = torch.quantile(mix.log_prob(prior).double(), 1e-3).item()
        post = GaussianMixturePosterior(mix, op.matrix(), y.reshape(-1), s)
        runs = {"exact draws": None}
        for label, (method, params) in ORACLE_METHODS.items():
            runs[label] = (method, dict(params, noise_std=s))
            runs[label + " [paper rule]"] = (method, dict(params, step_rule="paper"))
        for label, spec in runs.items():
            if "eta=0 [paper" in label or "trace=logdet [paper" in label:  # ablations of the auto rule only
                continue
            t0 = time.time()
            if spec is None:
                x = post.sample(n, torch.Generator().manual_seed(1)).float()
            else:
                x, _ = reconstruct(model, op, y, spec[0], list(range(n)), **spec[1])
            d = posterior_distance(x, post)
            rows.append({"problem": name, "method": label, "n": n, "outside_prior": round(_outside(mix, x, thr), 3),
                         "mode_mass_err": round(d.weight_err, 3), "mean_err_measured": round(d.mean_err_measured, 3),
                         "w2": round(d.w2_gauss, 3), "top_mode_share": round(d.top_mode_share, 3),
                         "exact_top_weight": round(float(post.weights.max()), 3), "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    return rows


def oracle_table(rows) -> str:
    out = ["| problem | method | outside prior | mode-mass err | mean err (A rows) | W2 |", "|---|---|---|---|---|---|"]
    last = None
    for r in rows:
        prob = r["problem"] if r["problem"] != last else ""
        last = r["problem"]
        out.append(f"| {prob} | {r['method']} | {r['outside_prior']:.3f} | {r['mode_mass_err']:.3f} | "
                   f"{r['mean_err_measured']:.3f} | {r['w2']:.3f} |")
    return "\n".join(out)


def digits_part(n: int, nfe: int = 100) -> list[dict]:
    from gensample.eval.digits import classify
    from gensample.eval.digits_data import real_digits
    from gensample.eval.restoration import psnr, ssim
    from gensample.models.loading import load_model

    x_all, labels = real_digits("test")
    x_true = torch.from_numpy(x_all[:n]).double()
    lab = labels[:n]
    k = 5
    methods = {
        f"DPS N={nfe}": ("dps", dict(steps=nfe)),
        f"PSLD N={nfe}": ("psld", dict(steps=nfe)),
        f"STSL N={nfe // k} K={k}": ("stsl", dict(steps=nfe // k, inner_steps=k)),
        f"STSL N={nfe // k} K={k} eta=0": ("stsl", dict(steps=nfe // k, inner_steps=k, trace_weight=0.0)),
        f"STSL N={nfe // k} K={k} trace=logdet": ("stsl", dict(steps=nfe // k, inner_steps=k, trace_rule="logdet")),
        f"STSL N={nfe // (4 * k)} K={k} (1/4 NFE)": ("stsl", dict(steps=nfe // (4 * k), inner_steps=k)),
        f"STSL N={nfe // k} K={k} [paper rule, eta=0.02]": ("stsl", dict(steps=nfe // k, inner_steps=k, step_rule="paper")),
        f"PSLD N={nfe} [paper rule]": ("psld", dict(steps=nfe, step_rule="paper")),
    }
    rows = []
    for model_name in ("digits-ddpm", "digits-ldm"):
        model = load_model(model_name)
        for task in ("inpaint-box", "sr-bicubic"):
            op = make_operator(task, (1, 8, 8), seed=0, sr_factor=2)
            y = op.measure(x_true, 0.05, [torch.Generator().manual_seed(100 + i) for i in range(n)])
            bp = op.back_project(y.float()).clamp(-1, 1)
            rows.append({"model": model_name, "task": task, "method": "A^T y (no prior)", "n": n,
                         "psnr": round(psnr(bp, x_true).mean().item(), 2), "psnr_se": None,
                         "ssim": round(ssim(bp, x_true).mean().item(), 3), "class_acc": round(float((classify(bp) == lab).mean()), 3)})
            for name, (method, params) in methods.items():
                t0 = time.time()
                x, c = reconstruct(model, op, y, method, list(range(n)), **params)
                p, s = psnr(x, x_true), ssim(x, x_true)
                rows.append({"model": model_name, "task": task, "method": name, "n": n,
                             "psnr": round(p.mean().item(), 2), "psnr_se": round(p.std().item() / math.sqrt(n), 2),
                             "ssim": round(s.mean().item(), 3), "class_acc": round(float((classify(x.clamp(-1, 1).float()) == lab).mean()), 3),
                             "nfe_paper": c.nfe_paper, "unet_forward": c.unet_forward, "unet_backward": c.unet_backward,
                             "seconds": round(time.time() - t0, 1)})
                print(rows[-1], flush=True)
    return rows


def digits_table(rows) -> str:
    out = ["| model | task | method | PSNR | SSIM | class acc | paper NFE | fwd / bwd per batch |", "|---|---|---|---|---|---|---|---|"]
    last = None
    for r in rows:
        key = (r["model"], r["task"])
        head = f"{r['model']} | {r['task']}" if key != last else " | "
        last = key
        ps = f"{r['psnr']:.2f}" + (f" +- {r['psnr_se']:.2f}" if r.get("psnr_se") is not None else "")
        cost = f"{r['nfe_paper']} | {r['unet_forward']} / {r['unet_backward']}" if "nfe_paper" in r else " | "
        out.append(f"| {head} | {r['method']} | {ps} | {r['ssim']:.3f} | {r['class_acc']:.3f} | {cost} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("oracle", "digits", "all"), default="all")
    ap.add_argument("--n", type=int, default=200, help="samples per oracle run")
    ap.add_argument("--n-digits", type=int, default=32, help="held-out digits (digits part)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part in ("oracle", "all"):
        rows = oracle_part(args.n)
        table = oracle_table(rows)
        print(table)
        write_result(RESULTS / "stsl_oracle.json", {"args": vars(args), "rows": rows, "table_md": table})
    if args.part in ("digits", "all"):
        rows = digits_part(args.n_digits)
        table = digits_table(rows)
        print(table)
        write_result(RESULTS / "stsl_digits.json", {"args": vars(args), "rows": rows, "table_md": table},
                     models=["digits-ddpm", "digits-ldm"])


if __name__ == "__main__":
    main()
