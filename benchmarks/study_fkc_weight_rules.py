"""FKC weight rules over seeds: bias, seed spread and RMSE of each rule (docs/fkc.md "Weight rules over seeds").

Three 1-D targets with exact scores (``GaussianMixture.eps``) and an exact answer on a grid:

- ``anneal``: p^2 of p = 0.7 N(-2, 0.5^2) + 0.3 N(2, 0.5^2); statistic P(x < 0) (exact 0.845);
- ``product``: p1 * p2, p1 = 0.5 N(-2, 0.6^2) + 0.5 N(2, 0.6^2), p2 = 0.4 N(-1.5, 1) + 0.6 N(1.5, 1);
  statistic P(x < 0);
- ``cfg``: p(x | c)^3 p(x)^-2 (w = 3) of the labelled mixture 0.4 N(-2, .5^2) [c] + 0.3 N(0.5, .5^2) [c]
  + 0.3 N(2.5, .5^2) [other class]; statistic P(x < -0.75) (the left one of the two modes of c).

Each (target, rule, steps) is run for ``--seeds`` seeds (the same seeds for every rule, so rules are
compared on common random numbers), DDPM move (eta = 1), ``--resample ess`` (threshold 0.7),
``--final weighted``, one group of K particles, default linear schedule, leading spacing. Per cell:
bias (mean over seeds minus exact), seed spread (sd over seeds), RMSE = sqrt(bias^2 + spread^2),
the binomial standard error sqrt(p (1 - p) / K) as the floor of the spread, and the mean number of
resamplings. The weight diagnostics say which steps carry the weight variance: the per-step
variance over particles of the log-weight increment c_k * rate_k (computed from the same model
output the sampler uses) summed over bands of t / T, and the mean number of resamplings per band;
and where the seed spread is made: after the move that ends at each band edge t_e (t / T = 0.5, 0.2,
0.05, 0.01, 0) the weighted fraction of particles below cut * sqrt(alpha_bar(t_e)) (the statistic
carried to the noised scale), whose sd over seeds at t = 0 is the spread itself.

    python benchmarks/study_fkc_weight_rules.py --out benchmarks/results/fkc_weight_rules.json
    python benchmarks/study_fkc_weight_rules.py --report benchmarks/results/fkc_weight_rules.json

``--report`` only reads a stored result and prints robust summaries of its per-seed values (the seed
distribution is heavy-tailed: a rare run collapses onto few ancestors): median error, a robust spread
(1.4826 x the median absolute deviation from the median) and the number of seeds further than
15 binomial SEs from the exact value (collapses), per cell and per rule over all cells.
Single-threaded (torch.set_num_threads(1)); seeds fixed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import write_result  # noqa: E402

from gensample.core.schedule import alphas_cumprod_from_config  # noqa: E402
from gensample.models.gmm import GaussianMixture  # noqa: E402
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG  # noqa: E402
from gensample.samplers.fkc import (DEFAULTS, QUADRATURES, FKCConfig, alpha_bar_pairs, node_coefficients,  # noqa: E402
                                    sample_fkc, spaced_timesteps, weight_rate)

RESULT_FIELDS = {"fkc_weight_rules.json": ["args", "quadrature_default", "cases", "results", "table_md"]}
BANDS = (0.0, 0.01, 0.05, 0.2, 0.5, 1.01)  # t / T bands of the weight diagnostics (1.01: include t = T)
EDGES = (0.5, 0.2, 0.05, 0.01, 0.0)  # t / T after the moves where the noised statistic is recorded

ANNEAL = GaussianMixture([0.7, 0.3], [[-2.0], [2.0]], [0.5, 0.5])
PROD1 = GaussianMixture([0.5, 0.5], [[-2.0], [2.0]], [0.6, 0.6])
PROD2 = GaussianMixture([0.4, 0.6], [[-1.5], [1.5]], [1.0, 1.0])
CFG_MIX = GaussianMixture([0.4, 0.3, 0.3], [[-2.0], [0.5], [2.5]], [0.5, 0.5, 0.5], labels=[0, 0, 1])
CFG_COND = CFG_MIX.conditional(0)


def case(name: str) -> dict:
    """experts (list of mixtures), betas, statistic threshold (P(x < cut)), grid log-density of the target."""
    if name == "anneal":
        return {"experts": [ANNEAL], "betas": (2.0,), "cut": 0.0}
    if name == "product":
        return {"experts": [PROD1, PROD2], "betas": (1.0, 1.0), "cut": 0.0}
    if name == "cfg":
        return {"experts": [CFG_COND, CFG_MIX], "betas": (3.0, -2.0), "cut": -0.75}
    raise ValueError(f"case must be one of anneal, product, cfg, got {name!r}")


def exact_mass(c: dict) -> float:
    """P(x < cut) under prod_i p_i^beta_i, by quadrature on 200001 points over [-12, 12]."""
    g = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    lp = sum(b * m.log_prob(g[:, None]) for m, b in zip(c["experts"], c["betas"]))
    p = torch.exp(lp - lp.max())
    return float(p[g < c["cut"]].sum() / p.sum())


def one_run(c: dict, rule: str, steps: int, K: int, seed: int, ab: torch.Tensor) -> dict:
    ts = spaced_timesteps(1000, steps)
    ab_t, ab_s = alpha_bar_pairs(ab, ts, 1.0)
    coef = node_coefficients(ab_t, ab_s, rule)
    index = {int(t): k for k, t in enumerate(ts)}
    inc_var = torch.zeros(len(ts), dtype=torch.float64)

    def experts(x, t):
        a = ab[int(t)]
        eps = torch.stack([m.eps(x.double(), a) for m in c["experts"]])  # (M, K, 1) float64
        k = index[int(t)]
        inc_var[k] = (coef[k] * weight_rate(eps, c["betas"])).var()  # the increment this model call carries
        return eps.to(x.dtype)

    t_next = torch.cat([ts[1:].double(), torch.tensor([-1.0])]) / 1000  # time after each move (-1: the end)
    edge_k = {e: int(torch.nonzero(t_next.clamp(min=0) <= e)[0]) for e in EDGES}  # the first move ending at or below e
    noised = {}

    def on_step(k, x, log_w):
        for e, k_e in edge_k.items():
            if k == k_e:
                w = torch.softmax(log_w[0], 0)
                noised[e] = float((w * (x[:, 0].double() < c["cut"] * math.sqrt(float(ab_s[k])))).sum())

    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(K, 1, generator=gen)
    cfg = FKCConfig(betas=c["betas"], final="weighted", resample="ess", quadrature=rule)
    res = sample_fkc(experts, x_T, cfg, ab, ts, group_size=K, noise_generators=gen,
                     resample_generators=[torch.Generator().manual_seed(seed + 10_000)], on_step=on_step)
    w, x = res.weights, res.x[:, 0].double()
    frac = ts.double() / 1000
    bands_var, bands_res = [], []
    for lo, hi in zip(BANDS[:-1], BANDS[1:]):
        sel = (frac >= lo) & (frac < hi)
        bands_var.append(float(inc_var[sel].sum()))
        bands_res.append(int(res.resampled[0, sel].sum()))
    return {"mass": float((w * (x < c["cut"])).sum()), "resamples": int(res.resampled.sum()),
            "min_ess_frac": float(res.ess.min()) / K, "final_ess_frac": float(res.ess[0, -1]) / K,
            "band_inc_var": bands_var, "band_resamples": bands_res, "noised_stat": [noised[e] for e in EDGES]}


def summarise(runs: list[dict], exact: float, K: int) -> dict:
    m = torch.tensor([r["mass"] for r in runs], dtype=torch.float64)
    bias, spread = float(m.mean()) - exact, float(m.std())
    nb = len(BANDS) - 1
    return {"bias": bias, "spread": spread, "rmse": math.hypot(bias, spread),
            "se_of_bias": spread / math.sqrt(len(runs)), "binomial_se": math.sqrt(exact * (1 - exact) / K),
            "resamples": sum(r["resamples"] for r in runs) / len(runs),
            "final_ess_frac": sum(r["final_ess_frac"] for r in runs) / len(runs),
            "band_inc_var": [sum(r["band_inc_var"][b] for r in runs) / len(runs) for b in range(nb)],
            "band_resamples": [sum(r["band_resamples"][b] for r in runs) / len(runs) for b in range(nb)],
            "noised_stat_sd": [float(torch.tensor([r["noised_stat"][e] for r in runs]).std()) for e in range(len(EDGES))],
            "masses": [r["mass"] for r in runs]}


def table(results: dict, exact: dict) -> str:
    out = ["| target | steps | K | rule | bias | spread | RMSE | spread / binomial SE | resamples |",
           "|---|---|---|---|---|---|---|---|---|"]
    for key, row in results.items():
        name, steps, K, rule = key.split("|")
        out.append(f"| {name} (exact {exact[name]:.4f}) | {steps} | {K} | {rule} | {row['bias']:+.4f} | {row['spread']:.4f} | "
                   f"{row['rmse']:.4f} | {row['spread'] / row['binomial_se']:.1f} | {row['resamples']:.1f} |")
    bands = " | ".join(f"t/T in [{lo:g}, {min(hi, 1):g}]" for lo, hi in zip(BANDS[:-1], BANDS[1:]))
    out += ["", f"Summed per-step increment variance (mean over seeds) / resamplings per band: | target | steps | rule | {bands} |"]
    for key, row in results.items():
        name, steps, _, rule = key.split("|")
        cells = " | ".join(f"{v:.3g} / {r:.1f}" for v, r in zip(row["band_inc_var"], row["band_resamples"]))
        out.append(f"| {name} | {steps} | {rule} | {cells} |")
    out += ["", "Sd over seeds of the weighted statistic (noised scale) after the move ending at t/T = "
            + ", ".join(f"{e:g}" for e in EDGES) + ", in binomial SEs:"]
    for key, row in results.items():
        name, steps, _, rule = key.split("|")
        out.append(f"| {name} | {steps} | {rule} | " + " | ".join(f"{v / row['binomial_se']:.1f}" for v in row["noised_stat_sd"]) + " |")
    return "\n".join(out)


def robust_table(results: dict, exact: dict) -> str:
    out = ["| target | steps | K | rule | median error | robust spread | robust spread / binomial SE | collapses (> 15 SE off) |",
           "|---|---|---|---|---|---|---|---|"]
    per_rule: dict = {}
    for key, row in results.items():
        name, steps, K, rule = key.split("|")
        m = torch.tensor(row["masses"], dtype=torch.float64)
        med = float(m.median())
        mad = 1.4826 * float((m - med).abs().median())
        far = int(((m - exact[name]).abs() > 15 * row["binomial_se"]).sum())
        out.append(f"| {name} | {steps} | {K} | {rule} | {med - exact[name]:+.4f} | {mad:.4f} | {mad / row['binomial_se']:.1f} | "
                   f"{far} / {m.numel()} |")
        agg = per_rule.setdefault(rule, {"far": 0, "runs": 0, "rmse_ratio": []})
        agg["far"] += far
        agg["runs"] += m.numel()
        best = min(r["rmse"] for k2, r in results.items() if k2.rsplit("|", 1)[0] == key.rsplit("|", 1)[0])
        agg["rmse_ratio"].append(row["rmse"] / best)
    out += ["", "| rule | geometric mean of RMSE / best RMSE over cells | collapses, all cells |", "|---|---|---|"]
    for rule, agg in per_rule.items():
        gm = math.exp(sum(math.log(v) for v in agg["rmse_ratio"]) / len(agg["rmse_ratio"]))
        out.append(f"| {rule} | {gm:.2f} | {agg['far']} / {agg['runs']} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="anneal,cfg,product")
    ap.add_argument("--rules", default=",".join(QUADRATURES))
    ap.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[100, 1000])
    ap.add_argument("--K", type=lambda s: [int(v) for v in s.split(",")], default=[4000, 2000],
                    help="particles per run, one value per --steps entry")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None, metavar="JSON", help="print robust summaries of a stored result and exit")
    args = ap.parse_args(argv)
    if args.report:
        import json

        stored = json.loads(Path(args.report).read_text())
        print(stored["table_md"])
        print(robust_table(stored["results"], {n: c["exact"] for n, c in stored["cases"].items()}))
        return
    if len(args.K) != len(args.steps):
        ap.error(f"--K needs one value per --steps entry ({len(args.steps)}), got {len(args.K)}")
    torch.set_num_threads(1)
    ab = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG).double()
    results, exact = {}, {}
    t_all = time.perf_counter()
    for name in args.cases.split(","):
        c = case(name)
        exact[name] = exact_mass(c)
        for steps, K in zip(args.steps, args.K):
            for rule in args.rules.split(","):
                t0 = time.perf_counter()
                runs = [one_run(c, rule, steps, K, seed, ab) for seed in range(1, args.seeds + 1)]
                row = summarise(runs, exact[name], K)
                row["seconds"] = time.perf_counter() - t0
                results[f"{name}|{steps}|{K}|{rule}"] = row
                print(f"{name:8s} steps={steps:5d} K={K} {rule:9s}: bias {row['bias']:+.4f} spread {row['spread']:.4f} "
                      f"rmse {row['rmse']:.4f} (binomial se {row['binomial_se']:.4f}) resamples {row['resamples']:.1f} "
                      f"band var {[round(v, 3) for v in row['band_inc_var']]} noised sd {[round(v, 4) for v in row['noised_stat_sd']]} "
                      f"({row['seconds']:.0f} s)", flush=True)
    md = table(results, exact)
    print(md)
    print(robust_table(results, exact))
    # ratios: each rule's RMSE over the best rule's, per cell
    for name in args.cases.split(","):
        for steps, K in zip(args.steps, args.K):
            cell = {r: results[f"{name}|{steps}|{K}|{r}"]["rmse"] for r in args.rules.split(",")}
            best = min(cell.values())
            print(f"RMSE ratio to best, {name} {steps} steps: " + ", ".join(f"{r} {v / best:.2f}" for r, v in cell.items()))
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.out:
        write_result(args.out, {"args": vars(args), "quadrature_default": DEFAULTS["quadrature"],
                                "cases": {n: {"exact": exact[n], "betas": list(case(n)["betas"]), "cut": case(n)["cut"]}
                                          for n in exact},
                                "results": results, "table_md": md})


if __name__ == "__main__":
    main()
