"""Feature extractors: a timm CNN with hooks on chosen stages, turned into a grid of patch features.

Offline, the book can only use networks it initialises or trains itself; ``weights=None`` gives the
random-init network that serves as the floor every learned feature must beat.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn


def feature_extractor(name: str = "resnet18", layers: tuple[int, ...] = (1, 2), weights: None = None,
                      seed: int = 0) -> nn.Module:
    """A timm model returning the feature maps of stages ``layers`` (timm's ``features_only``), in eval mode.

    ``weights=None`` means random initialisation, seeded by ``seed`` so the features repeat exactly.
    """
    if weights is not None:
        raise NotImplementedError("Only random initialisation is available offline (weights=None).")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, features_only=True, out_indices=layers)
    return model.eval()


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor, pool: int = 3, grid: int | None = None,
                   batch_size: int = 32) -> torch.Tensor:
    """Patch features (N, C, grid, grid) for images (N, 3, H, W): every stage resized to one grid.

    Each stage's map is averaged over a ``pool`` x ``pool`` neighbourhood (stride 1) first, so a patch
    feature describes its surroundings (as PatchCore's local aggregation), then resized bilinearly to
    ``grid`` x ``grid`` (default: the first stage's grid) and concatenated along channels. A coarser grid
    costs less: a kNN search grows with the square of the number of patches.
    """
    out = []
    for batch in torch.split(images, batch_size):
        maps = model(batch)
        maps = [F.avg_pool2d(m, pool, stride=1, padding=pool // 2) for m in maps]
        size = maps[0].shape[-2:] if grid is None else (grid, grid)
        out.append(torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                              for m in maps], dim=1))
    return torch.cat(out)
