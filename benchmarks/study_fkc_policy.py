"""Resampling-policy / weight-rule study for FKC (docs/fkc.md "Resampling policy").

1-D two-mode mixture M = .5 N(-2, .3^2) + .5 N(2, .8^2), target p^beta, DDPM (DDIM eta=1) steps,
K particles, several seeds. Reports the mean and seed spread of the weighted mass P(x > 0), mean
and variance against the exact target (grid of 40001 points over [-10, 10]). The weight rule of
every policy is the sampler's default (``FKCConfig().quadrature``) unless the policy names one.

    python benchmarks/study_fkc_policy.py --K 2000 --steps 250 --seeds 6 --out benchmarks/results/fkc_policy.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import write_result  # noqa: E402

from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.gmm import GaussianMixture
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG
from gensample.samplers.fkc import DEFAULTS, FKCConfig, sample_fkc, spaced_timesteps

MIX = GaussianMixture([0.5, 0.5], [[-2.0], [2.0]], [0.3, 0.8])
POLICIES = {
    "every": dict(resample="every"),
    "ess0.3": dict(resample="ess", ess_threshold=0.3),
    "ess0.5": dict(resample="ess", ess_threshold=0.5),
    "ess0.7": dict(resample="ess", ess_threshold=0.7),
    "ess0.9": dict(resample="ess", ess_threshold=0.9),
    "every_t>=0.1": dict(resample="every", window=(1.0, 0.1)),
    "ess0.7_euler": dict(resample="ess", ess_threshold=0.7, quadrature="euler"),
    "every_euler": dict(resample="every", quadrature="euler"),
}
RESULT_FIELDS = {"fkc_policy.json": ["K", "steps", "seeds", "quadrature_default", "results"]}


def grid_target(beta: float):
    g = torch.linspace(-10, 10, 40001, dtype=torch.float64)
    lp = beta * MIX.log_prob(g[:, None])
    p = torch.exp(lp - lp.max())
    p /= p.sum()
    mean = (p * g).sum()
    return {"mass": float((p * (g > 0)).sum()), "mean": float(mean), "var": float((p * (g - mean) ** 2).sum())}


def one_run(beta: float, K: int, steps: int, seed: int, **kw) -> dict:
    ab = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)
    ts = spaced_timesteps(1000, steps)
    cfg = FKCConfig(betas=(beta,), final="weighted", **kw)
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(K, 1, generator=gen)
    res = sample_fkc(lambda x, t: MIX.eps(x.double(), ab[int(t)]).float()[None], x_T, cfg, ab, ts, group_size=K,
                     noise_generators=gen, resample_generators=[torch.Generator().manual_seed(seed + 10_000)])
    w, x = res.weights, res.x[:, 0].double()
    mean = (w * x).sum()
    return {"mass": float((w * (x > 0)).sum()), "mean": float(mean), "var": float((w * (x - mean) ** 2).sum()),
            "resamples": int(res.resampled.sum()), "min_ess": float(res.ess.min())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--K", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--betas", default="2,3")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {"K": args.K, "steps": args.steps, "seeds": args.seeds, "quadrature_default": DEFAULTS["quadrature"], "results": {}}
    for beta in [float(b) for b in args.betas.split(",")]:
        tgt = grid_target(beta)
        report["results"][str(beta)] = {"target": tgt}
        for name in args.policies.split(","):
            t0 = time.perf_counter()
            runs = [one_run(beta, args.K, args.steps, s, **POLICIES[name]) for s in range(args.seeds)]
            mass = torch.tensor([r["mass"] for r in runs], dtype=torch.float64)
            var = torch.tensor([r["var"] for r in runs], dtype=torch.float64)
            row = {"mass_mean": float(mass.mean()), "mass_sd": float(mass.std()),
                   "mass_max_abs_err": float((mass - tgt["mass"]).abs().max()),
                   "var_mean": float(var.mean()), "var_sd": float(var.std()),
                   "resamples_mean": sum(r["resamples"] for r in runs) / len(runs), "runs": runs,
                   "seconds": time.perf_counter() - t0}
            report["results"][str(beta)][name] = row
            print(f"beta={beta} {name:>18}: mass {row['mass_mean']:.4f} +- {row['mass_sd']:.4f} "
                  f"(target {tgt['mass']:.4f}, worst |err| {row['mass_max_abs_err']:.4f}); var {row['var_mean']:.3f} "
                  f"+- {row['var_sd']:.3f} (target {tgt['var']:.3f}); resamples {row['resamples_mean']:.0f}", flush=True)
    if args.out:
        write_result(args.out, report)


if __name__ == "__main__":
    main()
