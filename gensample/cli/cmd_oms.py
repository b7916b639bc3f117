"""`gensample train flawed` and `gensample train oms` (docs/oms.md "Shipped models"): thin wrappers over
gensample.models.oms_training. Both show a progress bar, checkpoint into --output and resume."""

from __future__ import annotations

import shlex
import sys

import click

from . import user_errors

_VARIANT_DIRS = {"flawed": "digits-flawed", "zero-snr": "digits-flawed-zsnr", "offset-noise": "digits-flawed-offset"}


def _command_line() -> str:
    return "gensample " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _common(fn):
    fn = click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads.")(fn)
    fn = click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from <output>/checkpoint.pt.")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True)(fn)
    fn = click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True, help="OneCycle peak LR.")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)(fn)
    fn = click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Output folder.")(fn)
    return fn


@click.command("flawed")
@click.option("--variant", type=click.Choice(list(_VARIANT_DIRS)), default="flawed", show_default=True,
              help="flawed: alpha_bar_T = 0.0477, eps-pred; zero-snr: rescaled betas + v-pred; offset-noise: eps + delta n.")
@click.option("--steps", type=click.IntRange(min=1), default=2500, show_default=True)
@click.option("--offset-noise", "offset_noise", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="delta of the offset-noise variant.")
@click.option("--cond-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Probability of training on the null class (for unconditional sampling / CFG).")
@_common
@user_errors
def train_flawed(variant, steps, offset_noise, cond_dropout, output, batch_size, lr, seed, resume, threads):
    """Train the 16x16 brightness-digits UNet on a non-zero terminal SNR schedule (or a schedule-fix variant)."""
    from ..models.oms_training import TrainConfig, train_base
    from ..zoo import DATA

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, cond_dropout=cond_dropout,
                      offset_noise=offset_noise, threads=threads)
    out = output or str(DATA / _VARIANT_DIRS[variant])
    _, hist = train_base(out, variant, cfg, resume=resume, command=_command_line(), log=lambda m: click.echo(m, err=True))
    click.echo(f"{variant}: final loss {hist[-1]['loss']:.4f} after {hist[-1]['step']} steps -> {out}")


@click.command("oms")
@click.option("--base", "base", required=True, help="The base model whose training data OMS learns (zoo name or spec).")
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True)
@click.option("--cond-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Caption/class dropout to the null class (enables OMS-CFG).")
@_common
@user_errors
def train_oms_cmd(base, steps, cond_dropout, output, batch_size, lr, seed, resume, threads):
    """Train an OMS module: psi(x_T', c) -> v = -x0 at zero SNR (docs/oms.md "Training")."""
    from ..models.loading import load_model
    from ..models.oms_training import TrainConfig, train_oms
    from ..zoo import DATA

    model = load_model(base)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, cond_dropout=cond_dropout, threads=threads)
    out = output or str(DATA / f"{base}-oms")
    _, hist = train_oms(model, out, cfg, resume=resume, command=_command_line(), log=lambda m: click.echo(m, err=True))
    click.echo(f"oms for {base}: final loss {hist[-1]['loss']:.4f} after {hist[-1]['step']} steps -> {out}")


def register(main) -> None:
    main.commands["train"].add_command(train_flawed)
    main.commands["train"].add_command(train_oms_cmd)
