"""The simplest pixel-level detector: a Gaussian per pixel position over the normal training images.

It works only when images are aligned (the same object at the same place); on textures, where a
pattern may appear anywhere, it is the baseline that shows why position-free models are needed.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import numpy as np


class PixelGaussian:
    """Per-pixel, per-channel mean and variance of normal images (N, C, H, W); score = summed z^2.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``)
    """

    def __init__(self, eps: float = 1e-4):
        self.eps = eps  # keeps constant pixels (variance 0) from dividing by zero

    def fit(self, images: np.ndarray) -> "PixelGaussian":
        x = np.asarray(images, dtype=np.float64)
        if x.ndim != 4 or len(x) < 2:
            raise ValueError(f"images must be (N >= 2, C, H, W), got shape {x.shape}.")
        self.mean, self.var = x.mean(axis=0), x.var(axis=0) + self.eps
        return self

    def score_maps(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, H, W): sum over channels of (x - mean)^2 / var."""
        x = np.asarray(images, dtype=np.float64)
        if x.shape[1:] != self.mean.shape:
            raise ValueError(f"images have shape {x.shape[1:]}, the model was fitted on {self.mean.shape}.")
        return (((x - self.mean) ** 2) / self.var).sum(axis=1)
