"""Restoration metrics: PSNR and SSIM (Wang et al. 2004, eq. 13) for images in [-1, 1]."""

from __future__ import annotations


import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,) float64; x and ref (B, C, H, W) (x is clamped to the range)."""
    if x.shape != ref.shape:
        raise ValueError(f"x and ref must have the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    lo = -data_range / 2
    x = x.double().clamp(lo, lo + data_range)
    mse = ((x - ref.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-20))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM, (B,) float64, Gaussian window (side min(window, H, W) rounded to odd,
    'valid' positions only), K1 = 0.01, K2 = 0.03 (Wang et al. 2004)."""
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"x and ref must both be (B, C, H, W), got {tuple(x.shape)} and {tuple(ref.shape)}")
    lo = -data_range / 2
    # shift to [0, data_range]: the luminance term assumes non-negative intensities
    x, ref = x.double().clamp(lo, lo + data_range) - lo, ref.double() - lo
    side = min(window, x.shape[-1], x.shape[-2])
    side -= 1 - side % 2
    g = torch.exp(-0.5 * ((torch.arange(side, dtype=torch.float64) - side // 2) / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    w = (g[:, None] * g[None, :]).expand(c, 1, side, side).to(x.device)
    mu_x, mu_r = F.conv2d(x, w, groups=c), F.conv2d(ref, w, groups=c)
    var_x = F.conv2d(x * x, w, groups=c) - mu_x**2
    var_r = F.conv2d(ref * ref, w, groups=c) - mu_r**2
    cov = F.conv2d(x * ref, w, groups=c) - mu_x * mu_r
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_r**2 + c1) * (var_x + var_r + c2))
    return s.flatten(1).mean(1)
