"""DiSA speed at MAR-B shapes (random weights; speed does not depend on the weights), one run.

MAR-B (Li et al. 2024): 256 tokens of 16 (KL-16 latents of a 256x256 image), a 12 + 12 block
ViT encoder/decoder of width 768 with a 64-slot class buffer, and a 6 x 1024 AdaLN-MLP head;
CFG 2.9 with MAR's linear ramp (the batch is doubled). Arms, all at the same K AR iterations:

  disa      DiSA linear 50 -> 5, head timesteps t > 950 mapped to 950 (the paper's code path)
  full50    50 head steps at every iteration
  full100   100 head steps at every iteration (MAR's own head budget)
  (--k256   MAR's published setting: K = 256, 100 steps; slow, opt-in)

Each repeat runs the arms interleaved (A B C A B C ...); the median and the spread (min, max) of
wall time, head time and backbone time are reported, with ratios full/disa from the medians, the
exact head call and row counts, and the speed-up predicted from the head share.

    python benchmarks/bench_disa_mar.py --device cuda --batch 64 --ar-steps 64 --repeats 3 \\
        --out benchmarks/results/disa_mar_b_cuda.json            # the full version (GPU)
    python benchmarks/bench_disa_mar.py --device cpu --batch 1 --ar-steps 8 --repeats 1 \\
        --out benchmarks/results/disa_mar_b_cpu.json             # reduced, for a shared CPU

Docs: docs/disa.md, "Speed at MAR-B shapes".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULT_FIELDS = {  # a literal: tests/test_results_provenance.py reads it statically
    "disa_mar_b_cpu.json": ["settings", "arms", "ratios", "expected", "notes"],
    "disa_mar_b_cuda.json": ["settings", "arms", "ratios", "expected", "notes"],
}

GPU_NOTE = (
    "On a GPU the head is a chain of small kernels: at MAR-B batch sizes one head step over "
    "n_k x 2B rows is launch/latency-bound, so head time follows the number of sequential head "
    "calls (sum_k S(k)) more than the rows (sum_k n_k S(k)); on a CPU it follows the rows "
    "(FLOPs). The backbone (K calls of a 24-block ViT over 2B x 320 slots) is the same in every "
    "arm and dominates a CPU run more than a GPU run at large batch. The paper timed CUDA fp16 "
    "autocast (--autocast fp16 here), skipping a warm-up batch (done here too).")


def build(device, seed: int = 0, smoke: bool = False):
    from gensample.models.mar_backbone import MARConfig, MARModel, released_config

    config = released_config("mar_base")
    if smoke:  # the same code path at toy widths (tests); not a measurement
        config = MARConfig(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1, decoder_embed_dim=32,
                           decoder_depth=1, decoder_num_heads=1, diffloss_d=1, diffloss_w=32)
    model = MARModel(config).init_random(torch.Generator().manual_seed(seed))
    # a trained head outputs eps ~ 1, v in [-1, 1]: shrink the random output layer (no effect on speed)
    with torch.no_grad():
        model.diffloss.net.final_layer.linear.weight.mul_(0.01)
    return model.to(device).eval()


def arms(ar_steps: int, k256: bool):
    from gensample.samplers.disa import StepBudgetSchedule

    out = {
        "disa": (ar_steps, StepBudgetSchedule("linear", 50, 5), 950),
        "full50": (ar_steps, StepBudgetSchedule("constant", 50, 50), None),
        "full100": (ar_steps, StepBudgetSchedule("constant", 100, 100), None),
    }
    if k256:
        out["mar_k256_100"] = (256, StepBudgetSchedule("constant", 100, 100), None)
    return out


def run_arm(model, ar_steps, schedule, clip, batch, cfg_scale, device, seed, autocast):
    from gensample.core.schedule import alphas_cumprod_from_config
    from gensample.models.mar import MAR_SCHEDULER_CONFIG
    from gensample.samplers.disa import DiSAConfig, HeadDDPM, sample_mar

    ddpm = HeadDDPM(alphas_cumprod_from_config(MAR_SCHEDULER_CONFIG), clip, "auto")
    cfg = DiSAConfig(ar_steps=ar_steps, schedule=schedule, temperature=1.0, guidance_scale=cfg_scale, cfg_schedule="linear")
    gens = [torch.Generator().manual_seed(seed * 10_000 + i) for i in range(batch)]
    labels = torch.randint(model.config.class_num, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)
    ctx = torch.autocast(device.type, dtype=torch.float16) if autocast else torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad(), ctx:
        _, stats = sample_mar(model.backbone, model.diffloss.net, ddpm, cfg, gens, num_tokens=256, token_dim=16,
                              class_labels=labels, null_class=model.null_class, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "head_s": stats["head_time_s"], "backbone_s": stats["backbone_time_s"],
            "head_calls": stats["head_calls"], "head_rows": stats["head_rows"]}


def summarise(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per run [cuda 64, cpu 1]")
    ap.add_argument("--ar-steps", type=int, default=64, help="K (the paper: 64; reduce on a CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=2.9, help="CFG scale (MAR-B: 2.9, linear ramp; 1 = no CFG)")
    ap.add_argument("--autocast", choices=["none", "fp16"], default="none")
    ap.add_argument("--k256", action="store_true", help="also MAR's K = 256 x 100 steps (slow)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--smoke", action="store_true", help="toy widths, to test the script (no measurement)")
    ap.add_argument("--out", default=None, help="result JSON (benchmarks/results/disa_mar_b_<device>.json)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    batch = a.batch or (64 if device.type == "cuda" else 1)
    if batch < 1 or a.ar_steps < 1 or a.repeats < 1:
        ap.error("--batch, --ar-steps and --repeats must be >= 1")

    from gensample.samplers.disa import head_budget

    model = build(device, smoke=a.smoke)
    arm_defs = arms(a.ar_steps, a.k256)
    run_arm(model, 2, arm_defs["disa"][1], 950, batch, a.cfg, device, 99, a.autocast == "fp16")  # warm-up
    results = {name: [] for name in arm_defs}
    for rep in range(a.repeats):
        for name, (k, sched, clip) in arm_defs.items():  # interleaved: A B C, A B C, ...
            r = run_arm(model, k, sched, clip, batch, a.cfg, device, rep, a.autocast == "fp16")
            results[name].append(r)
            print(f"rep {rep} {name:>13}: wall {r['wall_s']:8.2f} s  head {r['head_s']:8.2f} s  "
                  f"backbone {r['backbone_s']:8.2f} s  calls {r['head_calls']}", flush=True)

    summary = {}
    for name, rs in results.items():
        summary[name] = {key: summarise([r[key] for r in rs]) for key in ("wall_s", "head_s", "backbone_s")}
        summary[name].update(head_calls=rs[0]["head_calls"], head_rows=rs[0]["head_rows"])
    ratios = {}
    for base in [n for n in summary if n != "disa"]:
        ratios[f"{base}/disa"] = {key: summary[base][key]["median"] / summary["disa"][key]["median"]
                                  for key in ("wall_s", "head_s")}
        ratios[f"{base}/disa"]["head_calls"] = summary[base]["head_calls"] / summary["disa"]["head_calls"]
        ratios[f"{base}/disa"]["head_rows"] = summary[base]["head_rows"] / summary["disa"]["head_rows"]
    expected = {}
    for k in sorted({a.ar_steps, 64}):
        calls_d, rows_d = head_budget(arm_defs["disa"][1], 256, k, timestep_clip=950)
        for base in ("full50", "full100"):
            c, r = head_budget(arms(k, False)[base][1], 256, k)
            expected[f"K={k} {base}/disa"] = {"head_calls": c / calls_d, "head_rows": r / rows_d}
    h = summary["full100"]["head_s"]["median"] / summary["full100"]["wall_s"]["median"]
    r100 = ratios["full100/disa"]["head_s"]
    predicted = 1.0 / ((1 - h) + h / r100)

    print(f"\n{'SMOKE (toy widths, not a measurement)' if a.smoke else 'MAR-B shapes'}, random weights, device {device}, batch {batch}, K = {a.ar_steps}, CFG {a.cfg}, "
          f"repeats {a.repeats} (medians; spread in the JSON)")
    for name, s in summary.items():
        print(f"  {name:>13}: wall {s['wall_s']['median']:8.2f} s [{s['wall_s']['min']:.2f}, {s['wall_s']['max']:.2f}]  "
              f"head {s['head_s']['median']:8.2f} s  backbone {s['backbone_s']['median']:8.2f} s  "
              f"calls {s['head_calls']}  rows {s['head_rows']}")
    for key, r in ratios.items():
        print(f"  {key:>15}: wall x{r['wall_s']:.2f}  head x{r['head_s']:.2f}  (calls x{r['head_calls']:.2f}, rows x{r['head_rows']:.2f})")
    print(f"  head share of the full100 run h = {h:.2f}; 1/((1-h) + h/r) with the measured head ratio r = {r100:.2f}: "
          f"x{predicted:.2f} (measured wall x{ratios['full100/disa']['wall_s']:.2f})")
    for key, e in expected.items():
        print(f"  exact counts {key}: calls x{e['head_calls']:.2f}, rows x{e['head_rows']:.2f}")
    print("\nOn a GPU: " + GPU_NOTE)
    notes = [GPU_NOTE]
    if device.type == "cpu":
        notes.append("CPU run: timings are contaminated by other processes on a shared machine unless the "
                     "machine was idle; reduced settings (see settings) when ar_steps < 64 or batch is small.")
    payload = {
        "settings": {"smoke": a.smoke, "device": str(device), "batch": batch, "ar_steps": a.ar_steps, "repeats": a.repeats, "cfg": a.cfg,
                     "autocast": a.autocast, "threads": a.threads, "k256": a.k256, "tokens": 256, "token_dim": 16,
                     "backbone": "mar_base 12+12 x 768", "head": "6 x 1024", "weights": "random"},
        "arms": summary, "ratios": ratios, "expected": expected,
        "notes": notes + [f"predicted whole-run speed-up from the head share: x{predicted:.3f}"],
    }
    if a.out:
        from _provenance import write_result

        write_result(a.out, payload, models=[])
        print(f"wrote {a.out}")
    return payload


if __name__ == "__main__":
    main()
