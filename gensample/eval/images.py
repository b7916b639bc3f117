"""Image output: per-sample PNGs and a grid (uint8, PNG only: JPEG would bias FID), titled
comparison figures, the 2-D scatter-over-density picture, and which files of a run folder are
samples (``sample_source``: never grid.png, ess.png, compare.png or other figures)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes

IMAGE_SUFFIXES = (".png",)


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


def sample_source(path: str | Path) -> Path:
    """The files of ``path`` that hold samples: a run folder (run.json, samples.npz or images/
    inside) gives its ``images/`` folder, else its ``samples.npz``; a folder of PNGs or a .npz is
    itself. Figures a run writes beside its samples (grid.png, ess.png, compare.png,
    before_after.png, samples.png) are never samples."""
    p = Path(path)
    if p.is_dir():
        is_run = (p / "run.json").exists() or (p / "samples.npz").exists() or (p / "images").is_dir()
        if is_run:
            if (p / "images").is_dir() and any((p / "images").glob("*.png")):
                return p / "images"
            if (p / "samples.npz").exists():
                return p / "samples.npz"
            raise ValueError(f"{path} is a run folder without samples (no images/*.png, no samples.npz)")
    return p


def load_images(path: str | Path) -> np.ndarray:
    """Sample images as (N, 3, H, W) uint8 from a run folder, a folder of PNGs or a samples.npz
    (array ``x``, (N, 1|3, H, W) in [-1, 1]); one channel is repeated to three."""
    p = sample_source(path)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p) as z:
            if "x" not in z:
                raise ValueError(f"{path}: a samples .npz needs an array 'x' (N, C, H, W) in [-1, 1]; found {sorted(z.files)}")
            x = z["x"]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{path}: 'x' must have shape (N, 1 or 3, H, W), got {x.shape}")
        imgs = to_uint8(x).transpose(0, 3, 1, 2)
    elif p.is_dir():
        from PIL import Image

        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no PNG images found")
        arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError(f"{path}: images have different sizes {sorted({a.shape for a in arrs})}")
        imgs = np.stack(arrs).transpose(0, 3, 1, 2)
    elif not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    else:
        raise ValueError(f"{path}: expected a run folder, a folder of PNGs or a .npz of samples")
    if imgs.shape[1] == 1:
        imgs = imgs.repeat(3, 1)
    return np.ascontiguousarray(imgs)


def with_titles(img: np.ndarray, titles: list[str], band: int = 14) -> np.ndarray:
    """(H, W, C) uint8 -> the same with a white band on top holding ``titles``, one per equal-width
    column (compare.png: "without OMS" | "with OMS"; before_after.png: truth | measurement | samples)."""
    from PIL import Image, ImageDraw

    h, w, c = img.shape
    canvas = Image.new("RGB", (w, h + band), (255, 255, 255))
    canvas.paste(_pil(img).convert("RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    cell = w / max(1, len(titles))
    for i, text in enumerate(titles):
        tw = draw.textlength(text)
        draw.text((i * cell + max(0.0, (cell - tw) / 2), 1), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def scatter_over_density_png(x: np.ndarray, log_density, title: str = "", size: int = 480) -> bytes:
    """PNG of 2-D samples (N, 2) as dots over a shaded density map; ``log_density(grid (M, 2)
    float64 numpy) -> (M,)`` is evaluated on a 200 x 200 grid covering the samples and modes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.percentile(x, 0.5, axis=0), np.percentile(x, 99.5, axis=0)
    pad = 0.15 * (hi - lo) + 0.5
    lo, hi = lo - pad, hi + pad
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    dens = np.exp(np.asarray(log_density(np.stack([gx.ravel(), gy.ravel()], 1)), dtype=np.float64)).reshape(gx.shape)
    fig, ax = plt.subplots(figsize=(size / 100, size / 100), dpi=100)
    ax.imshow(dens, origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), cmap="Blues", aspect="auto")
    ax.scatter(x[:, 0], x[:, 1], s=8, c="tab:red", edgecolors="white", linewidths=0.3, label=f"{len(x)} samples")
    ax.set_xlim(lo[0], hi[0]), ax.set_ylim(lo[1], hi[1])
    ax.set_title(title or "samples over the model density", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def band_plot_png(y: np.ndarray, *, xlabel: str, ylabel: str, title: str, band_label: str,
                  legend_loc: str = "lower left", ylim=None) -> bytes:
    """PNG of per-step traces ``y`` (rows, steps): their range as a band and their median as a
    line (FKC's ESS, FK steering's rewards); write it with ``io.atomic_write_bytes``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(y, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = np.arange(y.shape[1])
    ax.fill_between(steps, y.min(0), y.max(0), alpha=0.25, label=band_label)
    ax.plot(steps, np.median(y, 0), label="median")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
