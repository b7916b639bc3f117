"""`digits-ldm`: a tiny latent diffusion model on 8x8 digits (Rombach et al. 2022, arXiv 2112.10752).

A diffusers ``AutoencoderKL`` (8x8x1 pixels <-> 4x4x2 latents, f = 2) and an unconditional
latent ``UNet2DModel`` (eps prediction, DDPM linear schedule), trained by ``gensample train ldm``
on the train split of `gensample.eval.digits_data` (the held-out test split stays unseen).
It exists so that the latent paths of PSLD / STSL (PSLD: Rout et al. 2023, arXiv 2307.00619;
docs/stsl.md) run on a real learned VAE + UNet offline, and so that latent decoding by the
generation samplers (docs/text_to_image.md) is tested on a trained model. Latents are scaled
by ``vae.config.scaling_factor`` (1 / std of the training latents, the Stable Diffusion
convention): z = sf * E(x), D(z) = vae.decode(z / sf); ``LoadedModel.decode`` applies D.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..models.loading import DEFAULT_SCHEDULER_CONFIG
from . import DATA, register

NAME = "digits-ldm"
WEIGHTS = DATA / NAME
LATENT_SHAPE = (2, 4, 4)
PIXEL_SHAPE = (1, 8, 8)
SCHEDULER_CONFIG = dict(DEFAULT_SCHEDULER_CONFIG)  # DDPM linear betas, eps, no clipping


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=LATENT_SHAPE[0],
        norm_num_groups=8, sample_size=PIXEL_SHAPE[-1],
    )


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=LATENT_SHAPE[-1], in_channels=LATENT_SHAPE[0], out_channels=LATENT_SHAPE[0],
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def train_ldm(out_dir: str | Path = WEIGHTS, vae_steps: int = 1200, unet_steps: int = 4000, batch_size: int = 128,
              kl_weight: float = 1e-4, lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train the VAE (L2 reconstruction + kl_weight * KL), then the latent eps-UNet (DDPM loss,
    Ho et al. 2020 eq. 14) on sampled scaled latents. Single-threaded, CPU. Writes
    vae/ and unet/ (safetensors + config.json), scheduler_config.json and loss.json to out_dir."""
    from diffusers import DDPMScheduler

    from ..eval.digits_data import real_digits

    for name, v in (("vae_steps", vae_steps), ("unet_steps", unet_steps), ("batch_size", batch_size)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_train = torch.from_numpy(real_digits("train")[0])  # (N, 1, 8, 8) in [-1, 1]
    n = x_train.shape[0]
    curve: dict = {"vae": [], "unet": []}
    t0 = time.time()

    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, vae_steps)
    for step in range(vae_steps):
        xb = x_train[torch.randint(0, n, (batch_size,), generator=gen)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = ((rec - xb) ** 2).mean()
        kl = post.kl().mean() / math.prod(PIXEL_SHAPE)
        loss = rec_loss + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == vae_steps - 1:
            curve["vae"].append({"step": step, "rec_mse": rec_loss.item(), "kl": kl.item()})
            log(f"vae step {step}: rec mse {rec_loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        post = vae.encode(x_train).latent_dist
        scaling = float(1.0 / post.mean.std())
        rec_all = vae.decode(post.mean).sample
        curve["vae_final_rec_mse_train"] = float(((rec_all - x_train) ** 2).mean())
    vae.register_to_config(scaling_factor=scaling)

    unet = build_unet()
    noise_sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, unet_steps)
    mean, std = post.mean.detach(), post.std.detach()
    for step in range(unet_steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        z0 = scaling * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen))
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        z_t = noise_sched.add_noise(z0, noise, t)
        loss = ((unet(z_t, t).sample - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == unet_steps - 1:
            curve["unet"].append({"step": step, "loss": loss.item()})
            log(f"unet step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    unet.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    curve.update({"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "batch_size": batch_size,
                  "kl_weight": kl_weight, "lr": lr, "scaling_factor": scaling, "train_images": n,
                  "wall_time_s": time.time() - t0})
    (out / "loss.json").write_text(json.dumps(curve, indent=1) + "\n")
    return curve


def load_digits_ldm(path: str | Path = WEIGHTS):
    from diffusers import AutoencoderKL, UNet2DModel

    from ..models.loading import LoadedModel

    path = Path(path)
    if not (path / "unet" / "config.json").exists():
        raise ValueError(f"{NAME} weights not found in {path}; train them with `gensample train ldm`")
    vae = AutoencoderKL.from_pretrained(path / "vae").eval()
    unet = UNet2DModel.from_pretrained(path / "unet").eval()
    for p in [*vae.parameters(), *unet.parameters()]:
        p.requires_grad_(False)
    sched = json.loads((path / "scheduler_config.json").read_text())
    return LoadedModel(
        name=NAME, kind="diffusion", unet=unet, scheduler_config=sched, event_shape=LATENT_SHAPE,
        is_image=True, extras={"vae": vae, "pixel_shape": PIXEL_SHAPE},
    )


if (WEIGHTS / "unet" / "config.json").exists():

    @register(NAME, "tiny latent diffusion on 8x8 digits: AutoencoderKL (4x4x2 latents) + UNet2DModel (gensample train ldm)")
    def digits_ldm():
        return load_digits_ldm()
