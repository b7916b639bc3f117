"""Image output: per-sample PNGs and a grid (uint8, PNG only: JPEG would bias FID)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np


def to_uint8(x: np.ndarray, value_range=(-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) floats in value_range -> (N, H, W, C) uint8."""
    lo, hi = value_range
    y = (np.asarray(x, dtype=np.float64) - lo) / (hi - lo)
    y = np.clip(np.rint(y * 255), 0, 255).astype(np.uint8)
    return y.transpose(0, 2, 3, 1)


def _pil(img: np.ndarray):
    from PIL import Image

    if img.shape[-1] == 1:
        return Image.fromarray(img[..., 0], mode="L")
    if img.shape[-1] == 3:
        return Image.fromarray(img, mode="RGB")
    raise ValueError(f"cannot write an image with {img.shape[-1]} channels")


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (H', W', C) grid image."""
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    _pil(img).save(buf, format="PNG")
    return buf.getvalue()


def save_images(x: np.ndarray, out_dir: Path, value_range=(-1.0, 1.0), grid_max: int = 64) -> None:
    """Write images/NNNNNN.png (skipping ones already there: resumable) and grid.png."""
    from ..api import atomic_write_bytes

    if x.ndim != 4 or x.shape[1] not in (1, 3):
        return
    imgs = to_uint8(x, value_range)
    img_dir = Path(out_dir) / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(imgs):
        f = img_dir / f"{i:06d}.png"
        if not f.exists():
            atomic_write_bytes(f, png_bytes(img))
    sub = imgs[:grid_max]
    scale = max(1, 64 // imgs.shape[1])
    atomic_write_bytes(Path(out_dir) / "grid.png", png_bytes(make_grid(sub, scale=scale)))
