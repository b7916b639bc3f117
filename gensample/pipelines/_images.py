"""The one conversion every gensample pipeline ends with: images in [0, 1] -> diffusers' output types."""

from __future__ import annotations

import torch


def to_output_type(pipe, images: torch.Tensor, output_type: str):
    """(B, C, H, W) in [0, 1] -> "pt": the tensor; "np": (B, H, W, C) float32 array; "pil": PIL images
    (``pipe.numpy_to_pil``), as diffusers' image pipelines return them."""
    if output_type == "pt":
        return images
    arr = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(arr) if output_type == "pil" else arr


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode as diffusers' latent pipelines do it, float32 out: z / scaling_factor (or
    z * latents_std / scaling_factor + latents_mean where the config has both); a float16 VAE whose
    config says ``force_upcast`` (SDXL's VAE overflows in fp16) decodes in float32 and goes back."""
    cfg = vae.config
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    z = latents.float()
    if mean is not None and std is not None:
        shape = (1, len(mean)) + (1,) * (z.ndim - 2)
        z = z * torch.tensor(std, device=z.device).view(shape) / cfg.scaling_factor + torch.tensor(mean, device=z.device).view(shape)
    else:
        z = z / cfg.scaling_factor
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(cfg.get("force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        return vae.decode(z.to(torch.float32 if upcast else dtype), return_dict=False)[0].float()
    finally:
        if upcast:
            vae.to(dtype)
