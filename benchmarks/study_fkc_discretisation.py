"""FKC discretisation bias: the exact infinite-K Gaussian recursion of each weight rule against
Monte Carlo (docs/fkc.md "Discretisation bias").

Data N(1, 0.25), target p^3 = N(1, 0.0833), DDPM move (eta = 1), exact scores. For every weight
rule of ``FKCConfig.quadrature`` and several step counts: the K -> inf target variance of the
implemented scheme (gensample.eval.fkc_gaussian, closed form), on the default linear schedule
(leading spacing) and on its zero-terminal-SNR rescaling (trailing spacing, v-prediction form);
and a Monte Carlo check (resampling every step, ``--groups`` independent groups of ``--K``
particles) for the euler and logsnr rules, mean and sd over groups.

    python benchmarks/study_fkc_discretisation.py --K 8000 --groups 4 --out benchmarks/results/fkc_discretisation.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import write_result  # noqa: E402

from gensample.core.schedule import alphas_cumprod_from_config  # noqa: E402
from gensample.eval.fkc_gaussian import infinite_k_anneal  # noqa: E402
from gensample.models.gmm import GaussianMixture  # noqa: E402
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG  # noqa: E402
from gensample.samplers.fkc import DEFAULTS, QUADRATURES, FKCConfig, sample_fkc, spaced_timesteps  # noqa: E402

RESULT_FIELDS = {"fkc_discretisation.json": ["data", "beta", "target_var", "default_rule", "recursion", "recursion_zero_snr",
                                             "monte_carlo"]}
M, S2, BETA = 1.0, 0.25, 3.0


def monte_carlo(rule: str, steps: int, K: int, G: int, seed: int = 0) -> dict:
    ab = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)
    g = GaussianMixture([1.0], [[M]], [S2**0.5])
    cfg = FKCConfig(betas=(BETA,), final="weighted", resample="every", quadrature=rule)
    gen = torch.Generator().manual_seed(seed)
    res = sample_fkc(lambda x, t: g.eps(x.double(), ab[int(t)]).float()[None], torch.randn(G * K, 1, generator=gen), cfg,
                     ab, spaced_timesteps(1000, steps), group_size=K, noise_generators=gen,
                     resample_generators=[torch.Generator().manual_seed(seed + 1 + i) for i in range(G)])
    x, w = res.x[:, 0].double().reshape(G, K), res.weights.reshape(G, K)
    var = (w * (x - (w * x).sum(1, keepdim=True)) ** 2).sum(1)
    return {"mean": float(var.mean()), "sd": float(var.std()), "per_group": var.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=8000)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--steps", default="50,100,250,1000")
    ap.add_argument("--mc-steps", default="100,250")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = [int(s) for s in args.steps.split(",")]
    ab = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)
    ab_z = alphas_cumprod_from_config(dict(DEFAULT_SCHEDULER_CONFIG, rescale_betas_zero_snr=True))
    rec, rec_z, mc = {}, {}, {}
    for rule in QUADRATURES:
        rec[rule] = {str(s): infinite_k_anneal(M, S2, BETA, ab, spaced_timesteps(1000, s), rule=rule)["var"] for s in steps}
        rec_z[rule] = {str(s): infinite_k_anneal(M, S2, BETA, ab_z, spaced_timesteps(1000, s, "trailing"), rule=rule,
                                                 x0_form=True)["var"] for s in steps}
        print(f"{rule:>9}: " + "  ".join(f"{s}: {rec[rule][str(s)]:.4f}" for s in steps)
              + "   zero-SNR: " + "  ".join(f"{s}: {rec_z[rule][str(s)]:.4f}" for s in steps), flush=True)
    for rule in ("euler", "logsnr"):
        mc[rule] = {}
        for s in [int(v) for v in args.mc_steps.split(",")]:
            mc[rule][str(s)] = monte_carlo(rule, s, args.K, args.groups)
            print(f"MC {rule} {s} steps: {mc[rule][str(s)]['mean']:.4f} +- {mc[rule][str(s)]['sd']:.4f} "
                  f"(recursion {infinite_k_anneal(M, S2, BETA, ab, spaced_timesteps(1000, s), rule=rule)['var']:.4f})", flush=True)
    result = {"data": {"mean": M, "var": S2}, "beta": BETA, "target_var": S2 / BETA, "default_rule": DEFAULTS["quadrature"],
              "recursion": rec, "recursion_zero_snr": rec_z,
              "monte_carlo": {"K": args.K, "groups": args.groups, "resample": "every", "results": mc}}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
