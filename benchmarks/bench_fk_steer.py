"""FK steering: the Gaussian-mixture oracle table and digits-ddpm steered to a class vs best-of-K
(docs/fk_steering.md "Measured").

    python benchmarks/bench_fk_steer.py --out benchmarks/results/fk_steer.json

1. Oracle: prior 0.8 N((-2, 0), 0.25 I) + 0.2 N((2, 0), 0.25 I), reward -||x - (1, 0)||^2 / (2 * 1.5^2),
   lambda = 1. The tilted law's mass of {x_1 > 0} is known in closed form; each potential and
   K in (1, 4, 16, 64, 256) is run on 32768 particles (32768 / K groups, 250 DDPM steps, exact eps),
   output weighted; standard errors from the spread over groups.
2. digits-ddpm, reward log p(3 | x) of the digits classifier, lambda = 10, 50 steps: fk-steer with
   K particles per group (final resample, and final best) vs best-of-K over unsteered DDPM samples
   (the `ddpm` sampler), 16 groups each: equal NFE (K model rows per step per group). Class-3 rate,
   mean reward, diversity (mean pairwise L2 distance of the outputs, distinct outputs), wall time
   including every reward call. Plus the issue's command (K = 8, -n 64) against best-of-8.
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

from gensample import api  # noqa: E402
from gensample.core.ddim import x0_from_eps  # noqa: E402
from gensample.core.schedule import alphas_cumprod_from_config  # noqa: E402
from gensample.eval.digits import classify  # noqa: E402
from gensample.models.gmm import GaussianMixture  # noqa: E402
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG  # noqa: E402
from gensample.rewards import DigitsClassifierReward, QuadraticReward  # noqa: E402
from gensample.samplers.fk_steer import POTENTIALS, FKSteerConfig, sample_fk_steer  # noqa: E402
from gensample.samplers.fkc import spaced_timesteps  # noqa: E402

OUT_FILE = "fk_steer.json"
RESULT_FIELDS = {OUT_FILE: ["oracle", "digits", "issue_command"]}

PRIOR = dict(weights=[0.8, 0.2], means=[[-2.0, 0.0], [2.0, 0.0]], stds=[0.5, 0.5])
CENTER, SCALE, LAM = [1.0, 0.0], 1.5, 1.0


def exact_right_mass() -> float:
    """Mass of {x_1 > 0} under p(x) exp(lambda r(x)): the tilted mixture (docs/fk_steering.md "Oracle")."""
    pi = torch.tensor(PRIOR["weights"], dtype=torch.float64)
    mu = torch.tensor(PRIOR["means"], dtype=torch.float64)
    v = torch.tensor(PRIOR["stds"], dtype=torch.float64) ** 2
    c = torch.tensor(CENTER, dtype=torch.float64)
    v2 = 1 / (1 / v + LAM / SCALE**2)
    mu2 = v2[:, None] * (mu / v[:, None] + LAM * c / SCALE**2)
    wide = v + SCALE**2 / LAM
    pi2 = torch.softmax(pi.log() - torch.log(wide) - ((c - mu) ** 2).sum(1) / (2 * wide), 0)  # d = 2: (2 pi wide)^(-1)
    return float((pi2 * 0.5 * (1 + torch.erf(mu2[:, 0] / (v2.sqrt() * math.sqrt(2))))).sum())


def oracle(particles: int, steps: int) -> dict:
    ab = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)
    mix = GaussianMixture(**PRIOR)

    def model_fn(x, t):
        a = ab[int(t)].double()
        eps = mix.eps(x.double(), a)
        return eps, x0_from_eps(x.double(), eps, a)

    truth = exact_right_mass()
    rows = []
    print(f"oracle: exact mass of x_1 > 0 = {truth:.4f} (prior 0.2)\n| potential | K | mass | SE | error / SE |\n|---|---|---|---|---|")
    for pot in POTENTIALS:
        for K in (1, 4, 16, 64, 256):
            G = particles // K
            gen = torch.Generator().manual_seed(0)
            x_T = torch.randn(G * K, 2, generator=gen, dtype=torch.float64)
            res = sample_fk_steer(model_fn, QuadraticReward(CENTER, SCALE), x_T, FKSteerConfig(lam=LAM, potential=pot, final="weighted"),
                                  ab, spaced_timesteps(1000, steps), group_size=K, noise_generators=gen, resample_generators=gen)
            per = (res.weights * (res.x[:, 0] > 0).double()).reshape(G, K).sum(1)
            m, se = per.mean().item(), (per.std() / math.sqrt(G)).item()
            rows.append({"potential": pot, "K": K, "mass": m, "se": se, "exact": truth})
            z = f"{(m - truth) / se:+.1f}" if se > 0 else "n/a (all groups agree)"
            print(f"| {pot} | {K} | {m:.4f} | {se:.4f} | {z} |")
    return {"exact_mass": truth, "particles": particles, "steps": steps, "lambda": LAM, "rows": rows}


def _diversity(x: np.ndarray) -> tuple[float, int]:
    flat = x.reshape(len(x), -1).astype(np.float64)
    d = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))
    n = len(flat)
    return float(d.sum() / max(n * (n - 1), 1)), int(len(np.unique(flat.round(5), axis=0)))


def _summary(x: np.ndarray, reward, wall: float) -> dict:
    r = reward(torch.from_numpy(x)).numpy()
    div, uniq = _diversity(x)
    return {"n": len(x), "class3_rate": float((classify(x) == 3).mean()), "mean_reward": float(r.mean()),
            "pairwise_l2": div, "distinct": uniq, "wall_s": wall}


def steer(K: int, groups: int, steps: int, final: str, seed: int = 0) -> dict:
    n = groups * (1 if final == "best" else K)
    t0 = time.perf_counter()
    res = api.run(sampler="fk-steer", model="digits-ddpm", reward="digits-classifier:3", particles=K, num_samples=n,
                  steps=steps, final=final, seed=seed, progress=False, device="cpu")
    wall = time.perf_counter() - t0
    return _summary(res.samples["x"], DigitsClassifierReward(3), wall)


def best_of(K: int, groups: int, steps: int, seed: int = 0) -> dict:
    reward = DigitsClassifierReward(3)
    t0 = time.perf_counter()
    x = api.run(sampler="ddpm", model="digits-ddpm", num_samples=groups * K, steps=steps, seed=seed, progress=False,
                device="cpu").samples["x"]
    r = reward(torch.from_numpy(x)).reshape(groups, K)  # the verifier's calls are part of the cost
    pick = (r.argmax(1) + K * torch.arange(groups)).numpy()
    wall = time.perf_counter() - t0
    return _summary(x[pick], reward, wall)


def digits(groups: int, steps: int) -> list:
    rows = []
    print("\ndigits-ddpm -> class 3 | method | K | class-3 rate | mean log p(3|x) | pairwise L2 | distinct | wall s |")
    for K in (4, 8, 16):
        for name, rec in (("fk-steer (resample)", steer(K, groups, steps, "resample")),
                          ("fk-steer (best)", steer(K, groups, steps, "best")),
                          (f"best-of-{K}", best_of(K, groups, steps))):
            rows.append({"method": name, "K": K, "groups": groups, "steps": steps, **rec})
            print(f"| {name} | {K} | {rec['class3_rate']:.3f} | {rec['mean_reward']:.3f} | {rec['pairwise_l2']:.2f} | "
                  f"{rec['distinct']}/{rec['n']} | {rec['wall_s']:.1f} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=32768, help="oracle particles per (potential, K)")
    ap.add_argument("--oracle-steps", type=int, default=250)
    ap.add_argument("--groups", type=int, default=16, help="digits: groups per method")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=None, help="write the result here through _provenance.write_result")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = {"oracle": oracle(args.particles, args.oracle_steps), "digits": digits(args.groups, args.steps)}
    fk, bo = steer(8, 8, 50, "resample"), best_of(8, 8, 50)
    print(f"\nissue command (K = 8, -n 64, 50 steps): fk-steer class-3 rate {fk['class3_rate']:.3f} vs best-of-8 "
          f"{bo['class3_rate']:.3f}")
    result["issue_command"] = {"fk_steer": fk, "best_of_8": bo}
    if args.out:
        write_result(args.out, result, models=["digits-ddpm", "digits-classifier"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
