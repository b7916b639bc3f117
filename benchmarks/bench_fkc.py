"""FKC benchmarks: paired, interleaved overhead timing, and FKC-CFG vs plain CFG on digits-ddpm.

Overhead (default mode). Same random-weight diffusers UNet2DModel, same steps, same per-sample
generators. Arm A = plain: stock diffusers DDIMScheduler(eta=1) loop (= DDPM ancestral) on K
samples; arm B = FKC annealing beta=2 on K particles (one model call per particle per step, like
plain) with weights and resampling, policy ``--policy`` (every step: the worst case; or the
default ESS rule). The arms run interleaved A B B A A B ... (the order flips every repeat, so
slow drifts in machine load hit both arms alike), ``--repeats`` pairs; each pair gives one ratio
B / A of the wall time per step. Reported: median and spread (min..max and interquartile range)
of the per-pair ratios, and of the time spent outside model calls. An overhead whose size is
below the spread of the ratios is reported as "within noise", not as a number (the same rule for
the time outside model calls).

    python benchmarks/bench_fkc.py --particles 16 --steps 10 --size 16 --repeats 20 \
        --out benchmarks/results/bench_fkc_cpu.json

Digits (``--digits``). FKC-CFG against plain CFG (stock DDIM eta=1; the shipped digits-ddpm config
has clip_sample=false, so this is the same CFG drift without weights) at equal NFE: same steps,
the same 2 model rows per sample per step, the same number of output samples (FKC outputs its
resampled population, G groups x K particles per class). For every seed in ``--seeds`` (each
seed gives every method the same per-class seeds), digits-FID (gensample.eval.digits, against the
test split) and classifier accuracy; the table reports mean and sd over seeds and the paired
FID difference FKC - CFG per seed.

    python benchmarks/bench_fkc.py --digits --per-class 16 --particles 8 --steps 25 --scales 2,4 \
        --seeds 0,1,2 --out benchmarks/results/fkc_digits.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _provenance import write_result  # noqa: E402

from gensample.core.denoiser import Denoiser  # noqa: E402
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG  # noqa: E402
from gensample.samplers.baseline import make_scheduler, scheduler_loop  # noqa: E402
from gensample.samplers.fkc import FKCConfig, sample_fkc, spaced_timesteps  # noqa: E402
from gensample.samplers.registry import RunContext  # noqa: E402

RESULT_FIELDS = {
    "bench_fkc_cpu.json": ["device", "particles", "steps", "shape", "repeats", "policy", "order", "pairs", "summary", "verdict"],
    "fkc_digits.json": ["model", "per_class", "particles", "steps", "seeds", "scales", "runs", "table"],
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_unet(size: int, channels: int, device):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return unet.to(device).eval()


class TimedDenoiser(Denoiser):
    """Denoiser that accumulates wall time spent inside model calls."""

    model_time = 0.0

    def _raw(self, x_t, t, cond):
        _sync(x_t.device)
        t0 = time.perf_counter()
        out = super()._raw(x_t, t, cond)
        _sync(x_t.device)
        self.model_time += time.perf_counter() - t0
        return out


def _quantiles(vals: list[float]) -> dict:
    v = sorted(vals)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2]}


def spread_of(q: dict, n_pairs: int) -> float:
    """The spread an overhead is judged against: the interquartile range of the per-pair values
    from 4 pairs on, else their full range."""
    return q["q3"] - q["q1"] if n_pairs >= 4 else q["max"] - q["min"]


def noise_verdict(overhead: float, spread: float, what: str) -> str:
    """"within noise" when |overhead| <= spread, else the overhead as a signed percentage."""
    return "within noise" if abs(overhead) <= spread else f"{100 * overhead:+.1f}% {what}"


def overhead(args) -> dict:
    device = torch.device(args.device)
    unet = build_unet(args.size, args.channels, device)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    K, steps = args.particles, args.steps
    shape = (args.channels, args.size, args.size)
    ctx = RunContext(sampler="bench", device=device)

    def plain():
        den = TimedDenoiser(unet, ab)
        gens = ctx.generators(range(K))
        sched = make_scheduler("ddim", DEFAULT_SCHEDULER_CONFIG)
        sched.set_timesteps(steps)
        x = ctx.randn(gens, shape)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            scheduler_loop(den, sched, x, None, 1.0, gens, ctx, eta=1.0)
        _sync(device)
        return time.perf_counter() - t0, den.model_time

    def fkc():
        den = TimedDenoiser(unet, ab)
        gens = ctx.generators(range(K))
        x = ctx.randn(gens, shape)
        cfg = FKCConfig(betas=(2.0,), resample=args.policy)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            sample_fkc(lambda x, t: den(x, t, None)[None], x, cfg, ab, spaced_timesteps(1000, steps), group_size=K,
                       noise_generators=gens, resample_generators=[torch.Generator().manual_seed(1)])
        _sync(device)
        return time.perf_counter() - t0, den.model_time

    plain(), fkc()  # warm-up, not recorded
    pairs, order = [], []
    for rep in range(args.repeats):
        arms = ("plain", "fkc") if rep % 2 == 0 else ("fkc", "plain")
        order.append("".join("A" if a == "plain" else "B" for a in arms))
        rec = {}
        for arm in arms:
            wall, model = (plain if arm == "plain" else fkc)()
            rec[arm] = {"ms_per_step": 1e3 * wall / steps, "model_ms_per_step": 1e3 * model / steps,
                        "outside_model_ms_per_step": 1e3 * (wall - model) / steps}
        rec["wall_ratio"] = rec["fkc"]["ms_per_step"] / rec["plain"]["ms_per_step"]
        rec["outside_model_extra_ms"] = rec["fkc"]["outside_model_ms_per_step"] - rec["plain"]["outside_model_ms_per_step"]
        rec["outside_model_extra_vs_plain_step"] = rec["outside_model_extra_ms"] / rec["plain"]["ms_per_step"]
        pairs.append(rec)
        print(f"pair {rep} ({order[-1]}): plain {rec['plain']['ms_per_step']:.1f} ms/step, fkc {rec['fkc']['ms_per_step']:.1f} "
              f"ms/step, ratio {rec['wall_ratio']:.3f}, extra outside model {rec['outside_model_extra_ms']:+.2f} ms", flush=True)
    ratio = _quantiles([p["wall_ratio"] for p in pairs])
    extra = _quantiles([p["outside_model_extra_vs_plain_step"] for p in pairs])
    summary = {"wall_ratio": ratio, "outside_model_extra_vs_plain_step": extra,
               "plain_ms_per_step": _quantiles([p["plain"]["ms_per_step"] for p in pairs]),
               "fkc_ms_per_step": _quantiles([p["fkc"]["ms_per_step"] for p in pairs])}
    spread = spread_of(ratio, len(pairs))
    verdict = noise_verdict(ratio["median"] - 1.0, spread, "wall time (median of paired ratios)")
    extra_verdict = noise_verdict(extra["median"], spread_of(extra, len(pairs)),
                                  "of a plain step outside model calls (median of pairs)")
    return {"device": str(device), "particles": K, "steps": steps, "shape": list(shape), "repeats": args.repeats,
            "policy": args.policy, "order": order, "pairs": pairs, "summary": summary,
            "verdict": {"wall_overhead": verdict, "median_ratio": ratio["median"], "spread_used": spread,
                        "outside_model_extra": extra_verdict, "outside_model_extra_median": extra["median"],
                        "outside_model_extra_spread": spread_of(extra, len(pairs)),
                        "spread_kind": "interquartile range" if len(pairs) >= 4 else "min..max"}}


def digits_comparison(args) -> dict:
    import numpy as np

    import gensample
    from gensample.eval.digits import class_accuracy, digits_fid

    seeds = [int(s) for s in args.seeds.split(",")]
    scales = [float(v) for v in args.scales.split(",")]
    runs = []
    for seed in seeds:
        for w in scales:
            for method in ("cfg", "fkc_cfg"):
                xs, labels, rows = [], [], 0
                t0 = time.perf_counter()
                for c in range(10):
                    common = dict(model=args.digits_model, steps=args.steps, num_samples=args.per_class, guidance_scale=w,
                                  seed=seed * 100_000 + 1000 * c, progress=False, device=args.device)
                    if method == "cfg":  # stock DDIM(eta=1), the model's own config (clip_sample=false)
                        res = gensample.run(sampler="ddim", eta=1.0, class_label=c, **common)
                    else:
                        res = gensample.run(sampler="fkc", fkc_target="cfg", experts=str(c), particles=args.particles,
                                            final="resample", **common)
                    xs.append(res.x)
                    labels.append(np.full(len(res.x), c))
                    rows += res.record["stats"].get("model_rows", 0)
                x, lab = np.concatenate(xs), np.concatenate(labels)
                run = {"seed": seed, "w": w, "method": method, "digits_fid": digits_fid(x), "accuracy": class_accuracy(x, lab),
                       "model_rows": rows, "n": int(len(x)), "seconds": time.perf_counter() - t0}
                runs.append(run)
                print(f"seed {seed} w={w:g} {method:>8}: digits-FID {run['digits_fid']:.3f}  accuracy {run['accuracy']:.3f}  "
                      f"model rows {rows}  {run['seconds']:.0f} s", flush=True)
    table = {}
    for w in scales:
        cell = {}
        for method in ("cfg", "fkc_cfg"):
            fid = [r["digits_fid"] for r in runs if r["w"] == w and r["method"] == method]
            acc = [r["accuracy"] for r in runs if r["w"] == w and r["method"] == method]
            cell[method] = {"fid_mean": statistics.mean(fid), "fid_sd": statistics.stdev(fid) if len(fid) > 1 else None,
                            "acc_mean": statistics.mean(acc), "acc_sd": statistics.stdev(acc) if len(acc) > 1 else None}
        diff = [next(r["digits_fid"] for r in runs if r["w"] == w and r["seed"] == s and r["method"] == "fkc_cfg")
                - next(r["digits_fid"] for r in runs if r["w"] == w and r["seed"] == s and r["method"] == "cfg") for s in seeds]
        cell["paired_fid_diff_fkc_minus_cfg"] = {"per_seed": diff, "mean": statistics.mean(diff),
                                                 "sd": statistics.stdev(diff) if len(diff) > 1 else None}
        table[f"w{w:g}"] = cell
    return {"model": args.digits_model, "per_class": args.per_class, "particles": args.particles, "steps": args.steps,
            "seeds": seeds, "scales": scales, "runs": runs, "table": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=6, help="interleaved A/B pairs")
    ap.add_argument("--policy", choices=("every", "ess"), default="every", help="FKC resampling policy in the timed arm")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the result here through _provenance.write_result")
    ap.add_argument("--digits", action="store_true", help="FKC-CFG vs CFG on digits-ddpm (FID, accuracy, seed spread)")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--scales", default="2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--digits-model", default="digits-ddpm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.digits:
        result = digits_comparison(args)
        for w, cell in result["table"].items():
            d = cell["paired_fid_diff_fkc_minus_cfg"]
            print(f"{w}: CFG FID {cell['cfg']['fid_mean']:.2f} +- {cell['cfg']['fid_sd'] or 0:.2f}, FKC-CFG "
                  f"{cell['fkc_cfg']['fid_mean']:.2f} +- {cell['fkc_cfg']['fid_sd'] or 0:.2f}; paired FKC - CFG "
                  f"{d['mean']:+.2f} +- {d['sd'] or 0:.2f}")
        if args.out:
            write_result(args.out, result, models=[args.digits_model, "digits-classifier"])
        return
    result = overhead(args)
    s = result["summary"]
    print(f"wall ratio FKC / plain: median {s['wall_ratio']['median']:.3f} (IQR {s['wall_ratio']['q1']:.3f}..{s['wall_ratio']['q3']:.3f}, "
          f"range {s['wall_ratio']['min']:.3f}..{s['wall_ratio']['max']:.3f}) -> {result['verdict']['wall_overhead']}")
    e = s["outside_model_extra_vs_plain_step"]
    print(f"FKC's extra time outside model calls / plain step: median {100 * e['median']:+.1f}% (IQR "
          f"{100 * e['q1']:+.1f}..{100 * e['q3']:+.1f}%) -> {result['verdict']['outside_model_extra']}")
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
