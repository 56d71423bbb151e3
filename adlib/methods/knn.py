"""Nearest-neighbour scoring of patch features against a memory bank of normal patches (faiss).

The score of a test patch is its distance to the nearest normal patch of *every* training image (a full
memory bank: PatchCore without its coreset and reweighting, SPADE's pixel step without its image gallery);
the image score is the maximum of the map. The same bank serves the ViT-kNN and CFA chapters, and SPADE
(``adlib.methods.spade``). :class:`PatchKNNDetector` puts it behind the detector protocol of ``adlib.methods.base``.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

from adlib.core.arrays import to_numpy
from adlib.features.cnn import aggregate_patches
from adlib.methods.base import MemoryBankDetector, PatchFeatures, PatchScores


def _as_rows(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(N, C, h, w) -> (N*h*w, C) float32 rows and the (N, h, w) shape to fold them back."""
    f = torch.as_tensor(features)
    if f.ndim != 4:
        raise ValueError(f"patch features must be (N, C, h, w), got shape {tuple(f.shape)}.")
    n, c, h, w = f.shape
    rows = np.ascontiguousarray(to_numpy(f.permute(0, 2, 3, 1).reshape(-1, c), np.float32))
    return rows, (n, h, w)


class PatchKNN:
    """A memory bank of normal patch features; ``score_maps`` gives each test patch's kNN distance.

    ``k``: neighbours averaged (1 = nearest only). Search is exact (``faiss.IndexFlatL2``).

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
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


class PatchKNNDetector(MemoryBankDetector):
    """Patch kNN behind the detector protocol: :func:`adlib.features.cnn.aggregate_patches` (3 x 3 local average,
    stages resized to one grid) in a full :class:`PatchKNN` bank; image score = maximum of the blurred map.

    ``k`` neighbours averaged; ``stride`` 8 px by default (the stride of PatchCore's first layer on its
    WideResNet-50), other arguments as :class:`adlib.methods.base.MemoryBankDetector`.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    method = "patchknn"
    fitted = ("bank",)

    def __init__(self, backbone: str | torch.nn.Module = "effnet-lite0", layers: tuple[int, ...] | None = None,
                 stride: int | None = 8, k: int = 1, sigma: float = 4.0, device: str = "cpu", seed: int = 0,
                 batch_size: int = 32):
        super().__init__(backbone, layers, stride, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.k = k
        self.knn = PatchKNN(k)

    def hparams(self) -> dict:
        return super().hparams() | {"k": self.k}

    def embed(self, maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        return aggregate_patches(maps, grid=grid)

    def fit_features(self, features: PatchFeatures) -> None:
        self.bank = features.patches.permute(0, 2, 3, 1).reshape(-1, features.patches.shape[1])
        self.restore()

    def restore(self) -> None:
        self.knn.fit(self.bank[:, :, None, None])

    def score_features(self, features: PatchFeatures) -> PatchScores:
        return PatchScores(self.knn.score_maps(features.patches))
