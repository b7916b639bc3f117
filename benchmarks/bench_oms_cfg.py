"""OMS-CFG steering and the x_T variance scale on digits-flawed (docs/oms.md "Results").

    python benchmarks/bench_oms_cfg.py [--n 128] [--steps 50] [--out docs/oms]

Prints mean per-image brightness (+- standard error) for each OMS class and w in {1, 2, 3}
(base sampled unconditionally), and Var(x_T) against 1 - a + a Var(x0_hat) per class, with the
reference code's variance-as-std bug for contrast. Writes cfg.json to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gensample import api
from gensample.models.loading import load_model
from gensample.samplers.oms import OMSConfig, base_scheduler, first_alpha_bar, load_oms_module, oms_initial_latents


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("docs/oms"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rec = {"n": args.n, "steps": args.steps, "cfg": {}, "variance": {}}
    print("| OMS class | w=1 | w=2 | w=3 |\n|---|---|---|---|")
    for k in range(3):
        cells = []
        for w in (1.0, 2.0, 3.0):
            x = api.run(sampler="oms", model="digits-flawed", num_samples=args.n, steps=args.steps, seed=0,
                        progress=False, device="cpu", skip_compare=True, oms_class=k, oms_guidance=w).samples["x"]
            m = x.mean(axis=(1, 2, 3))
            rec["cfg"][f"{k},{w}"] = {"mean": float(m.mean()), "se": float(m.std() / len(m) ** 0.5)}
            cells.append(f"{m.mean():+.3f} +- {m.std() / len(m) ** 0.5:.3f}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    model = load_model("digits-flawed")
    module = load_oms_module(None, model)
    sched, _ = base_scheduler(model, "ddim", args.steps, {}, "cpu")
    a = first_alpha_bar(sched)
    print(f"\nalpha_bar at t0 = {int(sched.timesteps[0])}: {a:.5f}")
    for k in range(3):
        for legacy in (False, True):
            g = torch.Generator().manual_seed(k)
            x_Tp = torch.randn((512, 1, 16, 16), generator=g)
            lab = torch.full((512,), k)
            with torch.no_grad():
                x0_hat = -module(x_Tp, class_labels=lab).sample
                x_T = oms_initial_latents(module, x_Tp, {"class_labels": lab}, None, a,
                                          OMSConfig(legacy_variance=legacy), g)
            expect = 1 - a + a * x0_hat.double().var().item()
            got = x_T.double().var().item()
            dc = x_T.double().mean().item()
            rec["variance"][f"{k},{legacy}"] = {"var_x_T": got, "expected": expect, "dc": dc,
                                                 "sqrt_a_times_psi_dc": a**0.5 * x0_hat.double().mean().item()}
            print(f"class {k} legacy={legacy}: Var(x_T) {got:.4f} vs 1-a+a Var(x0_hat) {expect:.4f} "
                  f"(ratio {got / expect:.4f}); DC {dc:+.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cfg.json").write_text(json.dumps(rec, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
