"""Linear forward operators for inverse problems y = A x + sigma_y n (docs/stsl.md, "What is here").

Each operator maps a batch x (B, *in_shape) to y (B, *out_shape) and offers
- ``forward(x)``: A x;
- ``adjoint(y)``: the true adjoint A^T y (<A x, y> = <x, A^T y>); for every operator here A is
  linear, so when no closed form is written the adjoint is the vector-Jacobian product of
  ``forward`` at 0, which is exact;
- ``back_project(y)``: the "A^T" the DPS / PSLD reference code uses (nearest upsampling for
  super-resolution, identity for blur); equals ``adjoint`` unless noted (``true_adjoint_backproject``);
- ``measure(x, sigma_y, generators)``: A x + sigma_y n, noise drawn per sample on each generator's device, then moved;
- ``matrix()``: the dense (M, D) float64 matrix, for exact posteriors on small problems.
Randomness of the operator itself (random masks, box position, motion kernels) comes from an
explicit seed, so a task is reproducible and its kernel/mask is stored (``state()``).

Tasks (``make_operator``): inpaint-random, inpaint-box, sr-bicubic, sr-avgpool, gblur, mblur,
matrix:FILE.npy. Images are (C, H, W) in [-1, 1]; inpaint-random and matrix also take vectors (D,).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("inpaint-random", "inpaint-box", "sr-bicubic", "sr-avgpool", "gblur", "mblur", "matrix:FILE.npy")


class LinearOperator:
    """Base class: subclasses set ``name``, ``in_shape``, ``out_shape`` and implement ``_forward``."""

    name = "linear"
    true_adjoint_backproject = True

    def __init__(self, in_shape: Sequence[int]):
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = self.in_shape

    # -- to implement ---------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, shape: tuple, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"{self.name}: {what} must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x for x (B, *in_shape) -> (B, *out_shape), differentiable."""
        self._check(x, self.in_shape, "x")
        return self._forward(x)

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """True adjoint A^T y, (B, *out_shape) -> (B, *in_shape): the VJP of the linear map."""
        self._check(y, self.out_shape, "y")
        with torch.enable_grad():
            x0 = torch.zeros((y.shape[0], *self.in_shape), dtype=y.dtype, device=y.device, requires_grad=True)
            (g,) = torch.autograd.grad(self._forward(x0), x0, grad_outputs=y.detach())
        return g

    def back_project(self, y: torch.Tensor) -> torch.Tensor:
        """The reference implementation's A^T (docs/stsl.md, "What is here"); the true adjoint by default."""
        return self.adjoint(y)

    def measure(self, x: torch.Tensor, sigma_y: float, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """y = A x + sigma_y n, n ~ N(0, I) per sample from ``generators`` (one per row, CPU or CUDA)."""
        if not (isinstance(sigma_y, (int, float)) and math.isfinite(sigma_y) and sigma_y >= 0):
            raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
        y = self.forward(x)
        if sigma_y == 0:
            return y
        if generators is None or len(generators) != x.shape[0]:
            raise ValueError(f"measure needs one generator per sample ({x.shape[0]}), got "
                             f"{None if generators is None else len(generators)}")
        # each row on its generator's own device (CPU or CUDA), then moved
        n = torch.stack([torch.randn(self.out_shape, generator=g, dtype=torch.float64, device=g.device).to(y.device)
                         for g in generators])
        return y + sigma_y * n.to(dtype=y.dtype)

    def matrix(self) -> torch.Tensor:
        """Dense A (M, D), float64, by applying the operator to the standard basis."""
        d = math.prod(self.in_shape)
        eye = torch.eye(d, dtype=torch.float64).reshape(d, *self.in_shape)
        return self._forward(eye).reshape(d, -1).T.contiguous()

    def state(self) -> dict:
        """Arrays that pin this operator (mask, kernel, matrix) for saving beside a run."""
        return {}


# -- inpainting ------------------------------------------------------------------------------------
class MaskOperator(LinearOperator):
    """y = m * x with a 0/1 mask shared over channels (self-adjoint; zeros where missing)."""

    def __init__(self, in_shape, mask: torch.Tensor, name: str):
        super().__init__(in_shape)
        self.name = name
        self.mask = mask.double()  # (H, W) for images, (D,) for vectors

    def _forward(self, x):
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        return self._forward(y)

    def measure(self, x, sigma_y, generators=None):
        """m * (x + sigma_y n): missing entries stay exactly zero (they carry no information either way)."""
        return self._forward(super().measure(x, sigma_y, generators))

    def state(self):
        return {"mask": self.mask.numpy()}


def random_inpaint(in_shape, missing: float | None = None, seed: int = 0) -> MaskOperator:
    """Drop a fraction of pixel positions (shared over channels), without replacement.
    missing=None draws the fraction ~ U(0.3, 0.7) as the DPS/PSLD reference code does."""
    rng = np.random.default_rng(seed)
    if missing is None:
        missing = float(rng.uniform(0.3, 0.7))
    if not 0.0 <= missing < 1.0:
        raise ValueError(f"missing fraction must be in [0, 1), got {missing}")
    pos_shape = tuple(in_shape[1:]) if len(in_shape) == 3 else tuple(in_shape)
    n = math.prod(pos_shape)
    drop = rng.choice(n, size=int(round(missing * n)), replace=False)
    mask = torch.ones(n, dtype=torch.float64)
    mask[torch.from_numpy(drop)] = 0.0
    return MaskOperator(in_shape, mask.reshape(pos_shape), "inpaint-random")


def box_inpaint(in_shape, size: int | None = None, seed: int = 0, margin: int | None = None) -> MaskOperator:
    """A square hole of side ``size`` (default half the image side); top-left corner uniform in
    [margin, S - margin - size) (reference: margin 16 at 256 px; here min(16, (S - size) // 4))."""
    if len(in_shape) != 3:
        raise ValueError(f"inpaint-box needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    _, h, w = in_shape
    size = max(1, min(h, w) // 2) if size is None else int(size)
    if not 1 <= size < min(h, w):
        raise ValueError(f"box size must be in [1, {min(h, w) - 1}] for {h}x{w} images, got {size}")
    margin = min(16, (min(h, w) - size) // 4) if margin is None else int(margin)
    rng = np.random.default_rng(seed)
    top = int(rng.integers(margin, max(margin + 1, h - margin - size)))
    left = int(rng.integers(margin, max(margin + 1, w - margin - size)))
    mask = torch.ones(h, w, dtype=torch.float64)
    mask[top : top + size, left : left + size] = 0.0
    return MaskOperator(in_shape, mask, "inpaint-box")


# -- super-resolution ---------------------------------------------------------------------------
def _check_image(in_shape, factor, name):
    if len(in_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    if factor < 1 or in_shape[1] % factor or in_shape[2] % factor:
        raise ValueError(f"{name}: factor must be >= 1 and divide the image size {in_shape[1]}x{in_shape[2]}, got {factor}")


class AvgPoolSR(LinearOperator):
    """Average-pool x factor; true adjoint = nearest upsampling / factor^2 (our extra, sec. 4)."""

    name = "sr-avgpool"

    def __init__(self, in_shape, factor: int = 2):
        _check_image(in_shape, factor, self.name)
        super().__init__(in_shape)
        self.factor = int(factor)
        self.out_shape = (in_shape[0], in_shape[1] // factor, in_shape[2] // factor)

    def _forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1) / self.factor**2


def keys_cubic(u: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys (1981) cubic convolution kernel, a = -0.5 (MATLAB imresize 'bicubic')."""
    u = np.abs(u)
    return np.where(u <= 1, (a + 2) * u**3 - (a + 3) * u**2 + 1,
                    np.where(u < 2, a * u**3 - 5 * a * u**2 + 8 * a * u - 4 * a, 0.0))


def bicubic_resize_matrix(n_in: int, factor: int) -> np.ndarray:
    """(n_in // factor, n_in) matrix of MATLAB-style antialiased bicubic downsampling along one axis:
    kernel stretched by the factor, symmetric boundary reflection, rows normalised to sum 1."""
    scale = 1.0 / factor
    width = 4.0 / scale
    n_out = n_in // factor
    mat = np.zeros((n_out, n_in))
    for i in range(1, n_out + 1):  # MATLAB 1-based indexing
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        idx = left + np.arange(int(math.ceil(width)) + 2)
        wts = scale * keys_cubic(scale * (u - idx))
        wts = wts / wts.sum()
        src = idx - 1  # 0-based
        src = np.where(src < 0, -src - 1, src)  # symmetric padding
        src = np.where(src >= n_in, 2 * n_in - src - 1, src)
        for j, w in zip(src, wts):
            mat[i - 1, j] += w
    return mat


class BicubicSR(LinearOperator):
    """MATLAB-style bicubic downsampling x factor (the DPS/PSLD "Resizer"), separable matrices.
    ``adjoint`` is the true adjoint; ``back_project`` is nearest upsampling, as in the reference code."""

    name = "sr-bicubic"
    true_adjoint_backproject = False

    def __init__(self, in_shape, factor: int = 2):
        _check_image(in_shape, factor, self.name)
        super().__init__(in_shape)
        self.factor = int(factor)
        self.out_shape = (in_shape[0], in_shape[1] // factor, in_shape[2] // factor)
        self.mat_h = torch.from_numpy(bicubic_resize_matrix(in_shape[1], factor))  # (H/f, H)
        self.mat_w = torch.from_numpy(bicubic_resize_matrix(in_shape[2], factor))  # (W/f, W)

    def _forward(self, x):
        mh, mw = self.mat_h.to(x), self.mat_w.to(x)
        return mh @ x @ mw.T  # (B, C, H/f, W/f)

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        mh, mw = self.mat_h.to(y), self.mat_w.to(y)
        return mh.T @ y @ mw

    def back_project(self, y):
        self._check(y, self.out_shape, "y")
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)


# -- blur -------------------------------------------------------------------------------------
class ConvBlur(LinearOperator):
    """Depthwise convolution with a fixed (k, k) kernel and reflection padding k // 2 (the
    reference Blurkernel). ``adjoint`` is the exact VJP; ``back_project`` is the identity, as in
    the reference code."""

    true_adjoint_backproject = False

    def __init__(self, in_shape, kernel: torch.Tensor, name: str):
        if len(in_shape) != 3:
            raise ValueError(f"{name} needs image inputs (C, H, W), got shape {tuple(in_shape)}")
        k = kernel.shape[-1]
        if kernel.ndim != 2 or kernel.shape[0] != k or k % 2 == 0:
            raise ValueError(f"{name}: kernel must be square with odd side, got {tuple(kernel.shape)}")
        if k // 2 >= min(in_shape[1:]):
            raise ValueError(f"{name}: kernel size {k} too large for reflection padding on "
                             f"{in_shape[1]}x{in_shape[2]} images (need size // 2 < image side)")
        super().__init__(in_shape)
        self.name = name
        self.kernel = kernel.double()

    def _forward(self, x):
        c, k = self.in_shape[0], self.kernel.shape[-1]
        w = self.kernel.to(x).expand(c, 1, k, k)
        return F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect"), w, groups=c)

    def back_project(self, y):
        self._check(y, self.out_shape, "y")
        return y

    def state(self):
        return {"kernel": self.kernel.numpy()}


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """scipy ``gaussian_filter(sigma)`` applied to a centred delta on a size x size grid (reference)."""
    from scipy.ndimage import gaussian_filter

    if size < 1 or size % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    return torch.from_numpy(gaussian_filter(delta, sigma))


def motion_kernel(size: int, intensity: float = 0.5, seed: int = 0, n_points: int = 200) -> torch.Tensor:
    """A seeded random camera-shake kernel (our own generator, in the spirit of the `motionblur`
    package the reference uses, not a copy): a random walk whose heading changes by Gaussian
    turns of scale ``intensity``, rasterised bilinearly on a size x size grid and normalised."""
    if size < 3 or size % 2 == 0:
        raise ValueError(f"motion kernel size must be an odd integer >= 3, got {size}")
    if not 0 <= intensity <= 1:
        raise ValueError(f"motion intensity must be in [0, 1], got {intensity}")
    rng = np.random.default_rng(seed)
    heading = rng.uniform(0, 2 * np.pi)
    turns = rng.normal(0.0, intensity * 0.6, n_points)
    steps = np.stack([np.cos(heading + np.cumsum(turns)), np.sin(heading + np.cumsum(turns))], 1)
    path = np.cumsum(steps * rng.uniform(0.5, 1.5, (n_points, 1)), 0)
    path -= path.mean(0)
    extent = np.abs(path).max()
    path *= (size / 2 - 1) / max(extent, 1e-12)
    path += size // 2
    ker = np.zeros((size, size))
    for px, py in path:
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        fx, fy = px - x0, py - y0
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            if 0 <= x0 + dx < size and 0 <= y0 + dy < size:
                ker[y0 + dy, x0 + dx] += w
    return torch.from_numpy(ker / ker.sum())


# -- dense matrix -------------------------------------------------------------------------------
class MatrixOperator(LinearOperator):
    """y = A vec(x) for a dense (M, D) matrix A (``matrix:FILE.npy``)."""

    name = "matrix"

    def __init__(self, in_shape, mat):
        mat = torch.as_tensor(np.asarray(mat), dtype=torch.float64)
        d = math.prod(in_shape)
        if mat.ndim != 2 or mat.shape[1] != d:
            raise ValueError(f"matrix operator must have shape (M, {d}) for inputs of shape {tuple(in_shape)}, got {tuple(mat.shape)}")
        if not torch.isfinite(mat).all():
            raise ValueError("matrix operator must be finite")
        super().__init__(in_shape)
        self.mat = mat
        self.out_shape = (mat.shape[0],)

    def _forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.mat.to(x).T

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        return (y @ self.mat.to(y)).reshape(y.shape[0], *self.in_shape)

    def matrix(self):
        return self.mat.clone()

    def state(self):
        return {"matrix": self.mat.numpy()}


def make_operator(task: str, in_shape: Sequence[int], seed: int = 0, *, missing: float | None = None,
                  box_size: int | None = None, sr_factor: int = 2, blur_sigma: float | None = None,
                  blur_size: int | None = None, motion_intensity: float = 0.5) -> LinearOperator:
    """Build the operator for ``task`` (one of TASKS) on inputs of shape ``in_shape``.

    Defaults scale with the image side S: Gaussian blur sigma 3 and kernel 61 at S >= 128
    (reference), else sigma = 1 and kernel 2 * ceil(3 sigma) + 1 (fits 8x8 digits); motion blur
    kernel 61 at S >= 128, else the largest odd side < S capped at 7."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a string, one of {list(TASKS)}")
    in_shape = tuple(int(s) for s in in_shape)
    side = min(in_shape[1:]) if len(in_shape) == 3 else 0
    if task.startswith("matrix:"):
        path = Path(task.split(":", 1)[1])
        if path.suffix != ".npy":
            raise ValueError(f"--task matrix:FILE needs a .npy file, got {str(path)!r}")
        try:
            mat = np.load(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"--task {task}: cannot load the matrix ({err})") from err
        return MatrixOperator(in_shape, mat)
    if task == "inpaint-random":
        return random_inpaint(in_shape, missing, seed)
    if task == "inpaint-box":
        return box_inpaint(in_shape, box_size, seed)
    if task == "sr-avgpool":
        return AvgPoolSR(in_shape, sr_factor)
    if task == "sr-bicubic":
        return BicubicSR(in_shape, sr_factor)
    if task == "gblur":
        if len(in_shape) != 3:
            raise ValueError(f"gblur needs image inputs (C, H, W), got shape {in_shape}")
        sigma = blur_sigma if blur_sigma is not None else (3.0 if side >= 128 else 1.0)
        size = blur_size if blur_size is not None else (61 if side >= 128 else min(2 * math.ceil(3 * sigma) + 1, 2 * ((side - 1) // 2) - 1))
        return ConvBlur(in_shape, gaussian_kernel(size, sigma), "gblur")
    if task == "mblur":
        if len(in_shape) != 3:
            raise ValueError(f"mblur needs image inputs (C, H, W), got shape {in_shape}")
        size = blur_size if blur_size is not None else (61 if side >= 128 else min(7, 2 * ((side - 1) // 2) - 1))
        return ConvBlur(in_shape, motion_kernel(size, motion_intensity, seed), "mblur")
    raise ValueError(f"--task must be one of {list(TASKS)}, got {task!r}")
