"""smc-post against the exact posterior as the number of particles K grows, with DPS / PSLD / STSL
at equal per-particle NFE (docs/smc_posterior.md, "Measured").

Problems: the 2-D two-mode case (modes (+-1.5, +-1.5), sd 0.5, y = x_1 + noise = 0.2, sigma_y = 0.3)
and gmm-digits (64-D, 40 components) with a dense 32 x 64 Gaussian matrix, sigma_y = 0.1, and with
random inpainting (half the pixels missing, mask seed 1), sigma_y = 0.3; ground truth a mixture sample
(seed 3), as in tests/test_inverse_defaults.py. Columns: exact mass of the top posterior mode w'_top and the samples'
mean responsibility for it, mode-mass error max_k |mean r_k - w'_k|, RMS error of the mean per
coordinate, and W2 between the n samples and n independent exact posterior draws (exact optimal
matching via scipy.optimize.linear_sum_assignment, so no POT; the `exact draws` row is the
Monte Carlo floor of that statistic). Every method: 50 UNet forward + 50 backward evaluations per
particle or sample (STSL: N = 10 outer steps x 5 inner, paper NFE 50); smc-post with K particles
spends K times that per output sample.

    python benchmarks/bench_smc_posterior.py [--n2d 1000] [--n64 256] [--ks 1,4,16,64,256]
Single-threaded; seeds fixed; result in benchmarks/results/smc_posterior.json (write_result).

Part "digits" (docs/smc_posterior.md, "Held-out digits"): the shipped digits-ddpm on held-out test
digits with the box-inpainting operator of benchmarks/bench_stsl.py --part digits (inpaint-box, mask
seed 0, default 4 x 4 hole, sigma_y = 0.05). (a) PSNR / SSIM of one reconstruction per digit against
the truth (first --n-digits test digits), smc-post K = 1, 4, 16 (N = 50) against DPS / PSLD / STSL at
50 UNet evaluations per sample; (b) diversity: for the first --n-div test digits with a 5 x 5 hole,
--draws posterior draws per method, classified with the shipped digits classifier, as a class
histogram per method. There is no exact posterior here: the histograms are compared with each other,
with the true label and, as a heuristic reference only, with the labels of the --draws training digits
nearest to the measurement on the observed pixels.

    python benchmarks/bench_smc_posterior.py --part digits --out benchmarks/results/smc_posterior_digits.json
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
from gensample.samplers.operators import MatrixOperator, random_inpaint  # noqa: E402
from gensample.samplers.smc_posterior import SMCPosteriorConfig, posterior_samples  # noqa: E402
from gensample.samplers.stsl import reconstruct  # noqa: E402
from gensample.zoo.analytic import gmm_digits  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT_FILE = "smc_posterior.json"
DIGITS_FILE = "smc_posterior_digits.json"
RESULT_FIELDS = {OUT_FILE: ["args", "rows", "chain_limit_2d", "table_md"],  # a literal: tests/test_results_provenance.py reads it
                 DIGITS_FILE: ["args", "rows", "diversity", "table_md"]}
STEPS = 50
BASELINES = {"DPS N=50": ("dps", dict(steps=50)), "PSLD N=50": ("psld", dict(steps=50)),
             "STSL N=10 K=5": ("stsl", dict(steps=10, inner_steps=5))}


def problems():
    mix = GaussianMixture([0.5, 0.5], [[1.5, 1.5], [-1.5, -1.5]], [0.5, 0.5])
    yield "2-D two-mode, x_1 observed, s=0.3", gmm_model("two-mode", mix), MatrixOperator((2,), [[1.0, 0.0]]), torch.tensor([[0.2]]), 0.3
    gd = gmm_digits()
    xt = gd.extras["mixture"].sample(1, torch.Generator().manual_seed(3))
    op = MatrixOperator((1, 8, 8), np.random.default_rng(0).normal(size=(32, 64)) / 8)
    yield "gmm-digits matrix 32x64, s=0.1", gd, op, op.measure(xt, 0.1, [torch.Generator().manual_seed(0)]), 0.1
    op = random_inpaint((1, 8, 8), missing=0.5, seed=1)
    yield "gmm-digits inpaint-random(0.5), s=0.3", gd, op, op.measure(xt, 0.3, [torch.Generator().manual_seed(0)]), 0.3


def w2_matching(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Exact W2 between two equal-size empirical measures (optimal assignment), per sqrt(D)."""
    from scipy.optimize import linear_sum_assignment

    a = x.double().reshape(len(x), -1).numpy()
    b = ref.double().reshape(len(ref), -1).numpy()
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    return float(math.sqrt(cost[r, c].mean() / a.shape[1]))


def row(problem, method, x, post, ref, secs, nfe) -> dict:
    d = posterior_distance(x, post)
    top = int(post.weights.argmax())
    r_top = float(post.responsibilities(x.double().reshape(len(x), *post.event_shape)).mean(0)[top])
    return {"problem": problem, "method": method, "n": len(x), "w_top_exact": float(post.weights[top]), "w_top": r_top,
            "mode_mass_err": d.weight_err, "mean_err": d.mean_err, "w2": w2_matching(x, ref), "seconds": round(secs, 2),
            "nfe_per_sample": nfe}


def chain_limit(model, op, y, s, post, steps: int, particles: int = 200_000) -> dict:
    """The posterior that smc-post converges to: the N-step ancestral chain's own prior times the exact
    likelihood, by self-normalised importance sampling with the unguided chain as proposal (smc-post with
    guidance_weight 0 and no resampling: the final weights are then exactly N(y; A x0, sigma_y^2 I)).
    Only feasible in 2-D (the weights' ESS is about 4 % of the particles here)."""
    cfg = SMCPosteriorConfig(particles=particles, steps=steps, noise_std=s, guidance_weight=0.0, ess_threshold=0.0, final="weighted")
    res = posterior_samples(model, op, y, list(range(particles)), cfg)
    top = int(post.weights.argmax())
    r = post.responsibilities(res.x.double())[:, top]
    w = res.weights
    est = float((w * r).sum())
    return {"steps": steps, "particles": particles, "w_top": est, "w_top_se": float(((w**2) * (r - est) ** 2).sum().sqrt()),
            "ess": float(1 / (w**2).sum()), "w_top_exact": float(post.weights[top])}


DIGITS_SIGMA = 0.05
DIGITS_KS = (1, 4, 16)


def _digits_methods():
    """(label, draw(op, y, seeds) -> (len(seeds), 1, 8, 8), UNet evaluations per sample); y (1 or n, ...)."""
    def baseline(method, kw):
        return lambda model, op, y, seeds: reconstruct(model, op, y, method, seeds, noise_std=DIGITS_SIGMA, **kw)[0]

    def smc(k):
        cfg = SMCPosteriorConfig(particles=k, steps=STEPS, noise_std=DIGITS_SIGMA)

        def draw(model, op, y, seeds):
            if y.shape[0] == 1:  # one measurement: len(seeds) independent systems in one call
                return posterior_samples(model, op, y, seeds, cfg).x
            # one measurement per seed: one system each (posterior_samples shares y across systems)
            return torch.cat([posterior_samples(model, op, y[i:i + 1], [s], cfg).x for i, s in enumerate(seeds)])
        return draw

    out = [(label, baseline(m, kw), 50) for label, (m, kw) in BASELINES.items()]
    return out + [(f"smc-post K={k}", smc(k), 50 * k) for k in DIGITS_KS]


def digits_part(n: int, n_div: int, draws: int) -> tuple[list[dict], list[dict]]:
    from gensample.eval.digits import classify
    from gensample.eval.digits_data import real_digits
    from gensample.eval.restoration import psnr, ssim
    from gensample.models.loading import load_model
    from gensample.samplers.operators import make_operator

    model = load_model("digits-ddpm")
    x_all, labels = real_digits("test")
    methods = _digits_methods()
    # (a) reconstruction quality: the bench_stsl digits setting (4x4 box, mask seed 0, sigma_y 0.05)
    x_true = torch.from_numpy(x_all[:n]).double()
    lab = labels[:n]
    op = make_operator("inpaint-box", (1, 8, 8), seed=0)
    y = op.measure(x_true, DIGITS_SIGMA, [torch.Generator().manual_seed(100 + i) for i in range(n)])
    bp = op.back_project(y.float()).clamp(-1, 1)
    rows = [{"method": "A^T y (no prior)", "n": n, "psnr": round(psnr(bp, x_true).mean().item(), 2), "psnr_se": None,
             "ssim": round(ssim(bp, x_true).mean().item(), 3), "class_acc": round(float((classify(bp) == lab).mean()), 3),
             "nfe_per_sample": 0, "seconds": 0.0}]
    for label, draw, nfe in methods:
        t0 = time.perf_counter()
        x = draw(model, op, y, list(range(n))).double().clamp(-1, 1)
        p, q = psnr(x, x_true), ssim(x, x_true)
        rows.append({"method": label, "n": n, "psnr": round(p.mean().item(), 2), "psnr_se": round(p.std().item() / math.sqrt(n), 2),
                     "ssim": round(q.mean().item(), 3), "class_acc": round(float((classify(x.float()) == lab).mean()), 3),
                     "nfe_per_sample": nfe, "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    # (b) diversity on a larger (5x5) hole: `draws` posterior draws per digit and method
    x_tr, lab_tr = real_digits("train")
    x_tr = torch.from_numpy(x_tr).double()
    op5 = make_operator("inpaint-box", (1, 8, 8), seed=0, box_size=5)
    div = []
    for i in range(n_div):
        xt = x_true[i:i + 1] if i < n else torch.from_numpy(x_all[i:i + 1]).double()
        y1 = op5.measure(xt, DIGITS_SIGMA, [torch.Generator().manual_seed(200 + i)])
        d2 = ((op5.forward(x_tr) - y1) ** 2).reshape(len(x_tr), -1).sum(1)
        near = lab_tr[d2.argsort()[:draws].numpy()]
        bp1 = op5.back_project(y1.float()).clamp(-1, 1)
        rec = {"digit_index": i, "true_label": int(labels[i]), "box_size": 5,
               "zero_filled_class": int(classify(bp1)[0]),
               "nearest_train_hist": np.bincount(near, minlength=10).tolist(), "methods": {}}
        for label, draw, nfe in methods:
            seeds = list(range(1000 * (i + 1), 1000 * (i + 1) + draws))
            x = draw(model, op5, y1, seeds).double().clamp(-1, 1)
            c = classify(x.float())
            p = psnr(x, xt.expand_as(x))
            rec["methods"][label] = {"hist": np.bincount(c, minlength=10).tolist(), "distinct_classes": int(len(set(c.tolist()))),
                                     "frac_true": round(float((c == labels[i]).mean()), 3),
                                     "psnr_mean": round(p.mean().item(), 2),
                                     "pixel_sd": round(x.std(0).mean().item(), 3)}
        div.append(rec)
        print(rec, flush=True)
    return rows, div


def digits_table(rows, div) -> str:
    out = ["| method | PSNR (dB) | SSIM | class acc | UNet evals per sample | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        ps = f"{r['psnr']:.2f}" + (f" +- {r['psnr_se']:.2f}" if r["psnr_se"] is not None else "")
        out.append(f"| {r['method']} | {ps} | {r['ssim']:.3f} | {r['class_acc']:.3f} | {r['nfe_per_sample']} | {r['seconds']:.1f} |")
    out += ["", "Class histograms (counts of classes 0..9 over the draws; 5x5 hole):", "",
            "| digit (true) | method | histogram 0..9 | distinct | frac true | PSNR mean | pixel sd |", "|---|---|---|---|---|---|---|"]
    for d in div:
        head = f"#{d['digit_index']} ({d['true_label']})"
        out.append(f"| {head} | nearest train (heuristic) | {' '.join(map(str, d['nearest_train_hist']))} | "
                   f"{sum(v > 0 for v in d['nearest_train_hist'])} | {d['nearest_train_hist'][d['true_label']] / sum(d['nearest_train_hist']):.3f} | | |")
        for m, v in d["methods"].items():
            out.append(f"|  | {m} | {' '.join(map(str, v['hist']))} | {v['distinct_classes']} | {v['frac_true']:.3f} | "
                       f"{v['psnr_mean']:.2f} | {v['pixel_sd']:.3f} |")
        out.append(f"|  | (zero-filled input classified as) | {d['zero_filled_class']} | | | | |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("oracle", "digits"), default="oracle")
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/smc_posterior[_digits].json)")
    ap.add_argument("--n2d", type=int, default=1000)
    ap.add_argument("--n64", type=int, default=256)
    ap.add_argument("--ks", default="1,4,16,64,256")
    ap.add_argument("--n-digits", type=int, default=32, help="held-out digits for PSNR / SSIM (digits part)")
    ap.add_argument("--n-div", type=int, default=4, help="held-out digits for the class histograms (digits part)")
    ap.add_argument("--draws", type=int, default=32, help="posterior draws per digit and method (digits part)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part == "digits":
        rows, div = digits_part(args.n_digits, args.n_div, args.draws)
        table = digits_table(rows, div)
        print(table)
        write_result(Path(args.out) if args.out else RESULTS / DIGITS_FILE,
                     {"args": vars(args), "rows": rows, "diversity": div, "table_md": table}, models=["digits-ddpm"])
        return
    ks = [int(k) for k in args.ks.split(",")]
    rows, limits = [], []
    for pi, (name, model, op, y, s) in enumerate(problems()):
        n = args.n2d if pi == 0 else args.n64
        post = GaussianMixturePosterior(model.extras["mixture"], op.matrix(), y.reshape(-1), s)
        ref = post.sample(n, torch.Generator().manual_seed(123))
        rows.append(row(name, "exact draws", post.sample(n, torch.Generator().manual_seed(7)), post, ref, 0.0, 0))
        for label, (method, kw) in BASELINES.items():
            t0 = time.perf_counter()
            x, _ = reconstruct(model, op, y, method, list(range(n)), noise_std=s, **kw)
            rows.append(row(name, label, x, post, ref, time.perf_counter() - t0, 50))
            print(rows[-1], flush=True)
        for k in ks:
            t0 = time.perf_counter()
            res = posterior_samples(model, op, y, list(range(n)), SMCPosteriorConfig(particles=k, steps=STEPS, noise_std=s))
            rows.append(row(name, f"smc-post K={k}", res.x, post, ref, time.perf_counter() - t0, 50 * k))
            rows[-1]["resample_events_per_system"] = res.stats["resample_events"] / n
            print(rows[-1], flush=True)
        if pi == 0:  # the discretisation: smc-post's own limit at N = 50, and K = 256 at N = 200
            limits = [chain_limit(model, op, y, s, post, STEPS), chain_limit(model, op, y, s, post, 200)]
            print(limits, flush=True)
            t0 = time.perf_counter()
            res = posterior_samples(model, op, y, list(range(n)), SMCPosteriorConfig(particles=256, steps=200, noise_std=s))
            rows.append(row(name, "smc-post K=256, N=200", res.x, post, ref, time.perf_counter() - t0, 200 * 256))
            print(rows[-1], flush=True)
    lines = ["| problem | method | w'_top exact / sampled | mode-mass err | mean err | W2 (matching) | NFE per sample | s |",
             "|---|---|---|---|---|---|---|---|"]
    last = None
    for r in rows:
        lines.append(f"| {r['problem'] if r['problem'] != last else ''} | {r['method']} | {r['w_top_exact']:.3f} / {r['w_top']:.3f} | "
                     f"{r['mode_mass_err']:.3f} | {r['mean_err']:.3f} | {r['w2']:.3f} | {r['nfe_per_sample']} | {r['seconds']:.1f} |")
        last = r["problem"]
    lines.append("")
    lines += [f"2-D: the N = {c['steps']} chain's own posterior (smc-post's K -> inf limit) has w'_top = {c['w_top']:.3f} "
              f"+- {c['w_top_se']:.3f} (importance sampling, {c['particles']} particles, ESS {c['ess']:.0f}); exact "
              f"{c['w_top_exact']:.3f}." for c in limits]
    table = "\n".join(lines)
    print(table)
    write_result(Path(args.out) if args.out else RESULTS / OUT_FILE, {"args": vars(args), "rows": rows, "chain_limit_2d": limits, "table_md": table}, models=["gmm-digits"])


if __name__ == "__main__":
    main()
