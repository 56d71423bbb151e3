"""The detector protocol of the book, its three kinds of detector and their one post-processing.

A detector is fitted on normal images and scores new ones, both :class:`adlib.data.imageset.ImageSet`::

    det = adlib.methods.patchcore.PatchCore(backbone="effnet-lite0").fit(train)
    scores = det.predict(test)          # adlib.eval.scores.Scores: .image (M,), .maps (M, H, W), numpy

Three bases, one per kind of method, each with the hooks its kind needs:

- :class:`MemoryBankDetector` (PatchCore, PaDiM, patch kNN, SPADE): a frozen backbone's patch features
  (:meth:`~MemoryBankDetector.embed`, and :meth:`~MemoryBankDetector.pool` for a global feature) are stored
  (:meth:`~MemoryBankDetector.fit_features`) and compared (:meth:`~MemoryBankDetector.score_features`).
- :class:`TrainedDetector` (CFA, Uninformed Students, autoencoders): trains a network on the pixels or on frozen
  patch features (:meth:`~TrainedDetector.train_model`, with gradients), then scores with it.
- :class:`ZeroShotDetector` (WinCLIP): learns nothing from normal images; :meth:`~ZeroShotDetector.score_images`.

Every method shares the post-processing of the official codes of SPADE, PaDiM and PatchCore: a patch score map
(M, h, w) is upsampled bilinearly to the image and blurred with a Gaussian of sigma 4 px; the image score is what
each paper defines (the map's maximum unless the method says otherwise). A detector lists its hyperparameters in
:meth:`Detector.hparams`; :meth:`Detector.save` writes them, the fitted tensors and a format version.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from adlib.core.arrays import to_numpy
from adlib.data.imageset import ImageSet, as_image_set
from adlib.eval.scores import Scores
from adlib.features.cnn import Backbone, feature_extractor

FORMAT, FORMAT_VERSION = "adlib-detector", 2


def to_pixel_maps(maps: Any, size: int | tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Upsample patch score maps (N, h, w) bilinearly to ``size`` and blur with a Gaussian of ``sigma`` px.

    sigma = 4 as SPADE, PaDiM and PatchCore; the blur smooths the blocky upsampled grid. Returns float64.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(torch.as_tensor(to_numpy(maps, np.float64))[:, None], size=size, mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    return np.stack([ndimage.gaussian_filter(m, sigma) for m in up]) if sigma > 0 else up


class PatchScores(NamedTuple):
    """What a detector's scoring hook returns: patch maps (M, h, w) on its grid (or at the image size) and the
    image scores (M,) its paper defines, or None for the maximum of the blurred map; ``extras`` as in
    :class:`Scores`.

    Used by: ``adlib.methods.base.postprocess``.
    """

    maps: Any
    image: Any | None = None
    extras: dict[str, np.ndarray] = {}


def postprocess(patch: PatchScores, size: int | tuple[int, int], sigma: float = 4.0) -> Scores:
    """The book's one post-processing: :class:`Scores` with pixel maps (N, H, W) from the patch maps
    (:func:`to_pixel_maps`) and the hook's image scores, else the maximum of each blurred map.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    maps = to_pixel_maps(patch.maps, size, sigma)
    image = maps.reshape(len(maps), -1).max(axis=1) if patch.image is None else to_numpy(patch.image, np.float64)
    return Scores(image, maps, dict(patch.extras))


class PatchFeatures(NamedTuple):
    """Frozen features of N images: ``patches`` (N, D, h, w) on the patch grid and ``pooled`` (N, G), one global
    feature per image, or None when the detector defines no :meth:`MemoryBankDetector.pool`.

    Used by: ``adlib.methods.base.MemoryBankDetector``.
    """

    patches: torch.Tensor
    pooled: torch.Tensor | None = None


class Detector:
    """What every detector shares: ``fit(ImageSet)``, ``predict(ImageSet) -> Scores``, saving and loading.

    Subclass one of the three kinds below, not this class. ``sigma``: blur of the maps; ``device``: where the
    computation runs (inputs move there); ``seed``: every random choice of the method; ``batch_size``: images per
    forward pass when scoring. A kind implements :meth:`learn` and :meth:`score`; a method lists its
    hyperparameters in :meth:`hparams` and its fitted tensors in ``fitted`` (or a network in ``model``).

    Used by: ``adlib.methods.catalog.make_detector``, ``adlib.methods.catalog.load_detector``.
    """

    method: ClassVar[str] = ""
    fitted: ClassVar[tuple[str, ...]] = ()
    model: nn.Module | None = None  # the trained network of a detector that trains one

    def __init__(self, *, sigma: float = 4.0, device: str = "cpu", seed: int = 0, batch_size: int = 32):
        self.sigma, self.device, self.seed, self.batch_size = sigma, str(device), seed, batch_size
        self.image_shape: tuple[int, int] | None = None

    # -- what a kind implements --------------------------------------------------------------------------
    def learn(self, images: torch.Tensor) -> None:
        """Learn from normal images (N, 3, H, W) in [0, 1] (CPU)."""
        raise NotImplementedError

    def score(self, images: torch.Tensor) -> PatchScores:
        """Score images (M, 3, H, W) in [0, 1] (CPU); runs without gradients."""
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters that rebuild this detector (``type(det)(**det.hparams())``): every ``__init__``
        argument but ``device``, listed by each method."""
        return {"sigma": self.sigma, "seed": self.seed, "batch_size": self.batch_size}

    def restore(self) -> None:
        """Rebuild what is derived from the ``fitted`` tensors after loading (e.g. a search index)."""

    def rebuild_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The untrained network of a detector that trains one, shaped for its saved ``state_dict`` ``state``."""
        raise NotImplementedError(f"{type(self).__name__} trains no network.")

    # -- the protocol -------------------------------------------------------------------------------------
    def fit(self, train: ImageSet) -> "Detector":
        """Learn the normal images of ``train`` (an :class:`ImageSet`, or a float (N, 3, H, W) array in [0, 1]);
        returns self."""
        train = as_image_set(train)
        if len(train) == 0:
            raise ValueError("got no training images.")
        self.image_shape = train.size
        self.learn(train.tensor())
        return self

    def predict(self, images: ImageSet) -> Scores:
        """:class:`Scores` (image scores (M,), maps (M, H, W), float64) of ``images`` (an :class:`ImageSet` or a
        float (M, 3, H, W) array in [0, 1]) at the size the detector was fitted on."""
        if self.image_shape is None:
            raise RuntimeError(f"Call fit(normal_images) before predict() ({type(self).__name__} is not fitted).")
        images = as_image_set(images)
        if images.size != self.image_shape:
            raise ValueError(f"images are {images.size} px, the detector was fitted on {self.image_shape}; "
                             "resize them to the same size.")
        with torch.no_grad():
            return postprocess(self.score(images.tensor()), self.image_shape, self.sigma)

    # -- saving -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """The fitted tensors :meth:`save` stores: the attributes named in ``fitted`` and, for a detector that
        trains a network, that network's ``state_dict`` under ``model.``."""
        out = {name: getattr(self, name) for name in self.fitted}
        if self.model is not None:
            out |= {f"model.{key}": value for key, value in self.model.state_dict().items()}
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`state`: rebuild the network (:meth:`rebuild_model`), set the fitted tensors (on
        ``device``) and :meth:`restore` what derives from them."""
        model_state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
        if model_state:
            self.model = self.rebuild_model(model_state)
            self.model.load_state_dict(model_state)
            self.model.eval()
        for name in self.fitted:
            setattr(self, name, state[name].to(self.device))
        self.restore()

    def save(self, path: str | Path, overwrite: bool = False, **meta: Any) -> Path:
        """Write the fitted detector to ``path``: a torch file of the format name and version, the method, its
        :meth:`hparams`, its fitted tensors and ``meta`` (e.g. the image size it expects). Refuses to overwrite an
        existing file unless ``overwrite`` (then it is replaced in one step)."""
        if self.image_shape is None:
            raise RuntimeError("Fit the detector before saving it.")
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another file name or delete it first.")
        hparams = self.hparams()
        if any(isinstance(v, nn.Module) for v in hparams.values()):
            raise TypeError("a detector built on a backbone module cannot be rebuilt from a file; build it on a "
                            "backbone name of adlib.features.cnn.BACKBONES to save it.")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu() for name, tensor in self.state().items()}
        partial = path.with_name(f".{path.name}.partial")
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, "method": self.method, "hparams": hparams,
                    "state": state, "image_shape": list(self.image_shape), "meta": meta}, partial)
        partial.replace(path)
        return path


class BackboneFeatures:
    """A frozen backbone on a patch grid, for the detectors that read one.

    ``backbone``: a name of :data:`adlib.features.cnn.BACKBONES` (or a module mapping [0, 1] images to a list of
    stage maps, with an explicit ``stride``; such a detector cannot be saved); ``layers``: its stages (None = the
    backbone's default); ``stride``: pixels per patch of the grid (None = the first stage's stride).

    Used by: ``adlib.methods.base.MemoryBankDetector``, ``adlib.methods.base.TrainedDetector``.
    """

    def __init__(self, backbone: str | nn.Module, layers: tuple[int, ...] | None, stride: int | None, device: str,
                 seed: int):
        self.backbone = backbone
        if isinstance(backbone, str):
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

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """The patch grid (h, w) of images (N, 3, H, W); their size must be a multiple of the stride."""
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"image size {h} x {w} is not a multiple of the patch stride {self.stride}.")
        return h // self.stride, w // self.stride

    def hparams(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "layers": self.layers, "stride": self.stride}


class MemoryBankDetector(Detector):
    """A detector that stores frozen features of normal images and compares new ones with them.

    Hooks: :meth:`embed` (stage maps -> patch features on the grid), :meth:`pool` (an optional global feature per
    image), :meth:`fit_features` (store them) and :meth:`score_features` (compare). Nothing is trained: fitting runs
    without gradients. Arguments: see :class:`BackboneFeatures` and :class:`Detector`.

    Used by: ``adlib.methods.patchcore.PatchCore``, ``adlib.methods.spade.SPADEDetector``.
    """

    def __init__(self, backbone: str | nn.Module = "effnet-lite0", layers: tuple[int, ...] | None = None,
                 stride: int | None = None, *, sigma: float = 4.0, device: str = "cpu", seed: int = 0,
                 batch_size: int = 32):
        super().__init__(sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.frozen = BackboneFeatures(backbone, layers, stride, self.device, seed)
        self.backbone, self.layers, self.stride = backbone, self.frozen.layers, self.frozen.stride
        self.extractor = self.frozen.extractor

    def embed(self, maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Stage maps of a batch -> its patch features (B, D, *grid)."""
        raise NotImplementedError

    def pool(self, maps: list[torch.Tensor]) -> torch.Tensor | None:
        """Stage maps of a batch -> one global feature per image (B, G), or None (the default: none)."""
        return None

    def fit_features(self, features: PatchFeatures) -> None:
        raise NotImplementedError

    def score_features(self, features: PatchFeatures) -> PatchScores:
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> PatchFeatures:
        """Images (N, 3, H, W) in [0, 1] -> :class:`PatchFeatures` on ``device``, computed ``batch_size`` at a time."""
        grid = self.frozen.grid(images)
        patches, pooled = [], []
        for batch in torch.split(images, self.batch_size):
            maps = self.extractor(batch)
            patches.append(self.embed(maps, grid))
            pooled.append(self.pool(maps))
        return PatchFeatures(torch.cat(patches), None if pooled[0] is None else torch.cat(pooled))

    def learn(self, images: torch.Tensor) -> None:
        with torch.no_grad():
            self.fit_features(self.features(images))

    def score(self, images: torch.Tensor) -> PatchScores:
        return self.score_features(self.features(images))

    def hparams(self) -> dict[str, Any]:
        return self.frozen.hparams() | super().hparams()


class TrainedDetector(Detector):
    """A detector that trains a network (``model``) on normal images, then scores with it.

    ``backbone`` None: the network learns from the pixels (images (N, 3, H, W) on ``device``); a backbone name:
    from its frozen patch features (:meth:`embed`, (N, D, h, w)). Hooks: :meth:`train_model` builds and trains
    ``model`` (gradients on) and returns its history; :meth:`score_inputs` scores with it (no gradients);
    :meth:`rebuild_model` shapes an untrained network for a saved state. Arguments: see :class:`BackboneFeatures`
    and :class:`Detector`.

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """

    def __init__(self, backbone: str | nn.Module | None = None, layers: tuple[int, ...] | None = None,
                 stride: int | None = None, *, sigma: float = 4.0, device: str = "cpu", seed: int = 0,
                 batch_size: int = 32):
        super().__init__(sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.frozen = None if backbone is None else BackboneFeatures(backbone, layers, stride, self.device, seed)
        self.history: list[dict[str, float]] = []

    def embed(self, maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Stage maps of a batch -> the network's input (B, D, *grid), for a detector with a backbone."""
        raise NotImplementedError

    def train_model(self, inputs: torch.Tensor) -> list[dict[str, float]]:
        raise NotImplementedError

    def score_inputs(self, inputs: torch.Tensor) -> PatchScores:
        raise NotImplementedError

    @torch.no_grad()
    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the network sees: the images on ``device``, or the backbone's patch features (N, D, h, w)."""
        if self.frozen is None:
            return images.to(self.device)
        grid = self.frozen.grid(images)
        return torch.cat([self.embed(self.frozen.extractor(b), grid) for b in torch.split(images, self.batch_size)])

    def learn(self, images: torch.Tensor) -> None:
        if not torch.is_grad_enabled():  # a clear message, not a backward() error mid-training
            raise RuntimeError(f"{type(self).__name__} trains a network: call fit() outside torch.no_grad().")
        self.history = self.train_model(self.inputs(images))
        self.model.eval()

    def score(self, images: torch.Tensor) -> PatchScores:
        return self.score_inputs(self.inputs(images))

    def hparams(self) -> dict[str, Any]:
        return ({} if self.frozen is None else self.frozen.hparams()) | super().hparams()


class ZeroShotDetector(Detector):
    """A detector that learns nothing from normal images (e.g. a vision-language model prompted with words):
    ``fit`` only records the image size; :meth:`score_images` scores. ``object_name``: what the images show, the
    word its prompts name; the other arguments: see :class:`Detector`.

    Used by: ``adlib.methods.winclip.WinCLIPDetector``.
    """

    def __init__(self, object_name: str = "object", *, sigma: float = 4.0, device: str = "cpu", seed: int = 0,
                 batch_size: int = 32):
        super().__init__(sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.object_name = object_name

    def hparams(self) -> dict[str, Any]:
        return {"object_name": self.object_name} | super().hparams()

    def score_images(self, images: torch.Tensor) -> PatchScores:
        raise NotImplementedError

    def learn(self, images: torch.Tensor) -> None:
        """Zero-shot: nothing to learn."""

    def score(self, images: torch.Tensor) -> PatchScores:
        return self.score_images(images)
