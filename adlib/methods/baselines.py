"""The simplest pixel-level detector: a Gaussian per pixel position over the normal training images.

It works only when images are aligned (the same object at the same place); on textures, where a
pattern may appear anywhere, it is the baseline that shows why position-free models are needed.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import numpy as np


class PixelGaussian:
    """Per-pixel, per-channel mean and variance of normal images (N, C, H, W); score = summed z^2.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
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


def global_statistics(images: np.ndarray, bins: int = 32) -> np.ndarray:
    """Global statistics of images (N, C, H, W) in [0, 1]: per channel the mean, the standard deviation and a
    ``bins``-bin histogram (fractions of pixels) -> (N, C * (2 + bins)). A detector on these features sees
    whether an image's colours and contrast are unusual, not where: the baseline that local features must beat.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {x.shape}.")
    flat = x.reshape(*x.shape[:2], -1)
    hist = [np.stack([np.histogram(ch, bins, (0, 1))[0] / ch.size for ch in img]).ravel() for img in flat]
    return np.concatenate([flat.mean(-1), flat.std(-1), np.stack(hist)], axis=1)
