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
