"""FKC overhead: time per step of FKC with K particles vs plain sampling of K samples (issue 5).

Same model (a random-weight diffusers UNet2DModel, or any zoo model), same number of steps, same
per-sample generators. Plain = stock diffusers DDIMScheduler(eta=1) loop (= DDPM ancestral);
FKC = annealing beta=2 (one model call per particle per step, like plain) with weights and
resampling every step (the worst case for overhead) and with the default ESS policy. The
overhead attributable to FKC is reported two ways: wall-time ratio, and the time spent outside
model calls (weights, ESS, resampling, move) per step.

    python benchmarks/bench_fkc.py --particles 64 --steps 50 [--device cuda] [--size 32]

`--digits` instead compares FKC-CFG with plain CFG (stock DDIM eta=1, which clips x0 when the model
config says clip_sample=True, and the same CFG drift unclipped) on the `digits-ddpm` zoo model at
equal NFE (same steps, same 2 model rows per sample per step, same number of output samples:
FKC outputs its resampled population of G groups x K particles per class), reporting digits-FID
(gensample.eval.digits) and classifier accuracy for each guidance scale.

    python benchmarks/bench_fkc.py --digits --per-class 64 --particles 8 --steps 100 --scales 2,4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gensample.core.denoiser import Denoiser
from gensample.models.loading import DEFAULT_SCHEDULER_CONFIG
from gensample.samplers.baseline import make_scheduler, scheduler_loop
from gensample.samplers.fkc import FKCConfig, sample_fkc, spaced_timesteps
from gensample.samplers.registry import RunContext


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


def run(args) -> dict:
    device = torch.device(args.device)
    unet = build_unet(args.size, args.channels, device)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    K, steps = args.particles, args.steps
    shape = (args.channels, args.size, args.size)
    ctx = RunContext(sampler="bench", device=device)
    results = {}
    for rep in range(args.repeats):
        # plain: K samples through diffusers DDIM(eta=1)
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
        rec = results.setdefault("plain", [])
        rec.append({"wall": time.perf_counter() - t0, "model": den.model_time})
        for name, policy in (("fkc_every", "every"), ("fkc_ess", "ess")):
            den = TimedDenoiser(unet, ab)
            gens = ctx.generators(range(K))
            x = ctx.randn(gens, shape)
            cfg = FKCConfig(betas=(2.0,), resample=policy, final="resample")
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                sample_fkc(lambda x, t: den(x, t, None)[None], x, cfg, ab, spaced_timesteps(1000, steps), group_size=K,
                           noise_generators=gens, resample_generators=[torch.Generator().manual_seed(1)])
            _sync(device)
            results.setdefault(name, []).append({"wall": time.perf_counter() - t0, "model": den.model_time})
    summary = {"device": str(device), "particles": K, "steps": steps, "shape": list(shape), "repeats": args.repeats}
    plain_wall = min(r["wall"] for r in results["plain"]) / steps
    for name, recs in results.items():
        best = min(recs, key=lambda r: r["wall"])
        summary[name] = {"ms_per_step": 1e3 * best["wall"] / steps,
                         "model_ms_per_step": 1e3 * best["model"] / steps,
                         "outside_model_ms_per_step": 1e3 * (best["wall"] - best["model"]) / steps,
                         "wall_ratio_vs_plain": best["wall"] / steps / plain_wall}
    p = summary["plain"]
    for name in ("fkc_every", "fkc_ess"):
        s = summary[name]
        # FKC's own cost: extra time outside the model relative to plain's whole step
        s["fkc_overhead_vs_plain_step"] = (s["outside_model_ms_per_step"] - p["outside_model_ms_per_step"]) / p["ms_per_step"]
    return summary


def digits_comparison(args) -> dict:
    import numpy as np

    import gensample
    from gensample.eval.digits import class_accuracy, digits_fid

    out = {"model": args.digits_model, "per_class": args.per_class, "particles": args.particles, "steps": args.steps,
           "seed": args.seed, "rows": {}}
    for w in [float(v) for v in args.scales.split(",")]:
        for method in ("cfg", "cfg_noclip", "fkc_cfg"):
            xs, labels, nfe_rows = [], [], 0
            for c in range(10):
                common = dict(model=args.digits_model, steps=args.steps, num_samples=args.per_class, guidance_scale=w,
                              seed=args.seed + 1000 * c, progress=False, device=args.device)
                if method == "cfg":  # stock DDIM(eta=1): follows the model config (digits-ddpm: clip_sample=True)
                    res = gensample.run(sampler="ddim", eta=1.0, class_label=c, **common)
                elif method == "cfg_noclip":  # the same CFG drift without x0 clipping: FKC with no weights
                    res = gensample.run(sampler="fkc", fkc_target="cfg", experts=str(c), particles=args.particles,
                                        resample="never", final="weighted", **common)
                else:
                    res = gensample.run(sampler="fkc", fkc_target="cfg", experts=str(c), particles=args.particles,
                                        final="resample", **common)
                xs.append(res.x)
                labels.append(np.full(len(res.x), c))
                nfe_rows += res.record["stats"].get("model_rows", 0)
            x, lab = np.concatenate(xs), np.concatenate(labels)
            row = {"digits_fid": digits_fid(x), "accuracy": class_accuracy(x, lab), "model_rows": nfe_rows}
            out["rows"][f"{method}_w{w:g}"] = row
            print(f"w={w:g} {method:>8}: digits-FID {row['digits_fid']:.3f}  accuracy {row['accuracy']:.3f}  "
                  f"model rows {nfe_rows}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--digits", action="store_true", help="FKC-CFG vs CFG on digits-ddpm (FID, accuracy)")
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--scales", default="2,4")
    ap.add_argument("--digits-model", default="digits-ddpm")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.digits:
        summary = digits_comparison(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
        return
    summary = run(args)
    print(json.dumps(summary, indent=1))
    for name in ("plain", "fkc_every", "fkc_ess"):
        s = summary[name]
        extra = f", FKC overhead {100 * s['fkc_overhead_vs_plain_step']:+.1f}% of a plain step" if name != "plain" else ""
        print(f"{name:>10}: {s['ms_per_step']:.2f} ms/step (model {s['model_ms_per_step']:.2f}), "
              f"x{s['wall_ratio_vs_plain']:.3f} vs plain{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
