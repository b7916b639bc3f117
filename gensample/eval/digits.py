"""Digits metrics: digits-FID and class accuracy with the shipped digits feature network.

digits-FID is the Frechet distance (Heusel et al. 2017, arXiv 1706.08500, eq. 6) between
Gaussians fitted to the penultimate-layer features of our small digits CNN
(gensample/zoo/data/digits-classifier, trained by `gensample train classifier` on the train split)
for the samples and for the held-out test split. ``fid_floor()`` is the same distance between the
real train and test splits: what a perfect model that reproduces the training set scores.

Inputs are (N, 1, 8, 8) arrays in [-1, 1] (numpy or torch), the layout of `gensample run` output.
Samples that carry importance weights (FKC ``--final weighted``) pass them as ``weights``: FID then
uses the weighted mean / covariance and accuracy the weighted fraction.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..zoo import DATA
from .digits_data import SPLITS, real_digits
from .fid import FeatureStats, effective_weights, frechet_distance

__all__ = ["real_digits", "classify", "features", "digits_fid", "fid_floor", "class_accuracy", "SPLITS"]

CLASSIFIER_DIR = DATA / "digits-classifier"
_BATCH = 1024


@lru_cache(maxsize=None)
def _net():
    from ..train.classifier import load_classifier

    return load_classifier(CLASSIFIER_DIR)


def _as_images(x, name: str = "x") -> torch.Tensor:
    """Validate and convert to a (N, 1, 8, 8) float32 CPU tensor."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float32)
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor of shape (N, 1, 8, 8), got {type(x).__name__}")
    if t.ndim != 4 or tuple(t.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{name} must have shape (N, 1, 8, 8) with values in [-1, 1], got {tuple(t.shape)}")
    if t.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one image")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


@torch.no_grad()
def _apply(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(x[k : k + _BATCH]) for k in range(0, x.shape[0], _BATCH)])


def classify(x) -> np.ndarray:
    """Predicted labels (N,) int64 of digit images x (N, 1, 8, 8) in [-1, 1]."""
    t = _as_images(x)
    return _apply(_net(), t).argmax(1).numpy().astype(np.int64)


def features(x) -> np.ndarray:
    """Penultimate-layer features (N, F) float64 of digit images x (N, 1, 8, 8) in [-1, 1]."""
    t = _as_images(x)
    return _apply(_net().features, t).double().numpy()


def feature_stats(x, weights=None) -> FeatureStats:
    """Float64 running statistics of ``features(x)`` (mergeable across shards); ``weights`` (N,)
    makes them weighted (FKC ``--final weighted`` samples)."""
    stats = FeatureStats(_net().feature_dim)
    stats.update(features(x), effective_weights(weights))
    return stats


@lru_cache(maxsize=None)
def _split_stats(split: str) -> FeatureStats:
    return feature_stats(real_digits(split)[0])


def digits_fid(x, weights=None) -> float:
    """Frechet distance between the features of x and of the held-out test split (needs N >= 2).

    weights: optional (N,) per-sample weights (FKC ``--final weighted``): the sample Gaussian is
    then fitted with the weighted mean and covariance (``FeatureStats``)."""
    t = _as_images(x)
    if t.shape[0] < 2:
        raise ValueError(f"x needs at least 2 images for a covariance, got {t.shape[0]}")
    w = _check_weights(weights, t.shape[0])
    mu, sigma = feature_stats(t, w).mean_cov()
    mu_r, sigma_r = _split_stats("test").mean_cov()
    return frechet_distance(mu, sigma, mu_r, sigma_r)


def fid_floor() -> float:
    """digits-FID of the real train split (1438 images) against the test split (359 images)."""
    return digits_fid(real_digits("train")[0])


def _check_weights(weights, n: int):
    if weights is not None and np.asarray(weights).reshape(-1).shape[0] != n:
        raise ValueError(f"weights must have one entry per image ({n}), got {np.asarray(weights).reshape(-1).shape[0]}")
    return effective_weights(weights)


def class_accuracy(x, labels, weights=None) -> float:
    """Fraction of images x the shipped classifier assigns to ``labels`` (int or (N,) ints 0..9);
    with ``weights`` (N,) the weighted fraction sum w 1[pred = label] / sum w."""
    pred = classify(x)
    w = _check_weights(weights, pred.shape[0])
    lab = np.asarray(labels)
    if lab.ndim == 0:
        lab = np.full(pred.shape, int(lab))
    if lab.shape != pred.shape:
        raise ValueError(f"labels must be one int or shape ({pred.shape[0]},), got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() > 9:
        raise ValueError("labels must be integers in 0..9")
    hit = (pred == lab).astype(np.float64)
    return float(hit.mean()) if w is None else float((w * hit).sum() / w.sum())
