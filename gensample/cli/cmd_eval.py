"""`gensample eval CONFIG.yaml`: a sampler sweep on one model -> results.csv, results.md, fid_vs_nfe.png."""

from __future__ import annotations

import click

from . import user_errors


@click.command(name="eval", context_settings={"show_default": True})
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Output folder [default: the config's `output:` or runs/eval/<config name>].")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per run.")
@user_errors
def eval_cmd(config, output, progress):
    """Sweep samplers x steps x seeds (CONFIG.yaml, see gensample.eval.sweep); write the table and plot."""
    from pathlib import Path

    from ..eval.sweep import load_sweep, run_sweep

    _, raw = load_sweep(config)
    out = output or raw.get("output") or f"runs/eval/{Path(config).stem}"
    run_sweep(config, out, progress=progress, echo=click.echo)
    click.echo(f"wrote {out}/results.csv, results.md, fid_vs_nfe.png")


def register(main: click.Group) -> None:
    main.add_command(eval_cmd)
