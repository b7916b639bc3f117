"""Time-Shift benchmarks (docs/time_shift.md "Measured").

    python benchmarks/bench_time_shift.py overhead [--model digits-ddpm] [--batch 256] [--steps 20]
        per-step wall time of ts-ddim / ddim on the same model in one process (target <= 3 %).
    python benchmarks/bench_time_shift.py eval [--config configs/eval_time_shift.yaml] [--out FILE.json]
        digits-FID of every (entry, steps, seed) cell of a `gensample eval` recipe: ddim vs ts-ddim
        (both variants) vs epsilon scaling, plus the window / cutoff sweep. `gensample.api.run` per cell.
    python benchmarks/bench_time_shift.py diag [--model digits-ddpm] [-n 256] [--steps 10]
        exposure-bias diagnostic: v_hat of sampled x_t (ddim, ts-ddim) vs forward-noised data.
    python benchmarks/bench_time_shift.py summary FILE.json [FILE.json ...]
        markdown table, mean +- std over seeds.
    python benchmarks/bench_time_shift.py dataaware [--models digits-ddpm digits-ldm] [--steps 10 20]
            [--seeds 0 1 2] [-n 1000] [--out benchmarks/results/time_shift_data_aware.json]
        the data-aware statistic (reference (1 - ab) + ab Var_data, Var_data estimated once from the
        model ("auto") or measured on the training data ("given")) vs the paper's statistic vs DDIM:
        digits-FID per (model, steps, seed), paired against DDIM (same seeds = same start noise).

Single-threaded by default (``--threads``) so that numbers from a shared machine stay comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA_AWARE_FILE = "time_shift_data_aware.json"
RESULT_FIELDS = {DATA_AWARE_FILE: ["num_samples", "steps", "seeds", "models", "data_var_given", "rows", "paired", "skipped"]}


def pick_model(name: str | None) -> str:
    from gensample import zoo
    from gensample.models.loading import _ensure_registered

    _ensure_registered()
    if name:
        return name
    return "digits-ddpm" if "digits-ddpm" in zoo.ZOO else "gmm-digits"


# -- overhead ---------------------------------------------------------------------------------
def overhead(model_name: str, batch: int, steps: int, repeats: int, window: int, cutoff: int) -> dict:
    from gensample.models.loading import load_model
    from gensample.samplers.baseline import make_scheduler, scheduler_loop
    from gensample.samplers.registry import RunContext
    from gensample.samplers.time_shift import sample_time_shift
    from gensample.schedulers.time_shift import make_time_shift_scheduler

    model = load_model(model_name)
    den = model.denoiser()
    ctx = RunContext("bench")
    gens = ctx.generators(range(batch))
    x_T = ctx.randn(gens, model.event_shape)
    cond = model.cond_for(None, batch, ctx.device)

    def run_ddim():
        s = make_scheduler("ddim", model.scheduler_config)
        s.set_timesteps(steps)
        return scheduler_loop(den, s, x_T, cond, 1.0, None, ctx)

    def run_ts():
        s = make_time_shift_scheduler(model.scheduler_config, window_size=window, cutoff=cutoff)
        s.set_timesteps(steps)
        return sample_time_shift(den, x_T, s, cond=cond)[0]

    times = {"ddim": [], "ts-ddim": []}
    with torch.no_grad():
        run_ddim(), run_ts()  # warm-up
        for r in range(repeats):  # interleaved, alternating order
            order = (("ddim", run_ddim), ("ts-ddim", run_ts)) if r % 2 == 0 else (("ts-ddim", run_ts), ("ddim", run_ddim))
            for name, fn in order:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) / steps)
    # Decomposition, robust on a shared machine: the scheduler's own per-step cost (fixed eps, no
    # model) for each sampler, and the model call alone; ratio = (model + ts) / (model + ddim).
    eps_fixed = den(x_T, torch.tensor(500), cond)
    sched_t = {"ddim": [], "ts-ddim": []}
    with torch.no_grad():
        for _ in range(max(repeats, 5)):
            s = make_scheduler("ddim", model.scheduler_config)
            s.set_timesteps(steps)
            x, t0 = x_T, time.perf_counter()
            for t in s.timesteps:
                x = s.step(eps_fixed, t, x).prev_sample
            sched_t["ddim"].append((time.perf_counter() - t0) / steps)
            s = make_time_shift_scheduler(model.scheduler_config, window_size=window, cutoff=cutoff)
            s.set_timesteps(steps)
            x, t0 = x_T, time.perf_counter()
            for t in s.timesteps:
                t_s = s.model_timesteps(x, t)
                x = s.step(eps_fixed, t, x, model_timesteps=t_s).prev_sample
            sched_t["ts-ddim"].append((time.perf_counter() - t0) / steps)
        model_t = []
        for _ in range(max(repeats, 5)):
            t0 = time.perf_counter()
            den(x_T, torch.tensor(500), cond)
            model_t.append(time.perf_counter() - t0)
    res = {"model": model_name, "batch": batch, "steps": steps, "repeats": repeats, "window": window, "cutoff": cutoff,
           "per_step_s": {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()},
           "scheduler_only_s": {k: min(v) for k, v in sched_t.items()}, "model_call_s": min(model_t)}
    m, so = res["model_call_s"], res["scheduler_only_s"]
    res["ratio_decomposed"] = (m + so["ts-ddim"]) / (m + so["ddim"])
    res["ratio_min"] = res["per_step_s"]["ts-ddim"]["min"] / res["per_step_s"]["ddim"]["min"]
    res["ratio_median"] = res["per_step_s"]["ts-ddim"]["median"] / res["per_step_s"]["ddim"]["median"]
    return res


# -- exposure-bias diagnostic ------------------------------------------------------------------
def variance_diagnostic(model_name: str, n: int, steps: int) -> list:
    """Per step: batch mean and sd of v_hat(x_t) for DDIM and TS samples vs the forward-noised
    training digits q(x_t) (the per-step |v_hat(x_t) - v_hat(q(x_t))| of docs/time_shift.md "Measured")."""
    from gensample.eval.digits_data import real_digits
    from gensample.models.loading import load_model
    from gensample.samplers.registry import RunContext
    from gensample.samplers.time_shift import sample_variance
    from gensample.schedulers.time_shift import make_time_shift_scheduler

    model = load_model(model_name)
    den, ab = model.denoiser(), model.alphas_cumprod
    x0 = torch.from_numpy(real_digits("train")[0]).double()
    ctx = RunContext("diag")
    x_T = ctx.randn(ctx.generators(range(n)), model.event_shape)
    cond = model.cond_for(None, n, ctx.device)
    g = torch.Generator().manual_seed(5)
    out = []
    for enabled in (False, True):
        s = make_time_shift_scheduler(model.scheduler_config, enabled=enabled)
        s.set_timesteps(steps)
        x = x_T.clone()
        for t in s.timesteps:
            idx = torch.randint(0, len(x0), (2000,), generator=g)
            q = ab[t].sqrt() * x0[idx] + (1 - ab[t]).sqrt() * torch.randn(x0[idx].shape, generator=g, dtype=torch.float64)
            v, vq = sample_variance(x), sample_variance(q)
            out.append({"sampler": "ts-ddim" if enabled else "ddim", "t": int(t), "vhat_mean": v.mean().item(),
                        "vhat_sd": v.std().item(), "q_mean": vq.mean().item(), "q_sd": vq.std().item()})
            t_s = s.model_timesteps(x, t)
            x = s.step(den.guided(x, t_s, cond, 1.0), t, x, model_timesteps=t_s).prev_sample
        v = sample_variance(x)
        out.append({"sampler": "ts-ddim" if enabled else "ddim", "t": -1, "vhat_mean": v.mean().item(), "vhat_sd": v.std().item(),
                    "q_mean": sample_variance(x0).mean().item(), "q_sd": sample_variance(x0).std().item()})
    return out


# -- eval table -------------------------------------------------------------------------------
def evaluate(config: str, out: Path | None, labels=None, steps_only=None, seeds_only=None) -> dict:
    """Every (entry, steps, seed) cell of a `gensample eval` recipe through `gensample.api.run`,
    scored by digits-FID; resumable through ``out``."""
    from gensample import api
    from gensample.eval.digits import digits_fid, fid_floor
    from gensample.eval.sweep import load_sweep

    cfg, _ = load_sweep(config)
    model = pick_model(cfg.model)
    n = cfg.num_samples
    results: dict = {"model": model, "num_samples": n, "fid_floor": fid_floor(), "rows": []}
    if out is not None and out.exists():
        results = json.loads(out.read_text())
    done = {(r["name"], r["steps"], r["seed"]) for r in results["rows"]}
    for entry in cfg.entries:
        if labels and entry.label not in labels:
            continue
        for steps in entry.steps:
            if steps_only and steps not in steps_only:
                continue
            for seed in entry.seeds:
                if (entry.label, steps, seed) in done or (seeds_only and seed not in seeds_only):
                    continue
                t0 = time.perf_counter()
                res = api.run(sampler=entry.sampler, model=model, steps=steps, seed=seed, num_samples=n, batch_size=n,
                              device="cpu", progress=False, **entry.options)
                x, stats = res.x, res.record.get("stats", {})
                row = {"name": entry.label, "sampler": entry.sampler, "options": entry.options, "steps": steps,
                       "seed": seed, "fid": digits_fid(x), "wall_s": time.perf_counter() - t0,
                       "pixel_var": float(np.var(x.reshape(len(x), -1), axis=1, ddof=1).mean())}
                if "ts_mean" in stats:
                    row["ts_offset_mean"] = [m - t for m, t in zip(stats["ts_mean"][0], stats["timestep"][0])]
                results["rows"].append(row)
                print(f"{entry.label:24s} steps={steps:3d} seed={seed} fid={row['fid']:.3f} ({row['wall_s']:.0f} s)", flush=True)
                if out is not None:
                    out.write_text(json.dumps(results, indent=1))
    return results


def _rows(results: dict) -> list:
    return results.get("rows", []) + results.get("table", []) + results.get("sweep", [])


def summarise(results_list: list) -> str:
    """Markdown: digits-FID mean +- std over seeds per (name, steps), for one or more result files."""
    rows = [r for res in results_list for r in _rows(res)]
    first = results_list[0]
    names = list(dict.fromkeys(r["name"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    lines = [f"digits-FID on {first['model']} (mean +- sample std over seeds [k = number of seeds], "
             f"n = {first['num_samples']} samples per cell; train-vs-test floor {first['fid_floor']:.3f})", "",
             "| run | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name in names:
        cells = []
        for s in steps:
            v = [r["fid"] for r in rows if r["name"] == name and r["steps"] == s]
            cells.append(f"{np.mean(v):.2f} +- {np.std(v, ddof=1):.2f} [{len(v)}]" if len(v) > 1
                         else (f"{v[0]:.2f} [1]" if v else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = {(r["steps"], r["seed"]): r["fid"] for r in rows if r["name"] == "ddim"}
    if base:
        lines += ["", "Paired difference to ddim (same seeds, so the same start noise): FID(run) - FID(ddim), "
                  "mean +- std over seeds; negative = better than ddim", "",
                  "| run | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for name in names:
            if name == "ddim":
                continue
            cells = []
            for s in steps:
                d = [r["fid"] - base[(s, r["seed"])] for r in rows if r["name"] == name and r["steps"] == s
                     and (s, r["seed"]) in base]
                cells.append(f"{np.mean(d):+.2f} +- {np.std(d, ddof=1):.2f} [{len(d)}]" if len(d) > 1
                             else (f"{d[0]:+.2f} [1]" if d else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- data-aware statistic ----------------------------------------------------------------------
def data_var_of_training_data(model_name: str) -> float:
    """E[var_hat(x0)] over the training digits, in the model's sample space (pixels in [-1, 1], or
    the scaled VAE latents (z - shift) * scaling_factor of the latent model)."""
    from gensample.eval.digits_data import real_digits
    from gensample.models.loading import load_model
    from gensample.samplers.time_shift import sample_variance

    model = load_model(model_name)
    x = torch.from_numpy(real_digits("train")[0])
    if model.is_latent:
        vae = model.extras["vae"]
        sf = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        with torch.no_grad():
            x = (vae.encode(x).latent_dist.mean - shift) * sf
    return float(sample_variance(x).mean())


DATA_AWARE_RUNS = (  # label, sampler options; None data_var = the paper's statistic
    ("ddim", "ddim", {}),
    ("ts-paper", "ts-ddim", {}),
    ("ts-data-auto", "ts-ddim", {"data_var": "auto"}),
    ("ts-data-given", "ts-ddim", {"data_var": "given"}),
    ("ts-data-given-c0", "ts-ddim", {"data_var": "given", "cutoff": 0}),
)


def data_aware(models, steps_list, seeds, n: int) -> dict:
    import warnings

    from gensample import api
    from gensample.eval.digits import digits_fid

    given = {m: data_var_of_training_data(m) for m in models}
    rows, skipped = [], []
    for model in models:
        for steps in steps_list:
            for seed in seeds:
                for label, sampler, opts in DATA_AWARE_RUNS:
                    opts = dict(opts)
                    if opts.get("data_var") == "given":
                        if given[model] == 1.0:  # only V = 1 makes the reference flat in t
                            skipped.append({"model": model, "name": label, "steps": steps, "seed": seed,
                                            "reason": "Var_data of the training data is exactly 1: "
                                                      "the data-aware reference carries no time information"})
                            continue
                        opts["data_var"] = given[model]
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the latent-model warning of ts-paper is expected here
                        res = api.run(sampler=sampler, model=model, steps=steps, seed=seed, num_samples=n, batch_size=n,
                                      device="cpu", progress=False, **opts)
                    stats = res.record.get("stats", {})
                    images = res.samples.get("images", res.x)
                    row = {"model": model, "name": label, "steps": steps, "seed": seed, "fid": digits_fid(images),
                           "wall_s": time.perf_counter() - t0,
                           "sample_var": float(np.var(res.x.reshape(len(res.x), -1), axis=1, ddof=1).mean())}
                    if "ts_mean" in stats:
                        row["ts_offset_mean"] = [m - t for m, t in zip(stats["ts_mean"][0], stats["timestep"][0])]
                    if "ts_data_var" in stats:
                        row["data_var"] = stats["ts_data_var"][0]
                    rows.append(row)
                    print(f"{model:12s} {label:18s} steps={steps:3d} seed={seed} fid={row['fid']:8.3f} "
                          f"var={row['sample_var']:.4f} ({row['wall_s']:.0f} s)", flush=True)
    paired = []
    base = {(r["model"], r["steps"], r["seed"]): r["fid"] for r in rows if r["name"] == "ddim"}
    for model in models:
        for steps in steps_list:
            for label, _, _ in DATA_AWARE_RUNS[1:]:
                d = [r["fid"] - base[(model, steps, r["seed"])] for r in rows
                     if r["model"] == model and r["steps"] == steps and r["name"] == label]
                if not d:
                    continue
                paired.append({"model": model, "steps": steps, "name": label, "mean": float(np.mean(d)),
                               "sd": float(np.std(d, ddof=1)) if len(d) > 1 else None, "k": len(d)})
    return {"num_samples": n, "steps": list(steps_list), "seeds": list(seeds), "models": list(models),
            "data_var_given": given, "rows": rows, "paired": paired, "skipped": skipped}


def summarise_data_aware(res: dict) -> str:
    rows = res["rows"]
    lines = [f"digits-FID (n = {res['num_samples']} per cell, mean +- sd over seeds {res['seeds']}); "
             f"Var_data measured on the training data: " + ", ".join(f"{m} {v:.4f}" for m, v in res["data_var_given"].items()), "",
             "| model | steps | run | FID | paired FID - ddim | sample var | Var_data used |", "|---|---|---|---|---|---|---|"]
    paired = {(p["model"], p["steps"], p["name"]): p for p in res["paired"]}
    for model in res["models"]:
        for steps in res["steps"]:
            for label, _, _ in DATA_AWARE_RUNS:
                sel = [r for r in rows if r["model"] == model and r["steps"] == steps and r["name"] == label]
                if not sel:
                    continue
                f = [r["fid"] for r in sel]
                p = paired.get((model, steps, label))
                pd = "" if p is None else f"{p['mean']:+.2f} +- {p['sd']:.2f}"
                dv = [r["data_var"] for r in sel if "data_var" in r]
                lines.append(f"| {model} | {steps} | {label} | {np.mean(f):.2f} +- {np.std(f, ddof=1):.2f} | {pd} | "
                             f"{np.mean([r['sample_var'] for r in sel]):.4f} | {np.mean(dv):.4f} |" if dv else
                             f"| {model} | {steps} | {label} | {np.mean(f):.2f} +- {np.std(f, ddof=1):.2f} | {pd} | "
                             f"{np.mean([r['sample_var'] for r in sel]):.4f} | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--model", default=None)
    o.add_argument("--batch", type=int, default=256)
    o.add_argument("--steps", type=int, default=20)
    o.add_argument("--repeats", type=int, default=5)
    o.add_argument("--window", type=int, default=30)
    o.add_argument("--cutoff", type=int, default=300)
    o.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("eval")
    e.add_argument("--config", default=str(ROOT / "configs" / "eval_time_shift.yaml"), help="a `gensample eval` recipe")
    e.add_argument("--out", default=None, help="JSON results file (resumable)")
    e.add_argument("--labels", nargs="*", default=None, help="only these entry labels")
    e.add_argument("--steps", nargs="*", type=int, default=None, help="only these step counts")
    e.add_argument("--seeds", nargs="*", type=int, default=None, help="only these seeds")
    e.add_argument("--threads", type=int, default=1)
    d = sub.add_parser("diag")
    d.add_argument("--model", default=None)
    d.add_argument("-n", type=int, default=256)
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("dataaware")
    a.add_argument("--models", nargs="+", default=["digits-ddpm", "digits-ldm"])
    a.add_argument("--steps", nargs="+", type=int, default=[10, 20])
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a.add_argument("-n", type=int, default=1000)
    a.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / DATA_AWARE_FILE))
    a.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("summary")
    s.add_argument("results", nargs="+", help="result JSON files to merge")
    args = p.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 1))
    if args.cmd == "overhead":
        res = overhead(pick_model(args.model), args.batch, args.steps, args.repeats, args.window, args.cutoff)
        ps = res["per_step_s"]
        print(f"model {res['model']}, batch {res['batch']}, {res['steps']} steps, {res['repeats']} repeats, w={res['window']} t_c={res['cutoff']}")
        print(f"per-step time  ddim    min {ps['ddim']['min'] * 1e3:8.2f} ms  median {ps['ddim']['median'] * 1e3:8.2f} ms")
        print(f"per-step time  ts-ddim min {ps['ts-ddim']['min'] * 1e3:8.2f} ms  median {ps['ts-ddim']['median'] * 1e3:8.2f} ms")
        print(f"ts-ddim / ddim per-step time ratio: {res['ratio_min']:.4f} (min), {res['ratio_median']:.4f} (median); target <= 1.03")
        so = res["scheduler_only_s"]
        print(f"scheduler only per step: ddim {so['ddim'] * 1e3:.3f} ms, ts-ddim {so['ts-ddim'] * 1e3:.3f} ms; "
              f"model call {res['model_call_s'] * 1e3:.2f} ms")
        print(f"decomposed per-step ratio (model + ts) / (model + ddim): {res['ratio_decomposed']:.4f}")
        print(json.dumps(res))
    elif args.cmd == "diag":
        with torch.no_grad():
            rows = variance_diagnostic(pick_model(args.model), args.n, args.steps)
        print("sampler   t     vhat(x_t) mean / sd    q(x_t) mean / sd   (t = -1: final samples vs training digits)")
        for r in rows:
            print(f"{r['sampler']:8s} {r['t']:4d}   {r['vhat_mean']:.4f} / {r['vhat_sd']:.3f}      {r['q_mean']:.4f} / {r['q_sd']:.3f}")
    elif args.cmd == "dataaware":
        from _provenance import write_result

        with torch.no_grad():
            res = data_aware(args.models, args.steps, args.seeds, args.n)
        write_result(args.out, res, models=args.models)
        print(summarise_data_aware(res))
    elif args.cmd == "eval":
        res = evaluate(args.config, Path(args.out) if args.out else None, args.labels, args.steps, args.seeds)
        print(summarise([res]))
    else:
        print(summarise([json.loads(Path(f).read_text()) for f in args.results]))


if __name__ == "__main__":
    sys.exit(main())
