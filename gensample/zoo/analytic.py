"""Analytic zoo models: exact Gaussian mixtures (the oracles)."""

from __future__ import annotations

from functools import lru_cache

from ..models.gmm import GaussianMixture
from ..models.loading import gmm_model
from . import DATA, register

# gmm2d: class 0 and 1 are single well-separated modes; class 2 is two overlapping modes.
GMM2D = {
    "weights": [0.3, 0.2, 0.25, 0.25],
    "means": [[-4.0, 0.0], [4.0, 0.0], [0.0, 3.0], [1.0, 3.8]],
    "stds": [0.5, 0.5, 0.8, 0.6],
    "labels": [0, 1, 2, 2],
}


@lru_cache(maxsize=None)
def gmm2d_mixture() -> GaussianMixture:
    return GaussianMixture(**GMM2D)


@lru_cache(maxsize=None)
def gmm_digits_mixture() -> GaussianMixture:
    return GaussianMixture.from_json(DATA / "gmm_digits.json")


@register("gmm2d", "2-D exact Gaussian mixture, 3 classes: two separated modes + an overlapping pair")
def gmm2d():
    return gmm_model("gmm2d", gmm2d_mixture())


@register("gmm-digits", "8x8 exact mixture fitted to sklearn digits (40 components, 10 classes)")
def gmm_digits():
    return gmm_model("gmm-digits", gmm_digits_mixture())
