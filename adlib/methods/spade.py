"""SPADE (Cohen and Hoshen, 2020): the k nearest normal images by a global feature, then a pixel map from the
patches of those images.

:class:`SPADE` works on features; :class:`SPADEDetector` puts it behind the detector protocol of
``adlib.methods.base`` (a memory-bank detector whose global feature is its ``pool`` hook).

Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

from adlib.core.arrays import to_numpy
from adlib.features.backbones import BACKBONES
from adlib.features.cnn import aggregate_patches
from adlib.methods.base import MemoryBankDetector, PatchFeatures, PatchScores


def nearest_images(train_global: torch.Tensor | np.ndarray, test_global: torch.Tensor | np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest training images of each test image in global feature space (exact, faiss).

    train_global (M, D), test_global (N, D) -> Euclidean distances (N, k) float64, ascending, and indices
    (N, k) into the training set.

    Defined in: "ViT-KNN" (``notebooks/08_vit_knn.ipynb``).
    """
    train = np.ascontiguousarray(to_numpy(train_global, np.float32))
    test = np.ascontiguousarray(to_numpy(test_global, np.float32))
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"global features must be (M, D) and (N, D), got {train.shape} and {test.shape}.")
    if not 1 <= k <= len(train):
        raise ValueError(f"k must be between 1 and the number of training images ({len(train)}), got {k}.")
    index = faiss.IndexFlatL2(train.shape[1])
    index.add(train)
    sq, idx = index.search(test, k)
    return np.sqrt(np.maximum(sq, 0)).astype(np.float64), idx


class SPADE:
    """SPADE: kNN on global features for the image score, then a pixel map from a gallery of those images.

    ``fit(train_global (M, D), train_patches (M, C, h, w))`` stores normal features; ``predict(test_global
    (N, D), test_patches (N, C, h, w))`` returns :class:`adlib.methods.base.PatchScores`: patch maps (N, h, w) =
    mean distance of each test patch to its ``kappa`` nearest patches among *all* positions of the ``k`` nearest
    training images (the gallery), image scores (N,) = mean distance to those images, and their indices
    (N, k) as the extra ``"neighbours"``. Paper: k = 50, kappa = 1; upsample and blur the maps with
    :func:`adlib.methods.base.to_pixel_maps` (sigma 4).

    Used by: ``adlib.methods.spade.SPADEDetector``.
    """

    def __init__(self, k: int = 50, kappa: int = 1):
        if k < 1 or kappa < 1:
            raise ValueError(f"k and kappa must be >= 1, got k={k}, kappa={kappa}.")
        self.k, self.kappa = k, kappa
        self.train_global: torch.Tensor | None = None
        self.train_patches: torch.Tensor | None = None

    def fit(self, train_global: torch.Tensor | np.ndarray, train_patches: torch.Tensor | np.ndarray) -> "SPADE":
        g, p = torch.as_tensor(to_numpy(train_global, np.float32)), torch.as_tensor(to_numpy(train_patches, np.float32))
        if p.ndim != 4 or g.ndim != 2 or len(g) != len(p):
            raise ValueError(f"need train_global (M, D) and train_patches (M, C, h, w) for the same M images, "
                             f"got {tuple(g.shape)} and {tuple(p.shape)}.")
        if len(g) < self.k:
            raise ValueError(f"k={self.k} needs at least {self.k} training images, got {len(g)}; lower k.")
        self.train_global, self.train_patches = g, p
        return self

    def predict(self, test_global: torch.Tensor | np.ndarray, test_patches: torch.Tensor | np.ndarray) -> PatchScores:
        if self.train_patches is None:
            raise RuntimeError("Call fit(train_global, train_patches) before predict().")
        q = torch.as_tensor(to_numpy(test_patches, np.float32))
        if q.shape[1:] != self.train_patches.shape[1:]:
            raise ValueError(f"test patches {tuple(q.shape[1:])} differ from training patches "
                             f"{tuple(self.train_patches.shape[1:])} (C, h, w).")
        dist, idx = nearest_images(self.train_global, test_global, self.k)
        n, c, h, w = q.shape
        maps = np.empty((n, h, w))
        for i in range(n):
            # The gallery is small (k * h * w rows), so an exact torch.cdist per test image is cheap.
            gallery = self.train_patches[idx[i]].permute(0, 2, 3, 1).reshape(-1, c)
            d = torch.cdist(q[i].permute(1, 2, 0).reshape(-1, c), gallery)
            maps[i] = d.topk(self.kappa, largest=False).values.mean(1).reshape(h, w).double().numpy()
        return PatchScores(maps, dist.mean(1), {"neighbours": idx})


class SPADEDetector(MemoryBankDetector):
    """SPADE behind the detector protocol: image score = mean distance of the global feature to the ``k``
    nearest training images; pixel map from the patches of those images (:class:`SPADE`). Paper: k = 50,
    kappa = 1, the global feature the spatial mean of the network's final stage.

    ``global_stage``: the stage whose spatial mean is the global feature (the paper: the final one, e.g. 4 for a
    ResNet or an EfficientNet); it is computed beside the patch ``layers`` but is not one of them. None: the last
    of the patch ``layers`` (a backbone whose weights end there, e.g. the book's fractal ResNet-18). ``backbone``
    may be a module (e.g. a ViT's :class:`adlib.features.vit.ViTStages`, with ``stride`` = its patch size): with
    ``global_stage`` its last map is the global one and the others are the patch maps; without, its last map is
    both.

    Used by: ``adlib.methods.catalog.METHODS``.
    """

    method = "spade"
    fitted = ("train_global", "train_patches")

    def __init__(self, backbone: str = "effnet-lite0", layers: tuple[int, ...] | None = None, stride: int | None = 8,
                 k: int = 50, kappa: int = 1, global_stage: int | None = None, sigma: float = 4.0, device: str = "cpu",
                 seed: int = 0, batch_size: int = 32):
        named = isinstance(backbone, str)
        if layers is not None:
            patch_layers = tuple(layers)
        else:  # the backbone's default stages, as feature_extractor chooses them
            patch_layers = (BACKBONES[backbone][2] if backbone in BACKBONES else (1, 2)) if named else None
        extra = global_stage is not None and (not named or global_stage not in patch_layers)
        if named and extra and global_stage < max(patch_layers):
            raise ValueError(f"global_stage {global_stage} must be a patch layer or deeper than layers {patch_layers}.")
        extract = patch_layers + (global_stage,) if named and extra else patch_layers
        try:
            super().__init__(backbone, extract, stride, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        except ValueError as err:  # weights that end before the global stage: say which setting asked for it
            if extra and "ships stages" in str(err):
                raise ValueError(f"{err} SPADE's global feature asked for global_stage={global_stage}; pass "
                                 "global_stage=None (--set global_stage=None) to pool the last patch stage.") from err
            raise
        self.layers, self.global_stage, self._extra = patch_layers, global_stage, extra
        self.k, self.kappa = k, kappa
        self.spade = SPADE(k, kappa)

    def hparams(self) -> dict:
        return super().hparams() | {"layers": self.layers, "k": self.k, "kappa": self.kappa,
                                    "global_stage": self.global_stage}

    def embed(self, maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        return aggregate_patches(maps[:-1] if self._extra else maps, grid=grid)

    def pool(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if self.global_stage is None or self._extra:
            return maps[-1].mean(dim=(2, 3))  # a CNN's stage or a ViT's block, computed last
        return maps[self.layers.index(self.global_stage)].mean(dim=(2, 3))

    def fit_features(self, features: PatchFeatures) -> None:
        self.train_global, self.train_patches = features.pooled, features.patches
        self.restore()

    def restore(self) -> None:
        self.spade = SPADE(self.k, self.kappa).fit(self.train_global, self.train_patches)

    def score_features(self, features: PatchFeatures) -> PatchScores:
        return self.spade.predict(features.pooled, features.patches)
