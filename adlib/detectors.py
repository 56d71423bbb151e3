"""One protocol for every feature detector of the book, its shared post-processing and one ``evaluate``.

A detector is fitted on normal images and scores new ones::

    det = adlib.patchcore.PatchCore(backbone="effnet-lite0").fit(train_images)   # (N, 3, H, W) in [0, 1]
    scores, maps = det.predict(test_images)        # (M,) image scores and (M, H, W) anomaly maps, numpy

Images may be numpy arrays or torch tensors on any device; the backbone normalises them. Every method
shares the same post-processing, as the official codes of SPADE, PaDiM and PatchCore: a patch score map
(M, h, w) is upsampled bilinearly to the image and blurred with a Gaussian of sigma 4 px; the image score
is what each paper defines (the map's maximum unless the method says otherwise).

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from adlib import metrics
from adlib.arrays import as_images, to_numpy
from adlib.backbones import Backbone, feature_extractor

# method name -> "module:Class"; the classes live in one module per method (imported when first used).
METHODS = {
    "patchknn": "adlib.knn:PatchKNNDetector",
    "spade": "adlib.knn:SPADEDetector",
    "patchcore": "adlib.patchcore:PatchCore",
    "padim": "adlib.padim:PaDiM",
    "cfa": "adlib.cfa:CFADetector",
    "students": "adlib.students:StudentsDetector",
    "ae": "adlib.recon:AutoencoderDetector",
    "winclip": "adlib.winclip:WinCLIPDetector",
}
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

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
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

    ``backbone``: a name of :data:`adlib.backbones.BACKBONES` (or a module mapping [0, 1] images to a list of
    stage maps, with an explicit ``stride``; such a detector cannot be saved); ``layers``: its stages (None =
    the backbone's default); ``stride``: pixels per patch of the grid (None = the first stage's stride);
    ``sigma``: blur of the maps; ``device``: where features are computed (inputs move there). ``backbone=None``
    (models that learn from the pixels themselves) needs its own :meth:`features`.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    method: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for ``python -m adlib list``
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
                            "backbone name of adlib.backbones.BACKBONES to save it.")
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists; choose another file name or delete it first.")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu() for name, tensor in self.state().items()}
        torch.save({"format": FORMAT, "method": self.method, "config": self.config(), "state": state,
                    "image_shape": list(self.image_shape), "meta": meta}, path)
        return path


def detector_class(method: str) -> type[FeatureDetector]:
    """The class of a method name of :data:`METHODS` (e.g. ``"patchcore"``).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {sorted(METHODS)}.")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def make_detector(method: str, **options: Any) -> FeatureDetector:
    """A new detector of ``method`` with ``options`` (its ``__init__`` arguments; a misspelt one is an error).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    return detector_class(method)(**options)


def run_options(method: str, category: str, backbone: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``method`` runs with on ``category``: ``backbone`` if the method takes one, ``object_name`` =
    the category if it names the object it inspects (the zero-shot CLIP detector), then ``options`` (which win).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    params = inspect.signature(detector_class(method)).parameters
    return (({"backbone": backbone} if "backbone" in params else {})
            | ({"object_name": category} if "object_name" in params else {}) | options)


def load_detector(path: str | Path, device: str = "cpu") -> tuple[FeatureDetector, dict]:
    """A detector saved by :meth:`FeatureDetector.save`, on ``device``, and the ``meta`` saved with it.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved detector at {path}; make one with: python -m adlib run METHOD --data "
                                f"ROOT --category C --save-model {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a detector saved by adlib ({FORMAT}).")
    det = make_detector(blob["method"], **blob["config"], device=device)
    det.image_shape = tuple(blob["image_shape"])
    det.load_state(blob["state"])
    return det, blob["meta"]


class PeakMemory:
    """Peak memory (MB) while the ``with`` block runs: the process's resident set on CPU (sampled every 5 ms,
    so it includes the Python process itself; where ``/proc`` is missing, e.g. macOS, the process's peak since
    it started), allocated CUDA memory on a GPU.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        """The process's resident memory now, MB (its peak so far where ``/proc`` is missing)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except OSError:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
            return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_mb = self.rss_mb()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())


def evaluate(detector: FeatureDetector, train_images: Any, test_images: Any, labels: Any,
             masks: Any | None = None) -> tuple[dict[str, float | None], np.ndarray, np.ndarray]:
    """Fit ``detector`` on ``train_images``, score ``test_images`` and measure it.

    Returns the row ``{"image_auroc", "pixel_auroc", "aupro", "fit_s", "predict_s", "peak_mb"}`` (pixel metrics
    None when ``masks`` (M, H, W) is None: a folder without ground truth), and the image scores (M,) and maps
    (M, H, W). ``peak_mb``: see :class:`PeakMemory`.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    with PeakMemory(detector.device) as memory:
        t0 = time.perf_counter()
        detector.fit(train_images)
        t1 = time.perf_counter()
        scores, maps = detector.predict(test_images)
        t2 = time.perf_counter()
    row: dict[str, float | None] = {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": None,
                                    "aupro": None}
    if masks is not None:
        row["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
        row["aupro"] = metrics.aupro(masks, maps)
    row |= {"fit_s": t1 - t0, "predict_s": t2 - t1, "peak_mb": memory.peak_mb}
    return row, scores, maps
