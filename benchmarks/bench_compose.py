"""Compositions against exact laws (docs/compose.md, "Measured").

Part "posterior" (FKC target x measurement likelihood): the 2-D two-mode mixture (modes
(+-1.5, +-1.5), sd 0.5), y = x_1 + noise = 0.2, sigma_y = 0.3. Target: the annealed posterior
p(x)^beta N(y; x_1, sigma_y^2), beta = 2, whose exact law is computed by quadrature on an 801 x 801
grid. Rows: smc-post with the model's own prior (the plain posterior: the wrong law for this target)
and smc-post with the FKC target (the composition), at K particles and N steps; columns: mass of the
top mode (x_1 + x_2 > 0) with its binomial standard error, and the posterior mean. Each part has a
known effect: the likelihood moves the mass towards the observed x_1, tempering sharpens the prior
modes; only the composition has both.

Part "steps" (the same composition, K = 64, at ``--bias-steps``): the error of the mean of the
observed coordinate x_1 against the exact value, with its standard error (sd / sqrt(n): one output
per independent system). The FK weights are a quadrature of the continuous weight, so the target is
reached only as the number of steps grows.

Part "gaussian" (Time-Shift inside FKC): FKC-CFG (w = 2, exponents summing to 1) on 64 x 64 isotropic
Gaussian experts with an exact denoiser and an injected time misalignment (the model is evaluated
at t + delta), with and without the Time-Shift step rule; the exact CFG law is Gaussian. Columns:
the per-coordinate mean and standard deviation of the weighted particles and their W2 distance per
coordinate to the exact law, and the log-SNR span the FK weights integrate (sum_k 2 c_k, the same for
every particle: the grid interval of each step) against the span a step from each particle's model
time t'_k to the next grid time would integrate (the rule before issue 25 item 12; mean over particles).
Row "gaussian_infinite_k": the K -> infinity law of the same FKC-CFG on the same grid without
Time-Shift or injected error, per coordinate in closed form (``eval.fkc_gaussian.infinite_k_gaussian``):
what is left of the W2 beyond it is finite K (K = 4 particles per group in 4096 dimensions).

    python benchmarks/bench_compose.py [--part posterior|steps|gaussian|all] [--out benchmarks/results/compose.json]
Single-threaded; seeds fixed.
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

from gensample.core.schedule import alphas_cumprod_from_config  # noqa: E402
from gensample.eval.fkc_gaussian import infinite_k_gaussian  # noqa: E402
from gensample.models.gmm import GaussianMixture  # noqa: E402
from gensample.models.loading import gmm_model  # noqa: E402
from gensample.runs.fkc import _expert_fn  # noqa: E402
from gensample.samplers.fkc import FKCConfig, alpha_bar_pairs, node_coefficients, sample_fkc  # noqa: E402
from gensample.samplers.operators import MatrixOperator  # noqa: E402
from gensample.samplers.smc_posterior import SMCPosteriorConfig, posterior_samples  # noqa: E402
from gensample.schedulers.time_shift import make_time_shift_scheduler  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT_FILE = "compose.json"
RESULT_FIELDS = {OUT_FILE: ["args", "posterior", "steps", "gaussian", "gaussian_infinite_k", "table_md"]}


# -- part posterior ------------------------------------------------------------------------------
def exact_annealed_posterior(beta: float, y: float, sy: float):
    g = np.linspace(-5, 5, 801)
    X1, X2 = np.meshgrid(g, g, indexing="ij")
    logmix = np.logaddexp(*[np.log(0.5) - ((X1 - m) ** 2 + (X2 - m) ** 2) / (2 * 0.25) for m in (1.5, -1.5)])
    logp = beta * logmix - (y - X1) ** 2 / (2 * sy**2)
    p = np.exp(logp - logp.max())
    p /= p.sum()
    return float(p[(X1 + X2) > 0].sum()), [float((p * X1).sum()), float((p * X2).sum())]


def part_posterior(args) -> list[dict]:
    mix = GaussianMixture([0.5, 0.5], [[1.5, 1.5], [-1.5, -1.5]], [0.5, 0.5])
    model = gmm_model("two-mode", mix)
    op, y, sy, beta, n = MatrixOperator((2,), [[1.0, 0.0]]), torch.tensor([[0.2]]), 0.3, 2.0, args.n
    top, mean = exact_annealed_posterior(beta, 0.2, sy)
    rows = [{"method": f"exact p^{beta:g} x likelihood", "K": None, "steps": None, "top": top, "top_se": None, "mean": mean}]
    for steps in args.steps:
        for K in args.ks:
            for name, betas in (("smc-post (prior p)", (1.0,)), ("smc-post + FKC anneal", (beta,))):
                cfg = SMCPosteriorConfig(particles=K, steps=steps, noise_std=sy, betas=betas)
                fn = _expert_fn(model.denoiser(), model, [None], n * K, "cpu") if betas != (1.0,) else None
                t0 = time.perf_counter()
                x = posterior_samples(model, op, y, list(range(n)), cfg, experts=fn).x.double()
                frac = float(((x[:, 0] + x[:, 1]) > 0).double().mean())
                rows.append({"method": name, "K": K, "steps": steps, "top": frac, "top_se": math.sqrt(frac * (1 - frac) / n),
                             "mean": [float(v) for v in x.mean(0)], "seconds": time.perf_counter() - t0})
                print(rows[-1], flush=True)
    return rows


def part_steps(args) -> list[dict]:
    mix = GaussianMixture([0.5, 0.5], [[1.5, 1.5], [-1.5, -1.5]], [0.5, 0.5])
    model = gmm_model("two-mode", mix)
    op, y, sy, beta, n, K = MatrixOperator((2,), [[1.0, 0.0]]), torch.tensor([[0.2]]), 0.3, 2.0, args.n, 64
    top, mean = exact_annealed_posterior(beta, 0.2, sy)
    rows = []
    for steps in args.bias_steps:
        cfg = SMCPosteriorConfig(particles=K, steps=steps, noise_std=sy, betas=(beta,))
        fn = _expert_fn(model.denoiser(), model, [None], n * K, "cpu")
        t0 = time.perf_counter()
        x = posterior_samples(model, op, y, list(range(n)), cfg, experts=fn).x.double()
        frac = float(((x[:, 0] + x[:, 1]) > 0).double().mean())
        rows.append({"K": K, "steps": steps, "mean_x1": float(x[:, 0].mean()), "exact_mean_x1": mean[0],
                     "bias_x1": float(x[:, 0].mean()) - mean[0], "bias_x1_se": float(x[:, 0].std()) / math.sqrt(n),
                     "top": frac, "exact_top": top, "top_se": math.sqrt(frac * (1 - frac) / n),
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


# -- part gaussian -------------------------------------------------------------------------------
CONF = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)


def part_gaussian(args) -> list[dict]:
    ab = alphas_cumprod_from_config(CONF).double()
    mc, vc, mu, vu, w = 0.3, 0.02, 0.0, 0.05, 2.0
    v_star = 1 / (w / vc + (1 - w) / vu)
    m_star = v_star * (w * mc / vc + (1 - w) * mu / vu)

    seen = []

    def experts(delta):
        def f(x, t):
            seen.append(torch.as_tensor(t).long().expand(x.shape[0]).clone())  # the model time of each particle
            tt = (torch.as_tensor(t).long() + delta).clamp(max=999)
            a = ab[tt].reshape(-1, *([1] * (x.ndim - 1))) if tt.ndim else ab[tt]
            xd = x.double()
            eps = [(xd - a.sqrt() * m) * (1 - a).sqrt() / (a * v + 1 - a) for m, v in ((mc, vc), (mu, vu))]
            return torch.stack(eps).to(x.dtype)
        return f

    rows = []
    K, G, steps = 4, 8, args.gauss_steps
    grid = make_time_shift_scheduler(CONF, window_size=0, eta=1.0)
    grid.set_timesteps(steps)
    lim = infinite_k_gaussian([(mc, vc), (mu, vu)], [w, 1 - w], ab, grid.timesteps, eta=1.0, rule=FKCConfig().quadrature,
                              final_alpha_bar=float(grid.final_alpha_cumprod))
    sd_lim = math.sqrt(lim["var"])
    limit = {"steps": steps, "rule": FKCConfig().quadrature, "mean": lim["mean"], "sd": sd_lim,
             "w2": math.hypot(lim["mean"] - m_star, sd_lim - math.sqrt(v_star)), "exact_mean": m_star, "exact_sd": math.sqrt(v_star)}
    print({"infinite_k": limit}, flush=True)
    for delta in (0, args.delta):
        for ts in (False, True):
            prop = make_time_shift_scheduler(CONF, window_size=args.window if ts else 0, eta=1.0)
            prop.set_timesteps(steps)
            gens = [torch.Generator().manual_seed(1000 + i) for i in range(K * G)]
            seen.clear()
            x_T = torch.stack([torch.randn(1, 64, 64, generator=g) for g in gens])
            res = sample_fkc(experts(delta), x_T, FKCConfig(betas=(w, 1 - w), final="weighted"), ab.float(), prop.timesteps,
                             group_size=K, noise_generators=gens,
                             resample_generators=[torch.Generator().manual_seed(7 + g) for g in range(G)], proposal=prop)
            wt = res.weights.reshape(G, K, 1) / G
            x = res.x.double().reshape(G, K, -1)
            m = float((wt * x).sum((0, 1)).mean())
            sd = math.sqrt(max(float((wt * x**2).sum((0, 1)).mean()) - m * m, 0.0))
            ab_t, ab_s = alpha_bar_pairs(ab, prop.timesteps, float(prop.final_alpha_cumprod))
            coef = node_coefficients(ab_t, ab_s, "logsnr")  # what the weights integrate (grid intervals)
            # a step from each particle's model time t'_k to the next grid time instead (resampling
            # reorders particles between steps, so the per-step mean over particles is summed)
            from_model = torch.stack([node_coefficients(ab[tm], ab_s[k].expand(tm.numel()), "logsnr").mean()
                                      for k, tm in enumerate(seen)])
            lam = lambda a: math.log(a / (1 - a))  # noqa: E731
            rows.append({"delta": delta, "time_shift": ts, "window": args.window if ts else 0, "mean": m, "sd": sd,
                         "w2": math.hypot(m - m_star, sd - math.sqrt(v_star)), "exact_mean": m_star, "exact_sd": math.sqrt(v_star),
                         "lambda_span_path": lam(float(ab_s[-1])) - lam(float(ab_t[0])) if float(ab_s[-1]) < 1 else None,
                         "lambda_span_weights": float(2 * coef.sum()), "lambda_span_from_model_times": float(2 * from_model.sum()),
                         "shifted_fraction": float(torch.stack([(tm != t) for tm, t in zip(seen, prop.timesteps)]).double().mean())})
            print(rows[-1], flush=True)
    return rows, limit


def table(post: list[dict], steps: list[dict], gauss: list[dict], limit: dict | None = None) -> str:
    out = []
    if post:
        out += ["| method | K | steps | top-mode mass | mean |", "|---|---|---|---|---|"]
        for r in post:
            se = "" if r["top_se"] is None else f" +- {r['top_se']:.3f}"
            out.append(f"| {r['method']} | {r['K'] or ''} | {r['steps'] or ''} | {r['top']:.3f}{se} | "
                       f"({r['mean'][0]:.3f}, {r['mean'][1]:.3f}) |")
    if steps:
        out += ["", "| steps (K = 64) | bias of mean x_1 | top-mode mass |", "|---|---|---|"]
        for r in steps:
            out.append(f"| {r['steps']} | {r['bias_x1']:+.3f} +- {r['bias_x1_se']:.3f} | {r['top']:.3f} +- {r['top_se']:.3f} "
                       f"(exact {r['exact_top']:.3f}) |")
    if gauss:
        out += ["", "| delta | Time-Shift (window) | rows shifted | mean | sd | W2 to exact | log-SNR span of weights "
                "| span from model times |", "|---|---|---|---|---|---|---|---|"]
        for r in gauss:
            out.append(f"| {r['delta']} | {r['window'] if r['time_shift'] else 'off'} | {r['shifted_fraction']:.2f} | {r['mean']:.4f} "
                       f"| {r['sd']:.4f} | {r['w2']:.4f} | {r['lambda_span_weights']:.3f} | {r['lambda_span_from_model_times']:.3f} |")
    if limit:
        out.append(f"| K -> inf, 0 | off | - | {limit['mean']:.4f} | {limit['sd']:.4f} | {limit['w2']:.4f} | | |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("posterior", "steps", "gaussian", "all"), default="all")
    p.add_argument("--n", type=int, default=400, help="posterior draws per row")
    p.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[50, 200])
    p.add_argument("--bias-steps", type=lambda s: [int(v) for v in s.split(",")], default=[50, 200, 800],
                   help="step counts of part steps (FKC anneal in smc-post, K = 64)")
    p.add_argument("--gauss-steps", type=int, default=50)
    p.add_argument("--window", type=int, default=39)
    p.add_argument("--delta", type=int, default=15)
    p.add_argument("--out", default=None, help="write the result JSON here (with provenance)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    post = part_posterior(args) if args.part in ("posterior", "all") else []
    steps = part_steps(args) if args.part in ("steps", "all") else []
    gauss, limit = part_gaussian(args) if args.part in ("gaussian", "all") else ([], None)
    md = table(post, steps, gauss, limit)
    print(md)
    if args.out:
        write_result(args.out, {"args": vars(args), "posterior": post, "steps": steps, "gaussian": gauss, "gaussian_infinite_k": limit, "table_md": md}, models=[])


if __name__ == "__main__":
    main()
