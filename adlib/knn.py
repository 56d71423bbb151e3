"""Nearest-neighbour scoring of patch features against a memory bank of normal patches (faiss).

The score of a test patch is its distance to the nearest normal patch (PatchCore with k = 1, SPADE's
pixel-level step); the image score is the maximum of the map. The same bank serves the ViT-kNN and
CFA chapters.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def _as_rows(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(N, C, h, w) -> (N*h*w, C) float32 rows and the (N, h, w) shape to fold them back."""
    f = torch.as_tensor(features)
    if f.ndim != 4:
        raise ValueError(f"patch features must be (N, C, h, w), got shape {tuple(f.shape)}.")
    n, c, h, w = f.shape
    rows = f.permute(0, 2, 3, 1).reshape(-1, c).contiguous().float().numpy()
    return rows, (n, h, w)


class PatchKNN:
    """A memory bank of normal patch features; ``score_maps`` gives each test patch's kNN distance.

    ``k``: neighbours averaged (1 = nearest only). Search is exact (``faiss.IndexFlatL2``).
    """

    def __init__(self, k: int = 1):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.k = k
        self.index: faiss.IndexFlatL2 | None = None

    def fit(self, features: torch.Tensor | np.ndarray) -> "PatchKNN":
        """Store every patch of normal ``features`` (N, C, h, w) in the bank."""
        rows, _ = _as_rows(features)
        self.index = faiss.IndexFlatL2(rows.shape[1])
        self.index.add(rows)
        return self

    def score_maps(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Mean Euclidean distance of each patch of ``features`` (N, C, h, w) to its k nearest: (N, h, w)."""
        if self.index is None:
            raise RuntimeError("Call fit(normal_features) before score_maps().")
        rows, shape = _as_rows(features)
        if rows.shape[1] != self.index.d:
            raise ValueError(f"features have {rows.shape[1]} channels, the bank has {self.index.d}.")
        sq, _ = self.index.search(rows, self.k)
        return np.sqrt(np.maximum(sq, 0)).mean(axis=1).astype(np.float64).reshape(shape)


def to_pixel_maps(maps: np.ndarray, size: int | tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Upsample patch score maps (N, h, w) bilinearly to ``size`` and blur with a Gaussian of ``sigma`` px.

    sigma = 4 as SPADE and PatchCore; the blur smooths the blocky upsampled grid.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(torch.as_tensor(maps, dtype=torch.float64)[:, None], size=size, mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    return np.stack([ndimage.gaussian_filter(m, sigma) for m in up]) if sigma > 0 else up
