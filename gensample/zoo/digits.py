"""Trained digits models: the class-conditional pixel DDPM ``digits-ddpm``.

Weights live in gensample/zoo/data/digits-ddpm/ in diffusers format (config.json,
diffusion_pytorch_model.safetensors, scheduler_config.json); train_log.json beside them records
the exact `gensample train ddpm` command and the loss curve. Data: scikit-learn digits, native
8x8, one channel, pixels x/8 - 1 in [-1, 1]; labels 0..9, label 10 is the null class for CFG.
"""

from __future__ import annotations

from ..models.loading import load_diffusers
from . import DATA, register

DIGITS_DDPM_DIR = DATA / "digits-ddpm"


@register("digits-ddpm", "8x8 class-conditional DDPM UNet trained on sklearn digits (labels 0-9, CFG null class)")
def digits_ddpm():
    if not (DIGITS_DDPM_DIR / "diffusion_pytorch_model.safetensors").exists():
        raise ValueError(f"digits-ddpm weights are missing from {DIGITS_DDPM_DIR}; "
                         "recreate them with `gensample train ddpm --dataset digits --out DIR` and copy DIR there")
    model = load_diffusers(str(DIGITS_DDPM_DIR), name="digits-ddpm")
    model.extras["dataset"] = "digits"
    return model
