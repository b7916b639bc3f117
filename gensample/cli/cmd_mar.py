"""`gensample train mar`: train the tiny MAR behind the `mar-digits` zoo model (docs/disa.md)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "zoo" / "data" / "mar-digits"


@click.command(name="mar")
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True, help="Adam steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--t-repeat", type=click.IntRange(min=1), default=2, show_default=True,
              help="Diffusion timesteps drawn per masked token (MAR's diffusion_batch_mul).")
@click.option("--head-prediction", type=click.Choice(["v", "epsilon"]), default="v", show_default=True,
              help="What the head network predicts internally (it always returns eps to the sampler).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=str(DEFAULT_OUT), show_default=True)
def train_mar_cmd(steps, batch_size, t_repeat, head_prediction, lr, seed, threads, output):
    """Train MAR (transformer backbone + AdaLN-MLP diffusion head) on sklearn digits; write
    backbone/ and head/ (safetensors + config.json), train_log.json and loss.csv to OUTPUT."""
    import torch

    from ..models.mar import MAR_SCHEDULER_CONFIG, train_mar

    torch.set_num_threads(threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def progress(step, loss):
        click.echo(f"step {step:5d}  loss {loss:.4f}  ({time.perf_counter() - t0:.0f} s)", err=True)

    backbone, head, curve = train_mar(steps=steps, batch_size=batch_size, t_repeat=t_repeat, head_prediction=head_prediction, lr=lr, seed=seed,
                                      log_every=max(1, min(100, steps // 20)), progress=progress)
    backbone.save_pretrained(out / "backbone")
    head.save_pretrained(out / "head")
    (out / "scheduler_config.json").write_text(json.dumps(MAR_SCHEDULER_CONFIG, indent=2) + "\n")
    log = {
        "command": "gensample train mar " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
        "args": {"steps": steps, "batch_size": batch_size, "t_repeat": t_repeat, "head_prediction": head_prediction, "lr": lr, "seed": seed, "threads": threads},
        "torch": torch.__version__,
        "wall_time_s": time.perf_counter() - t0,
        "loss_curve": curve,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (out / "loss.csv").write_text("step,loss\n" + "".join(f"{c['step']},{c['loss']:.6f}\n" for c in curve))
    click.echo(f"wrote {out} (final loss {curve[-1]['loss']:.4f}, {log['wall_time_s']:.0f} s)")


def register(main) -> None:
    main.commands["train"].add_command(train_mar_cmd)
