"""Feature extractors: a timm CNN with hooks on chosen stages, turned into a grid of patch features.

Offline, the book uses ImageNet weights that install from PyPI (``"effnet-lite0"``, Google's EfficientNet-Lite0,
the default CNN of the feature chapters), networks it trains itself (``"book-resnet18"``, ``adlib.recipes.pretrain``,
shipped in ``adlib/weights`` with a model card) and random-init networks, the floor every learned feature must
beat. :data:`BACKBONES` lists them by name; every backbone takes images in [0, 1] and normalises them itself.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from adlib.features.backbones import BACKBONES
from adlib.weights.registry import PYPI_WEIGHTS, load_weights, pypi_state_dict, shipped_entry, timm_pretrained


class Backbone(nn.Module):
    """A frozen feature network that owns its input normalisation and its device.

    images (N, 3, H, W) in [0, 1], numpy or torch, on any device -> the list of stage maps (N, C_i, h_i, w_i)
    on the backbone's device. ``mean``/``std`` are those its weights were trained with (ImageNet statistics,
    EfficientNet-Lite's 0.5 / 0.5, or none for the book's own and random weights), so callers never
    normalise by hand. ``state_dict`` keys are the wrapped network's with the prefix ``net.``.

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.net = net
        self.normalise = mean is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0,) * 3).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def prepare(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> the network's input: on its device, normalised as its weights expect."""
        x = torch.as_tensor(images).to(self.device, torch.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(x.shape)}.")
        return (x - self.mean) / self.std if self.normalise else x

    def forward(self, images: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        return self.net(self.prepare(images))


def feature_extractor(name: str = "resnet18", layers: tuple[int, ...] | None = None, weights: str | None = None,
                      seed: int = 0, device: str | torch.device = "cpu") -> Backbone:
    """A :class:`Backbone` returning the feature maps of stages ``layers`` (timm's ``features_only``), in eval mode.

    ``name``: a timm architecture, or one of :data:`BACKBONES` (e.g. ``"effnet-lite0"``), which fixes the
    architecture, the weights and the default ``layers``. ``weights`` (with an architecture name): ``None`` =
    random initialisation, seeded by ``seed`` so the features repeat exactly; a shipped name
    (:func:`shipped_weights`, e.g. ``"book-resnet18"``, trained offline by ``adlib.recipes.pretrain``); a
    :data:`PYPI_WEIGHTS` name (ImageNet weights installed from PyPI); ``"imagenet"`` = timm's pretrained weights
    (paper profile; needs the hub or its cache); or the path of a local weights file. ``layers`` defaults to
    ``(1, 2)``. Pass images in [0, 1]: the backbone applies the normalisation its weights expect.

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
    """
    if name in BACKBONES:  # a book name (with a dash), never a timm architecture
        if weights is not None:
            raise ValueError(f"{name!r} fixes its weights ({BACKBONES[name][1]!r}); do not pass weights=.")
        name, weights, default_layers, _ = BACKBONES[name]
        layers = default_layers if layers is None else layers
    layers = (1, 2) if layers is None else tuple(layers)
    if weights in PYPI_WEIGHTS and PYPI_WEIGHTS[str(weights)]["arch"] != name:
        raise ValueError(f"{weights!r} is a {PYPI_WEIGHTS[str(weights)]['arch']!r}; call "
                         f"feature_extractor({weights!r}) or feature_extractor({PYPI_WEIGHTS[str(weights)]['arch']!r}, "
                         f"weights={weights!r}).")
    if weights == "imagenet":
        net = timm_pretrained(name, "feature_extractor", features_only=True, out_indices=layers)
    else:
        entry = shipped_entry(weights, name, "feature_extractor")
        if entry is not None and max(layers) > entry["max_stage"]:
            raise ValueError(f"{weights!r} ships stages 0-{entry['max_stage']} only; got layers={layers}.")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = timm.create_model(name, pretrained=False, features_only=True, out_indices=layers)
        if weights is not None:
            state = pypi_state_dict(str(weights)) if weights in PYPI_WEIGHTS else load_weights(weights)
            # Extra keys (a classifier, stages beyond the last requested one) are expected; missing ones are not.
            missing, _ = net.load_state_dict(state, strict=False)
            if missing:
                raise ValueError(f"weights {str(weights)!r} lack {len(missing)} tensors of {name!r} stages {layers}, "
                                 f"e.g. {missing[:3]}; they were trained for another architecture or fewer stages.")
    # Weights trained on ImageNet expect its statistics (timm's config of the architecture); the book's own
    # and random weights see [0, 1] images as they are.
    imagenet = weights == "imagenet" or weights in PYPI_WEIGHTS
    cfg = timm.models.get_pretrained_cfg(name) if imagenet else None
    mean, std = (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else (None, None)
    return Backbone(net, mean, std).to(device).eval()


def aggregate_patches(maps: list[torch.Tensor], pool: int = 3,
                      grid: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Stage maps [(N, C_i, h_i, w_i), ...] -> patch features (N, sum C_i, grid, grid) on one grid.

    Each stage's map is averaged over a ``pool`` x ``pool`` neighbourhood (stride 1) first, so a patch
    feature describes its surroundings (as PatchCore's local aggregation), then resized bilinearly to
    ``grid`` (default: the first stage's grid) and concatenated along channels.

    Used by: ``adlib.features.cnn.patch_features``, ``adlib.methods.cfa.CFADetector``.
    """
    maps = [F.avg_pool2d(m, pool, stride=1, padding=pool // 2) for m in maps]
    size = maps[0].shape[-2:] if grid is None else ((grid, grid) if isinstance(grid, int) else tuple(grid))
    return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor, pool: int = 3, grid: int | None = None,
                   batch_size: int = 32) -> torch.Tensor:
    """Patch features (N, C, grid, grid) for images (N, 3, H, W): :func:`aggregate_patches` of ``model``'s stages.

    A coarser grid costs less: a kNN search grows with the square of the number of patches.

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    return torch.cat([aggregate_patches(model(batch), pool, grid) for batch in torch.split(images, batch_size)])
