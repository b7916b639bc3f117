"""scikit-learn's bundled 8x8 digits with our fixed held-out split (no download).

Pixels 0..16 are scaled x/8 - 1 to [-1, 1]; one channel, native 8x8. The split is a fixed
permutation (seed 0) of all 1797 images: the first 20% are the test split, the rest train.
Every trained model and the digits-FID reference use this one split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=None)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


@lru_cache(maxsize=None)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (1797, 1, 8, 8) in [-1, 1]
    return x, d.target.astype(np.int64)


def real_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one split: x (N, 1, 8, 8) float32 in [-1, 1], y (N,) int64 labels 0..9."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    x, y = _load()
    idx = _split_indices()[SPLITS.index(split)]
    return x[idx].copy(), y[idx].copy()
