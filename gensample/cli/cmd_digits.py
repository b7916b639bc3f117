"""`gensample train ddpm` and `gensample train classifier`: the digits models' training commands."""

from __future__ import annotations

import click

from . import user_errors


@click.command(name="ddpm", context_settings={"show_default": True})
@click.option("--dataset", type=click.Choice(["digits"]), default="digits", help="Training data (scikit-learn digits, train split).")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Output folder: checkpoint.pt, then the EMA model in diffusers format.")
@click.option("--steps", type=click.IntRange(min=1), default=4000, help="Optimiser steps.")
@click.option("--seed", type=int, default=0, help="Seed of the initial weights and of every batch.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Examples per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, help="Peak learning rate (warmup, then cosine to 10%).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, help="Steps between checkpoints.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch CPU threads.")
@click.option("--resume", is_flag=True, default=False, help="Continue from OUT/checkpoint.pt.")
@user_errors
def train_ddpm_cmd(dataset, out, steps, seed, batch_size, lr, checkpoint_every, threads, resume):
    """Train the class-conditional digits DDPM (EMA weights saved in diffusers format to OUT)."""
    from ..train.ddpm import DDPMTrainConfig, train_ddpm

    cfg = DDPMTrainConfig(dataset=dataset, steps=steps, seed=seed, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every)
    command = ["gensample", "train", "ddpm", "--dataset", dataset, "--out", str(out), "--steps", str(steps), "--seed", str(seed),
               "--batch-size", str(batch_size), "--lr", repr(lr), "--checkpoint-every", str(checkpoint_every),
               "--threads", str(threads)] + (["--resume"] if resume else [])
    log = train_ddpm(out, cfg, resume=resume, threads=threads, command=command)
    last = log["loss_curve"][-1]["loss"] if log["loss_curve"] else float("nan")
    click.echo(f"trained {log['steps_done']} steps in {log['wall_time_s']:.0f} s, final loss {last:.4f} -> {out}")


@click.command(name="classifier", context_settings={"show_default": True})
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Output folder for model.safetensors, config.json, train_log.json.")
@click.option("--epochs", type=click.IntRange(min=1), default=40)
@click.option("--seed", type=int, default=0)
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch CPU threads.")
@user_errors
def train_classifier_cmd(out, epochs, seed, threads):
    """Train the digits feature network (digits-FID features, class accuracy)."""
    from ..train.classifier import ClassifierTrainConfig, train_classifier

    log = train_classifier(out, ClassifierTrainConfig(epochs=epochs, seed=seed), threads=threads, command=["gensample", "train", "classifier", "--out", str(out), "--epochs", str(epochs), "--seed", str(seed), "--threads", str(threads)])
    click.echo(f"held-out accuracy {log['test_accuracy']:.4f} ({log['n_test']} test digits) -> {out}")


def register(main: click.Group) -> None:
    main.commands["train"].add_command(train_ddpm_cmd)
    main.commands["train"].add_command(train_classifier_cmd)
