"""PaDiM (Defard et al., ICPR 2020 workshops): a Gaussian per patch position, scored by the Mahalanobis distance.

The stages of a pretrained CNN are brought to the first stage's grid (nearest-neighbour upsampling, as the
official code's ``embedding_concat``) and concatenated; ``d`` channels are kept at random (paper: 100 of a
ResNet-18's 448). At every grid position (i, j) the normal training patches give a mean mu_ij and a
covariance Sigma_ij = cov + eps I (eps = 0.01); a test patch scores sqrt((x - mu)^T Sigma^-1 (x - mu)). The
map is upsampled, blurred (sigma 4) and its maximum is the image score. The model assumes aligned images: a
position's statistics only describe what appears at that position.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adlib.methods.base import MemoryBankDetector, PatchFeatures, PatchScores


def gaussian_per_position(features: torch.Tensor, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Means (h * w, d) and inverse covariances (h * w, d, d), float64, of features (N, d, h, w).

    Sigma = (1 / (N - 1)) sum (x - mu)(x - mu)^T + eps * I at every position (the paper's regulariser keeps
    Sigma invertible when N <= d).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    n, d, h, w = features.shape
    if n < 2:
        raise ValueError(f"PaDiM needs at least 2 training images to estimate a covariance, got {n}.")
    x = features.double().permute(2, 3, 0, 1).reshape(h * w, n, d)
    mean = x.mean(1)
    centred = x - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / (n - 1) + eps * torch.eye(d, dtype=x.dtype, device=x.device)
    return mean, torch.linalg.inv(cov)


def mahalanobis_maps(features: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance maps (M, h, w) of features (M, d, h, w) to per-position Gaussians (h * w, ...).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    m, d, h, w = features.shape
    diff = features.double().permute(0, 2, 3, 1).reshape(m, h * w, d) - mean
    sq = torch.einsum("mpd,pde,mpe->mp", diff, inv_cov, diff)
    return sq.clamp_min(0).sqrt().reshape(m, h, w)


class PaDiM(MemoryBankDetector):
    """PaDiM behind the detector protocol. ``layers`` default (1, 2, 3) as the paper's ResNet stages 1-3;
    ``d`` random channels (paper 100), ``eps`` 0.01, ``stride`` None = the first stage's (the paper's grid).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    method = "padim"
    fitted = ("channels", "mean", "inv_cov")

    def __init__(self, backbone: str = "effnet-lite0", layers: tuple[int, ...] | None = (1, 2, 3),
                 stride: int | None = None, d: int = 100, eps: float = 0.01, sigma: float = 4.0,
                 device: str = "cpu", seed: int = 0, batch_size: int = 32):
        super().__init__(backbone, layers, stride, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        total = sum(self.extractor.net.feature_info.channels())
        if not 1 <= d <= total:
            raise ValueError(f"d must be between 1 and the {total} channels of stages {self.layers}, got {d}.")
        self.d, self.eps = d, eps
        gen = torch.Generator().manual_seed(seed)
        self.channels = torch.randperm(total, generator=gen)[:d].sort().values.to(self.extractor.device)

    def embed(self, maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        x = torch.cat([F.interpolate(m, size=grid, mode="nearest") for m in maps], dim=1)
        return x[:, self.channels]

    def hparams(self) -> dict:
        return super().hparams() | {"d": self.d, "eps": self.eps}

    def fit_features(self, features: PatchFeatures) -> None:
        self.mean, self.inv_cov = gaussian_per_position(features.patches, self.eps)

    def score_features(self, features: PatchFeatures) -> PatchScores:
        return PatchScores(mahalanobis_maps(features.patches, self.mean, self.inv_cov))
