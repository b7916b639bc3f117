"""Networks and analytic models gensample defines."""

from .gmm import GaussianMixture, GMMUNet

__all__ = ["GaussianMixture", "GMMUNet"]
