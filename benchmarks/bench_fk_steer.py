"""FK steering: the Gaussian-mixture oracle tables and digits-ddpm steered to a class vs best-of-K
(docs/fk_steering.md "Measured").

    python benchmarks/bench_fk_steer.py --out benchmarks/results/fk_steer.json
    python benchmarks/bench_fk_steer.py --part equal-nfe --out benchmarks/results/fk_steer_equal_nfe.json
    python benchmarks/bench_fk_steer.py --part equal-time --out benchmarks/results/fk_steer_equal_time.json
    python benchmarks/bench_fk_steer.py --part anneal --out benchmarks/results/fk_steer_anneal.json
    python benchmarks/bench_fk_steer.py --part flow --particles 16384 --out benchmarks/results/fk_steer_flow.json

1. Oracle: prior 0.8 N((-2, 0), 0.25 I) + 0.2 N((2, 0), 0.25 I), reward -||x - (1, 0)||^2 / (2 * 1.5^2),
   lambda = 1. The tilted law's mass of {x_1 > 0} is known in closed form; each potential and
   K in (1, 4, 16, 64, 256) is run on 32768 particles (32768 / K groups, 250 DDPM steps, exact eps),
   output weighted; standard errors from the spread over groups.
2. digits-ddpm, reward log p(3 | x) of the digits classifier, lambda = 10, 50 steps: fk-steer with
   K particles per group (final resample, and final best) vs best-of-K over unsteered DDPM samples
   (the `ddpm` sampler), 16 groups each: equal NFE (K model rows per step per group). Class-3 rate,
   mean reward, diversity (mean pairwise L2 distance of the outputs, distinct outputs), wall time
   including every reward call. Plus the issue's command (K = 8, -n 64) against best-of-8.
3. --part equal-nfe (deterministic, no clock): K = 4, 8, 16, 16 groups, 50 steps: fk-steer (resample,
   best) vs best-of-K at equal NFE (K model rows per step per group), with digits-FID of each set
   against the real class-3 digits (train + test: what the tilted law approaches) and against the
   whole test split, the reward calls, class-3 rate, mean reward and diversity.
4. --part equal-time (wall clock): for each K, fk-steer (best) is timed with its reward calls;
   best-of-M then gets the same wall time per output sample, M calibrated from one interleaved pass
   of timed fk-steer and best-of-K runs (M = median wall_fk / groups / wall per DDPM sample incl. its
   reward). Then --repeats interleaved repeats (seed r in repeat r, both arms; the arm that runs first
   alternates) so that machine load hits both arms alike: per row the median wall time and its
   spread (min, max over repeats), the paired ratio wall_best-of-M / wall_fk per repeat, the reward
   seconds, the quality columns of 3 (mean and sd over the repeats' seeds) and the load average
   (os.getloadavg) before and after every run.
5. --part anneal: the composition oracle, FKC's annealed target p^beta times exp(lambda r), beta = 2,
   lambda = 1, 16384 particles, 250 steps, K = 1 .. 256; exact mass by 1-D quadrature.
6. --part flow: the oracle of 1 on the flow form of the mixture (FlowMatchEulerDiscreteScheduler grid
   with static shift 3, the exact velocity E[eps - x0 | x_sigma] on the VP twin, the flow SDE move):
   diff for K = 1 .. 256 and max at K = 64, --particles particles each, 250 steps.
"""

from __future__ import annotations

import argparse
import math
import os
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
NFE_FILE = "fk_steer_equal_nfe.json"
TIME_FILE = "fk_steer_equal_time.json"
ANNEAL_FILE = "fk_steer_anneal.json"
FLOW_FILE = "fk_steer_flow.json"
RESULT_FIELDS = {OUT_FILE: ["oracle", "digits", "issue_command"], NFE_FILE: ["equal_nfe"],
                 TIME_FILE: ["equal_time", "equal_time_setup"], FLOW_FILE: ["flow_oracle"],
                 ANNEAL_FILE: ["anneal"]}

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


def flow_oracle(particles: int, steps: int, shift: float = 3.0) -> dict:
    """The oracle of ``oracle`` on the flow form: FlowSchedule grid (static shift), exact velocity."""
    from gensample.core.flow import eps_x0_from_velocity, twin_to_flow
    from gensample.core.schedule import FlowSchedule
    from gensample.models.gmm import flow_scheduler_config

    schedule = FlowSchedule(flow_scheduler_config(shift))
    mix = GaussianMixture(**PRIOR)

    def model_fn(x, t):
        sigma = schedule.sigma_of(t)
        x_flow = twin_to_flow(x.double(), sigma)
        return eps_x0_from_velocity(mix.velocity(x_flow, sigma), x_flow, sigma)

    truth = exact_right_mass()
    rows = []
    print(f"flow oracle (shift {shift}): exact mass {truth:.4f}\n| potential | K | mass | SE | error / SE |\n|---|---|---|---|---|")
    for pot, K in [("diff", k) for k in (1, 4, 16, 64, 256)] + [("max", 64)]:
        G = particles // K
        gen = torch.Generator().manual_seed(0)
        x_T = torch.randn(G * K, 2, generator=gen, dtype=torch.float64)
        res = sample_fk_steer(model_fn, QuadraticReward(CENTER, SCALE), x_T, FKSteerConfig(lam=LAM, potential=pot, final="weighted"),
                              schedule, schedule.grid(steps), group_size=K, noise_generators=gen, resample_generators=gen)
        per = (res.weights * (res.x[:, 0] > 0).double()).reshape(G, K).sum(1)
        m, se = per.mean().item(), (per.std() / math.sqrt(G)).item()
        rows.append({"potential": pot, "K": K, "mass": m, "se": se, "exact": truth})
        print(f"| {pot} | {K} | {m:.4f} | {se:.4f} | {(m - truth) / se:+.1f} |")
    return {"exact_mass": truth, "particles": particles, "steps": steps, "shift": shift, "lambda": LAM, "rows": rows}


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


def _class3_fid(x: np.ndarray) -> float:
    """Frechet distance of the classifier features of x to those of every real class-3 digit (train + test)."""
    from gensample.eval.digits import features
    from gensample.eval.digits_data import real_digits
    from gensample.eval.fid import frechet_distance

    real = np.concatenate([xs[ys == 3] for xs, ys in (real_digits("train"), real_digits("test"))])
    fa, fb = features(x), features(real)
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def _quality(x: np.ndarray) -> dict:
    from gensample.eval.digits import digits_fid

    r = DigitsClassifierReward(3)(torch.from_numpy(x)).numpy()
    div, uniq = _diversity(x)
    return {"n": len(x), "class3_rate": float((classify(x) == 3).mean()), "mean_reward": float(r.mean()),
            "pairwise_l2": div, "distinct": uniq, "fid_class3": _class3_fid(x), "fid_test": digits_fid(x)}


def _fk_run(K: int, groups: int, steps: int, final: str, seed: int = 0):
    n = groups * (1 if final == "best" else K)
    t0 = time.perf_counter()
    res = api.run(sampler="fk-steer", model="digits-ddpm", reward="digits-classifier:3", particles=K, num_samples=n,
                  steps=steps, final=final, seed=seed, progress=False, device="cpu")
    return res, time.perf_counter() - t0


def _best_of_run(M: int, groups: int, steps: int, seed: int = 0):
    """best-of-M: groups * M DDPM samples, the highest reward of each M (the verifier's calls timed too)."""
    reward = DigitsClassifierReward(3)
    t0 = time.perf_counter()
    x = api.run(sampler="ddpm", model="digits-ddpm", num_samples=groups * M, steps=steps, seed=seed, progress=False,
                device="cpu").samples["x"]
    t1 = time.perf_counter()
    r = reward(torch.from_numpy(x)).reshape(groups, M)
    pick = (r.argmax(1) + M * torch.arange(groups)).numpy()
    t2 = time.perf_counter()
    return x[pick], t2 - t0, t2 - t1


def equal_nfe(ks, groups: int, steps: int) -> list:
    """fk-steer vs best-of-K at equal NFE (deterministic: no clock in the result)."""
    rows = []
    print("\nequal NFE | method | K | class-3 | mean log p(3|x) | pairwise L2 | distinct | FID class 3 | FID test | reward evals / output |")
    for K in ks:
        for final in ("resample", "best"):
            res, _ = _fk_run(K, groups, steps, final)
            # reward evaluations (images scored) per output sample: every particle is scored at S + 1 steps
            per_out = (steps + 1) * (K if final == "best" else 1)
            rows.append({"method": f"fk-steer ({final})", "K": K, "groups": groups, "steps": steps,
                         "nfe_rows_per_group_step": K, "reward_evals_per_output": per_out, **_quality(res.samples["x"])})
        x, _, _ = _best_of_run(K, groups, steps)
        rows.append({"method": f"best-of-{K}", "K": K, "groups": groups, "steps": steps, "nfe_rows_per_group_step": K,
                     "reward_evals_per_output": K, **_quality(x)})
        for row in rows[-3:]:
            print(f"| {row['method']} | {K} | {row['class3_rate']:.3f} | {row['mean_reward']:.3f} | {row['pairwise_l2']:.2f} | "
                  f"{row['distinct']}/{row['n']} | {row['fid_class3']:.2f} | {row['fid_test']:.2f} | {row['reward_evals_per_output']} |")
    return rows


def _load() -> list:
    """The 1, 5 and 15 minute load averages (os.getloadavg; None where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


QUALITY_KEYS = ("class3_rate", "mean_reward", "pairwise_l2", "distinct", "fid_class3", "fid_test")


def equal_time(ks, groups: int, steps: int, repeats: int = 3) -> tuple[list, dict]:
    """fk-steer (best) vs best-of-M with M chosen for equal wall time per output sample, reward time
    included; interleaved repeats (module docstring, part 4). Returns (rows, setup)."""
    loads = [{"when": "start", "load": _load()}]
    _fk_run(min(ks), 1, 2, "best")  # warm-up: imports, model load and first-call costs stay out of the clock
    _best_of_run(1, 1, 2)
    calibration, M = {}, {}
    for i, K in enumerate(ks):  # one interleaved calibration pass (the first arm alternates with K)
        arms = [("fk", lambda: _fk_run(K, groups, steps, "best")[1]), ("bo", lambda: _best_of_run(K, groups, steps)[1])]
        walls = {}
        for name, fn in (arms if i % 2 == 0 else arms[::-1]):
            walls[name] = fn()
        per_sample = walls["bo"] / (groups * K)  # wall per DDPM sample with its verifier call
        M[K] = max(1, int(round(walls["fk"] / groups / per_sample)))
        calibration[K] = {"wall_fk_s": walls["fk"], "wall_best_of_K_s": walls["bo"], "per_sample_s": per_sample, "M": M[K]}
    loads.append({"when": "after calibration", "load": _load()})
    runs = {K: {"fk": [], "bo": []} for K in ks}
    for r in range(repeats):
        for i, K in enumerate(ks):
            first_fk = (r + i) % 2 == 0  # alternate which arm runs first: a load change hits both alike
            for arm in (("fk", "bo") if first_fk else ("bo", "fk")):
                load = _load()
                if arm == "fk":
                    res, wall = _fk_run(K, groups, steps, "best", seed=r)
                    x, rsec = res.samples["x"], res.record["stats"]["reward_seconds"]
                else:
                    x, wall, rsec = _best_of_run(M[K], groups, steps, seed=r)
                runs[K][arm].append({"seed": r, "wall_s": wall, "reward_s": rsec, "load_before": load, **_quality(x)})
        loads.append({"when": f"after repeat {r}", "load": _load()})
    rows = []
    print(f"\nequal wall time ({repeats} interleaved repeats; median [min, max]) | method | K or M | wall s | reward s | "
          "best-of-M / fk wall | class-3 | mean log p(3|x) | FID class 3 | pairwise L2 |")
    for K in ks:
        ratio = [b["wall_s"] / f["wall_s"] for f, b in zip(runs[K]["fk"], runs[K]["bo"])]
        for arm, name, extra in (("fk", f"fk-steer (best), K={K}", {"K": K}), ("bo", f"best-of-{M[K]}", {"M": M[K]})):
            rs = runs[K][arm]
            wall = np.array([x["wall_s"] for x in rs])
            row = {"method": name, "groups": groups, "steps": steps, "repeats": repeats, **extra,
                   "wall_s": float(np.median(wall)), "wall_s_min": float(wall.min()), "wall_s_max": float(wall.max()),
                   "reward_s": float(np.median([x["reward_s"] for x in rs])),
                   "wall_ratio_best_of_M_over_fk": {"median": float(np.median(ratio)), "min": float(min(ratio)),
                                                    "max": float(max(ratio))}}
            for key in QUALITY_KEYS:
                v = np.array([x[key] for x in rs], dtype=np.float64)
                row[key], row[key + "_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
            row["calibration"] = calibration[K]
            row["runs"] = rs
            rows.append(row)
            print(f"| {name} | {K if arm == 'fk' else M[K]} | {row['wall_s']:.2f} [{row['wall_s_min']:.2f}, "
                  f"{row['wall_s_max']:.2f}] | {row['reward_s']:.2f} | {np.median(ratio):.2f} | {row['class3_rate']:.3f} | "
                  f"{row['mean_reward']:.3f} | {row['fid_class3']:.1f} | {row['pairwise_l2']:.2f} |")
    setup = {"ks": list(ks), "groups": groups, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
             "load_average": loads, "order": "calibration pass, then per repeat r and K the two arms back to back, "
                                              "the first arm alternating with r + K index"}
    return rows, setup


def anneal_oracle(particles: int, steps: int, ks=(1, 4, 16, 64, 256), beta: float = 2.0, lam: float = 1.0) -> dict:
    """FKC anneal target x reward on the mixture: mass of {x_1 > 0} vs the exact 1-D quadrature."""
    from gensample.samplers.fkc import FKCConfig

    ab = alphas_cumprod_from_config(DEFAULT_SCHEDULER_CONFIG)
    mix = GaussianMixture(**PRIOR)

    def model_fn(x, t):
        a = ab[int(t)].double()
        eps = mix.eps(x.double(), a)
        return eps, x0_from_eps(x.double(), eps, a)

    grid = torch.linspace(-12, 12, 240001, dtype=torch.float64)
    q = sum(w * torch.exp(-(grid - m[0]) ** 2 / (2 * sd**2)) / sd for w, m, sd in zip(PRIOR["weights"], PRIOR["means"], PRIOR["stds"]))
    dens = q**beta * torch.exp(-lam * (grid - CENTER[0]) ** 2 / (2 * SCALE**2))
    truth = float(torch.trapezoid(dens * (grid > 0), grid) / torch.trapezoid(dens, grid))
    rows = []
    print(f"\nanneal beta={beta} x exp({lam} r): exact mass {truth:.4f}\n| K | mass | SE | error / SE |\n|---|---|---|---|")
    for K in ks:
        G = particles // K
        gen = torch.Generator().manual_seed(0)
        x_T = torch.randn(G * K, 2, generator=gen, dtype=torch.float64)
        res = sample_fk_steer(model_fn, QuadraticReward(CENTER, SCALE), x_T, FKSteerConfig(lam=lam, final="weighted"), ab,
                              spaced_timesteps(1000, steps), group_size=K, noise_generators=gen, resample_generators=gen,
                              target=FKCConfig(betas=(beta,)))
        per = (res.weights * (res.x[:, 0] > 0).double()).reshape(G, K).sum(1)
        m, se = per.mean().item(), (per.std() / math.sqrt(G)).item()
        rows.append({"K": K, "mass": m, "se": se})
        print(f"| {K} | {m:.4f} | {se:.4f} | {(m - truth) / se:+.1f} |")
    return {"beta": beta, "lambda": lam, "exact_mass": truth, "particles": particles, "steps": steps, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "equal-nfe", "equal-time", "anneal", "flow"), default="all",
                    help="all: the oracle table, digits and the issue command (fk_steer.json); the others one study each")
    ap.add_argument("--particles", type=int, default=32768, help="oracle particles per (potential, K)")
    ap.add_argument("--oracle-steps", type=int, default=250)
    ap.add_argument("--groups", type=int, default=16, help="digits: groups per method")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ks", default="4,8,16", help="digits: particle counts K (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3, help="equal-time: interleaved timed repeats per arm")
    ap.add_argument("--out", default=None, help="write the result here through _provenance.write_result")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    models = ["digits-ddpm", "digits-classifier"]
    if args.part == "equal-nfe":
        result = {"equal_nfe": equal_nfe(ks, args.groups, args.steps)}
    elif args.part == "equal-time":
        rows, setup = equal_time(ks, args.groups, args.steps, args.repeats)
        result = {"equal_time": rows, "equal_time_setup": setup}
    elif args.part == "anneal":
        result, models = {"anneal": anneal_oracle(args.particles, args.oracle_steps)}, []
    elif args.part == "flow":
        result, models = {"flow_oracle": flow_oracle(args.particles, args.oracle_steps)}, []
    else:
        result = {"oracle": oracle(args.particles, args.oracle_steps), "digits": digits(args.groups, args.steps)}
        fk, bo = steer(8, 8, 50, "resample"), best_of(8, 8, 50)
        print(f"\nissue command (K = 8, -n 64, 50 steps): fk-steer class-3 rate {fk['class3_rate']:.3f} vs best-of-8 "
              f"{bo['class3_rate']:.3f}")
        result["issue_command"] = {"fk_steer": fk, "best_of_8": bo}
    if args.out:
        write_result(args.out, result, models=models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
