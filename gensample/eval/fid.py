"""Frechet Inception Distance (Heusel et al. 2017, arXiv 1706.08500, eq. 6) and its statistics.

FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}), each Gaussian fitted to features.
Statistics are accumulated in float64 as (count, sum, sum of outer products), so shards computed
separately merge exactly (``FeatureStats.merge``) into the one-pass result. Features come from
torch-fidelity's Inception-v3 port of the TF-slim graph used by the original FID code (the `fid`
extra); ``--inception-weights PATH`` loads its weights from a local file (docs/fid.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .images import load_images  # noqa: F401  (re-exported: the FID input reader)

IMAGE_SUFFIXES = (".png",)


class FeatureStats:
    """Running float64 moments of (N, D) features, optionally weighted: count (rows), weight sum
    W = sum w, sum of squared weights W2 = sum w^2, weighted sum (D,) and weighted sum of outer
    products (D, D). Unweighted rows have w = 1 (then W = W2 = count).

    Weighted rows (FKC ``--final weighted`` samples: self-normalised importance weights) give the
    weighted mean mu = sum w f / W and the reliability-weights unbiased covariance
    (sum w f f^T - W mu mu^T) / (W - W2 / W), which for w = 1 is the usual (n - 1) estimator.
    """

    def __init__(self, dim: int):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self.weight_sum = 0.0
        self.weight_sq_sum = 0.0
        self.total = np.zeros(self.dim, dtype=np.float64)
        self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    @property
    def weighted(self) -> bool:
        return self.weight_sum != self.count or self.weight_sq_sum != self.count

    def update(self, feats, weights=None) -> "FeatureStats":
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or Inf")
        if weights is None:
            w = None
        else:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            if w.shape != (f.shape[0],) or not np.isfinite(w).all() or (w < 0).any():
                raise ValueError(f"weights must be {f.shape[0]} finite numbers >= 0 (one per feature row), got shape {w.shape}")
        self.count += f.shape[0]
        if w is None:
            self.weight_sum += f.shape[0]
            self.weight_sq_sum += f.shape[0]
            self.total += f.sum(0)
            self.outer += f.T @ f
        else:
            self.weight_sum += float(w.sum())
            self.weight_sq_sum += float((w**2).sum())
            self.total += w @ f
            self.outer += (f * w[:, None]).T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another shard's statistics in place (the result equals one pass over both)."""
        if not isinstance(other, FeatureStats) or other.dim != self.dim:
            raise ValueError(f"can only merge FeatureStats of dim {self.dim}")
        self.count += other.count
        self.weight_sum += other.weight_sum
        self.weight_sq_sum += other.weight_sq_sum
        self.total += other.total
        self.outer += other.outer
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """mu (D,) and the unbiased (reliability-weights) covariance (D, D), both float64."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        W, W2 = self.weight_sum, self.weight_sq_sum
        denom = W - W2 / W if W > 0 else 0.0
        if not denom > 0:
            raise ValueError("the weights put all their mass on one sample: no covariance (effective sample size 1)")
        mu = self.total / W
        cov = (self.outer - W * np.outer(mu, mu)) / denom
        return mu, (cov + cov.T) / 2

    def save(self, path: str | Path, image_shape: tuple | None = None) -> None:
        """npz with mu, sigma (the usual FID reference format) plus count/total/outer (and the
        weight sums) for merging; ``image_shape`` (C, H, W) of the source images, when given, lets
        ``fid`` warn about samples of another resolution or channel count."""
        mu, sigma = self.mean_cov()
        extra = {} if image_shape is None else {"image_shape": np.asarray(image_shape, dtype=np.int64)}
        np.savez(path, mu=mu, sigma=sigma, count=np.int64(self.count), total=self.total, outer=self.outer,
                 weight_sum=np.float64(self.weight_sum), weight_sq_sum=np.float64(self.weight_sq_sum), **extra)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        with np.load(path) as z:
            if "outer" not in z:
                raise ValueError(f"{path} holds only mu/sigma, not mergeable statistics")
            s = cls(z["total"].shape[0])
            s.count, s.total, s.outer = int(z["count"]), z["total"].astype(np.float64), z["outer"].astype(np.float64)
            s.weight_sum = float(z["weight_sum"]) if "weight_sum" in z else float(s.count)
            s.weight_sq_sum = float(z["weight_sq_sum"]) if "weight_sq_sum" in z else float(s.count)
        return s


def effective_weights(weights) -> np.ndarray | None:
    """Per-sample weights that change a metric, or None: None / all-equal weights (a resampled
    FKC population has 1/K everywhere) -> None; otherwise a (N,) float64 array (validated)."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError("sample weights must be finite, >= 0 and not all zero")
    if np.all(w == w[0]):
        return None
    return w


def sample_weights(path: str | Path, n: int | None = None) -> np.ndarray | None:
    """The ``weights`` array that a run stores beside its samples (FKC ``--final weighted``), or
    None when there is none or all are equal. ``path``: a run folder, its ``images/`` folder or a
    samples.npz. n: the number of images read from ``path``; a mismatch is an error (the weights
    must describe exactly those samples)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        npz = p
    elif p.is_dir() and (p / "samples.npz").is_file():
        npz = p / "samples.npz"  # a run folder
    elif p.is_dir() and p.name == "images" and (p.parent / "samples.npz").is_file():
        npz = p.parent / "samples.npz"  # a run's images/ folder
    else:
        return None  # a plain folder of PNGs: no weights known
    with np.load(npz) as z:
        if "weights" not in z:
            return None
        raw = np.asarray(z["weights"]).reshape(-1)
    w = effective_weights(raw)
    if w is not None and n is not None and raw.shape[0] != n:
        raise ValueError(f"{path}: samples.npz has {raw.shape[0]} weights for {n} images; weighted samples need every "
                         "image of the run (or resample them: gensample run ... --final resample)")
    return w


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), float64 (eq. 6 of 1706.08500).

    scipy.linalg.sqrtm of the product; if it is not finite (near-singular covariances), both
    covariances get ``eps * I`` added first. Imaginary parts (round-off: the product is similar to
    a PSD matrix, so its square root has a real trace) are dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes must be mu (D,), sigma (D, D) for both sides, got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    with warnings.catch_warnings():  # singular products are handled by the finiteness check below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(d)
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):  # round-off on (near-)singular products, e.g. fewer samples than features
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- Inception-v3 (torch-fidelity)

INCEPTION_DIM = 2048
INCEPTION_DIMS = (64, 192, 768, 2048)  # torch-fidelity's feature layers (pytorch-fid --dims); 2048 = pool3, the standard
_EXTRACTOR_NAME = "inception-v3-compat"


def _check_dims(dims: int) -> int:
    if dims not in INCEPTION_DIMS:
        raise ValueError(f"dims must be one of {INCEPTION_DIMS} (2048 = pool3, the standard FID), got {dims}")
    return int(dims)


def inception_extractor(weights: str | Path | None = None, device: str = "cpu", dims: int = INCEPTION_DIM):
    """torch-fidelity's Inception-v3 giving ``dims`` features (2048: pool3, standard FID).

    weights=None downloads the weights or uses the torch hub cache.
    """
    dims = _check_dims(dims)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ValueError("Inception FID needs torch-fidelity: pip install 'gensample[fid]'") from err
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"--inception-weights {weights}: no such file")
    try:
        net = FeatureExtractorInceptionV3(_EXTRACTOR_NAME, [str(dims)], feature_extractor_weights_path=None if weights is None else str(weights))
    except (OSError, RuntimeError) as err:
        if weights is None:
            raise ValueError(f"could not download the Inception weights ({err.__class__.__name__}); "
                             "pass --inception-weights PATH (see docs/fid.md)") from err
        raise ValueError(f"--inception-weights {weights}: not an Inception-v3 state dict for torch-fidelity ({err})") from err
    net.feature_dim = dims
    return net.to(device)


def inception_stats(images: np.ndarray, extractor, batch_size: int = 64, progress: bool = False, weights=None) -> FeatureStats:
    """Float64 statistics of Inception features of (N, 3, H, W) uint8 images (extractor from
    inception_extractor); ``weights`` (N,) makes them weighted (FKC weighted samples)."""
    import torch
    from tqdm.auto import tqdm

    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("images must be a (N, 3, H, W) uint8 array")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if weights is not None and np.asarray(weights).reshape(-1).shape[0] != len(images):
        raise ValueError(f"got {np.asarray(weights).reshape(-1).shape[0]} weights for {len(images)} images")
    w = effective_weights(weights)
    device = next(extractor.parameters()).device
    stats = FeatureStats(getattr(extractor, "feature_dim", INCEPTION_DIM))
    with torch.no_grad():
        for k in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress):
            (feats,) = extractor(torch.from_numpy(images[k : k + batch_size]).to(device))
            stats.update(feats.double().cpu().numpy(), None if w is None else w[k : k + batch_size])
    return stats


def source_shape(path: str | Path) -> tuple[int, tuple[int, int, int]]:
    """(N, (C, H, W)) of the images at ``path`` as stored, before ``load_images`` repeats one
    channel to three: a samples .npz's ``x``, or a folder of PNGs (C from the first image's bands:
    1 grey, 3 RGB, 4 RGBA)."""
    from PIL import Image

    from .images import sample_source

    p = sample_source(path)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p) as z:
            x = z["x"] if "x" in z else None
            if x is not None and x.ndim == 4:
                return int(x.shape[0]), tuple(int(v) for v in x.shape[1:])
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else []
    if not files:
        return 0, (0, 0, 0)
    with Image.open(files[0]) as img:
        return len(files), (len(img.getbands()), img.size[1], img.size[0])


def fid_caveats(dims: int, n_samples: int, n_ref: int | None, samples_shape, ref_shape) -> list[str]:
    """Why a FID may not mean what it seems to (empty when none applies):

    - fewer images than feature dimensions on either side: the covariance estimate has rank at
      most N - 1 < D, so the Frechet distance (eq. 6 of Heusel et al.) is dominated by
      estimation error, biased upwards roughly like 1/N (Chong & Forsyth 2020, arXiv 1911.07023);
    - samples and reference of different resolution or channel count: Inception sees resized /
      channel-repeated images, so part of the distance is the format, not the model."""
    out = []
    for side, n in (("samples", n_samples), ("reference", n_ref)):
        if n is not None and n < dims:
            out.append(f"{side}: {n} images for {dims}-dimensional features; the covariance has rank at most {max(n - 1, 0)} "
                       f"< {dims}, so this FID is dominated by estimation bias (use at least {dims} images; 10000+ is "
                       f"usual for comparisons, or a lower --dims)")
    if samples_shape is not None and ref_shape is not None and tuple(samples_shape) != tuple(ref_shape):
        (c1, h1, w1), (c2, h2, w2) = samples_shape, ref_shape
        what = []
        if (h1, w1) != (h2, w2):
            what.append(f"resolution {h1}x{w1} vs {h2}x{w2}")
        if c1 != c2:
            what.append(f"channels {c1} vs {c2}")
        out.append(f"samples and reference differ ({', '.join(what)}): Inception sees them resized / channel-repeated, "
                   f"so part of the FID measures the format, not the samples")
    return out


def reference_stats(ref: str | Path, extractor_fn, batch_size: int = 64, progress: bool = False):
    """(mu, sigma) of REF: a .npz with mu/sigma, or images (folder / run / samples.npz)."""
    p = Path(ref)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p) as z:
            if "mu" in z and "sigma" in z:
                return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    images = load_images(p)
    return inception_stats(images, extractor_fn(), batch_size, progress, weights=sample_weights(p, len(images))).mean_cov()


def inception_fid(samples: str | Path, ref: str | Path, weights: str | Path | None = None, *,
                  batch_size: int = 64, device: str = "cpu", progress: bool = False, dims: int = INCEPTION_DIM) -> float:
    """FID between SAMPLES (folder / run / samples.npz) and REF (same, or a mu/sigma .npz).

    Samples that carry non-uniform ``weights`` in their samples.npz (FKC ``--final weighted``)
    are scored with weighted feature statistics (``FeatureStats``), so the FID describes the
    weighted target, not the proposal. Caveats (``fid_caveats``) are raised as warnings;
    ``fid_report`` also returns them."""
    return fid_report(samples, ref, weights, batch_size=batch_size, device=device, progress=progress, dims=dims)["fid"]


def _reference_info(ref: str | Path) -> tuple[int | None, tuple | None]:
    """(image count, (C, H, W)) of the reference: from its images, or from a fid-stats .npz
    (count, image_shape when recorded); None where unknown (a foreign mu/sigma file)."""
    p = Path(ref)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p) as z:
            if "mu" in z and "sigma" in z:
                n = int(z["count"]) if "count" in z else None
                shape = tuple(int(v) for v in z["image_shape"]) if "image_shape" in z else None
                return n, shape
    n, shape = source_shape(p)
    return n, shape


def fid_report(samples: str | Path, ref: str | Path, weights: str | Path | None = None, *,
               batch_size: int = 64, device: str = "cpu", progress: bool = False, dims: int = INCEPTION_DIM) -> dict:
    """``{"fid", "dims", "n_samples", "n_ref", "samples_shape", "ref_shape", "caveats"}``; each
    caveat (``fid_caveats``: too few images for the feature dimension, a resolution or channel
    mismatch) is also raised as a UserWarning."""
    dims = _check_dims(dims)
    value = _inception_fid(samples, ref, weights, batch_size=batch_size, device=device, progress=progress, dims=dims)
    n_s, shape_s = source_shape(samples)
    n_r, shape_r = _reference_info(ref)
    caveats = fid_caveats(dims, n_s, n_r, shape_s, shape_r)
    for text in caveats:
        warnings.warn(f"FID caveat: {text}", UserWarning, stacklevel=2)
    return {"fid": value, "dims": dims, "n_samples": n_s, "n_ref": n_r, "samples_shape": list(shape_s),
            "ref_shape": None if shape_r is None else list(shape_r), "caveats": caveats}


def _inception_fid(samples, ref, weights, *, batch_size, device, progress, dims) -> float:
    cache = {}

    def extractor():
        if "net" not in cache:
            cache["net"] = inception_extractor(weights, device, dims)
        return cache["net"]

    images = load_images(samples)
    mu_r, sigma_r = reference_stats(ref, extractor, batch_size, progress)
    row_weights = sample_weights(samples, len(images))  # FKC --final weighted samples, else None
    mu, sigma = inception_stats(images, extractor(), batch_size, progress, weights=row_weights).mean_cov()
    if mu_r.shape != mu.shape:
        raise ValueError(f"--ref statistics have {mu_r.shape[0]} features but --dims is {mu.shape[0]}")
    return frechet_distance(mu, sigma, mu_r, sigma_r)


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised Inception-v3 state dict that torch-fidelity can load.

    For offline pipeline tests only: FID values from random weights are not comparable with papers.
    """
    import tempfile

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = _Random(_EXTRACTOR_NAME, [str(INCEPTION_DIM)], feature_extractor_weights_path=str(empty))
    for module in net.modules():  # He init keeps activations O(1) through 90+ layers, so features vary with the input
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    torch.save(net.state_dict(), path)
    return path
