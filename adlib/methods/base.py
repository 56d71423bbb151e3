"""One protocol for every feature detector of the book, its shared post-processing and one ``evaluate``.

A detector is fitted on normal images and scores new ones::

    det = adlib.methods.patchcore.PatchCore(backbone="effnet-lite0").fit(train_images)   # (N, 3, H, W) in [0, 1]
    scores, maps = det.predict(test_images)        # (M,) image scores and (M, H, W) anomaly maps, numpy

Images may be numpy arrays or torch tensors on any device; the backbone normalises them. Every method
shares the same post-processing, as the official codes of SPADE, PaDiM and PatchCore: a patch score map
(M, h, w) is upsampled bilinearly to the image and blurred with a Gaussian of sigma 4 px; the image score
is what each paper defines (the map's maximum unless the method says otherwise).

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from adlib.core.arrays import as_images, to_numpy
from adlib.features.cnn import Backbone, feature_extractor

FORMAT = "adlib-detector/1"


def to_pixel_maps(maps: Any, size: int | tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Upsample patch score maps (N, h, w) bilinearly to ``size`` and blur with a Gaussian of ``sigma`` px.

    sigma = 4 as SPADE, PaDiM and PatchCore; the blur smooths the blocky upsampled grid. Returns float64.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(torch.as_tensor(to_numpy(maps, np.float64))[:, None], size=size, mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    return np.stack([ndimage.gaussian_filter(m, sigma) for m in up]) if sigma > 0 else up


def postprocess(patch_maps: Any, size: int | tuple[int, int], sigma: float = 4.0,
                scores: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The book's one post-processing: image scores (N,) and pixel maps (N, H, W), float64, from patch score maps
    (N, h, w) (:func:`to_pixel_maps`); the image score is ``scores`` when a method defines its own (e.g.
    PatchCore's reweighting, SPADE's global kNN), else the maximum of the blurred map.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    maps = to_pixel_maps(patch_maps, size, sigma)
    scores = maps.reshape(len(maps), -1).max(axis=1) if scores is None else to_numpy(scores, np.float64)
    return scores, maps


class FeatureDetector:
    """Base class: a frozen backbone, a patch grid, and the ``fit`` / ``predict`` protocol.

    Subclasses define ``embed(stage_maps, grid) -> (B, D, *grid)`` (how stage maps become patch features),
    ``fit_features(features (N, D, h, w))`` and ``score_features(features) -> (patch maps (M, h, w), image
    scores (M,) or None)``; None means the maximum of the blurred map. Every ``__init__`` argument is kept as
    an attribute of the same name, so :meth:`save` can rebuild the detector; the fitted tensors it stores are
    those of :meth:`state` (by default the attributes named in ``fitted``).

    ``backbone``: a name of :data:`adlib.features.cnn.BACKBONES` (or a module mapping [0, 1] images to a list of
    stage maps, with an explicit ``stride``; such a detector cannot be saved); ``layers``: its stages (None =
    the backbone's default); ``stride``: pixels per patch of the grid (None = the first stage's stride);
    ``sigma``: blur of the maps; ``device``: where features are computed (inputs move there). ``backbone=None``
    (models that learn from the pixels themselves) needs its own :meth:`features`.

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """

    method: ClassVar[str] = ""
    fitted: ClassVar[tuple[str, ...]] = ()
    model: nn.Module | None = None  # the trained network of a detector that trains one (CFA, students, AE)

    def __init__(self, backbone: str | nn.Module | None = "effnet-lite0", layers: tuple[int, ...] | None = None,
                 stride: int | None = None, sigma: float = 4.0, device: str = "cpu", seed: int = 0,
                 batch_size: int = 32):
        self.backbone, self.sigma, self.device = backbone, sigma, str(device)
        self.seed, self.batch_size = seed, batch_size
        if backbone is None:  # a detector that learns from pixels (an autoencoder): no feature network
            self.extractor, self.layers, first_stride = None, None, 1
        elif isinstance(backbone, str):
            self.extractor = feature_extractor(backbone, None if layers is None else tuple(layers), seed=seed,
                                               device=device)
            self.layers = tuple(self.extractor.net.feature_info.out_indices)
            first_stride = int(self.extractor.net.feature_info.reduction()[0])
        else:  # any module mapping [0, 1] images to a list of stage maps (e.g. a ViT's ViTStages)
            if stride is None:
                raise ValueError("a backbone given as a module needs an explicit stride (pixels per patch).")
            self.extractor = (backbone if isinstance(backbone, Backbone) else Backbone(backbone)).to(device)
            self.layers, first_stride = layers, stride
        self.stride = first_stride if stride is None else int(stride)
        self.image_shape: tuple[int, int] | None = None

    # -- what subclasses define ----------------------------------------------------------------------
    def embed(self, maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def fit_features(self, features: torch.Tensor) -> None:
        raise NotImplementedError

    def score_features(self, features: torch.Tensor) -> tuple[Any, Any | None]:
        raise NotImplementedError

    def restore(self) -> None:
        """Rebuild what is derived from the ``fitted`` tensors after loading (e.g. a search index)."""

    def build_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The untrained network of a detector that trains one (``self.model``), shaped for its saved
        ``state_dict`` ``state``; :meth:`load_state` then loads the weights into it."""
        raise NotImplementedError(f"{type(self).__name__} trains no network.")

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted tensors :meth:`save` stores: the attributes named in ``fitted`` and, for a detector that
        trains a network, that network's ``state_dict`` under ``model.``."""
        out = {name: getattr(self, name) for name in self.fitted}
        if self.model is not None:
            out |= {f"model.{key}": value for key, value in self.model.state_dict().items()}
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`state`: rebuild the network (:meth:`build_model`), set the fitted tensors (on
        ``device``) and :meth:`restore` what derives from them."""
        model_state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
        if model_state:
            self.model = self.build_model(model_state)
            self.model.load_state_dict(model_state)
            self.model.eval()
        for name in self.fitted:
            setattr(self, name, state[name].to(self.device))
        self.restore()

    # -- the protocol ---------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: Any) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> patch features (N, D, H / stride, W / stride) on ``device``."""
        x = as_images(images)
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"image size {h} x {w} is not a multiple of the patch stride {self.stride}.")
        grid = (h // self.stride, w // self.stride)
        return torch.cat([self.embed(self.extractor(batch), grid) for batch in torch.split(x, self.batch_size)])

    def fit(self, images: Any) -> "FeatureDetector":
        """Learn the normal patches of ``images`` (N, 3, H, W) in [0, 1]; returns self."""
        x = as_images(images)
        self.image_shape = tuple(x.shape[-2:])
        with torch.no_grad():
            self.fit_features(self.features(x))
        return self

    def predict(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (M,) and anomaly maps (M, H, W), float64 numpy, for ``images`` (M, 3, H, W) in [0, 1]."""
        if self.image_shape is None:
            raise RuntimeError(f"Call fit(normal_images) before predict() ({type(self).__name__} is not fitted).")
        x = as_images(images)
        if tuple(x.shape[-2:]) != self.image_shape:
            raise ValueError(f"images are {tuple(x.shape[-2:])} px, the detector was fitted on {self.image_shape}; "
                             "resize them to the same size.")
        with torch.no_grad():
            patch_maps, scores = self.score_features(self.features(x))
        return postprocess(patch_maps, self.image_shape, self.sigma, scores)

    # -- saving ---------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The ``__init__`` arguments that rebuild this detector (``device`` excluded: chosen when loading)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "device")]
        return {name: getattr(self, name) for name in names}

    def save(self, path: str | Path, **meta: Any) -> Path:
        """Write the fitted detector to ``path`` (a torch file of tensors and plain values); ``meta`` is kept
        with it (e.g. the image size it expects). Refuses to overwrite an existing file."""
        if self.image_shape is None:
            raise RuntimeError("Fit the detector before saving it.")
        if isinstance(self.backbone, nn.Module):
            raise TypeError("a detector built on a backbone module cannot be rebuilt from a file; build it on a "
                            "backbone name of adlib.features.cnn.BACKBONES to save it.")
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists; choose another file name or delete it first.")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu() for name, tensor in self.state().items()}
        torch.save({"format": FORMAT, "method": self.method, "config": self.config(), "state": state,
                    "image_shape": list(self.image_shape), "meta": meta}, path)
        return path
