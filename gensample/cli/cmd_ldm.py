"""`gensample train ldm`: train the shipped `digits-ldm` (tiny AutoencoderKL + latent UNet2DModel)."""

from __future__ import annotations

import click


def register(main) -> None:
    from . import user_errors

    @click.command(name="ldm")
    @click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
                  help="Output folder [default: the shipped gensample/zoo/data/digits-ldm].")
    @click.option("--vae-steps", type=click.IntRange(min=1), default=1200, show_default=True)
    @click.option("--unet-steps", type=click.IntRange(min=1), default=4000, show_default=True)
    @click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
    @click.option("--kl-weight", type=click.FloatRange(min=0.0), default=1e-4, show_default=True)
    @click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=1e-3, show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    @user_errors
    def ldm(output, vae_steps, unet_steps, batch_size, kl_weight, lr, seed):
        """Train digits-ldm on the digits train split (single thread, CPU; a few minutes)."""
        from ..zoo.ldm import WEIGHTS, train_ldm

        curve = train_ldm(output or WEIGHTS, vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size,
                          kl_weight=kl_weight, lr=lr, seed=seed, log=lambda m: click.echo(m, err=True))
        click.echo(f"digits-ldm: final unet loss {curve['unet'][-1]['loss']:.4f}, vae rec mse "
                   f"{curve['vae_final_rec_mse_train']:.4f}, {curve['wall_time_s']:.0f} s -> {output or WEIGHTS}")

    main.commands["train"].add_command(ldm)
