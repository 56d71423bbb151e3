"""The validation benchmark: defects on held-out textures, for choosing recipes and defaults without SynthTex.

:func:`validation_set` cuts normal and defective images from photographs that are neither SynthTex sources nor
pretraining data, as :class:`adlib.data.imageset.ImageSet` s; :func:`adlib.bench.backbone_probe.patch_knn_scores`
runs chapter 2's patch-kNN detector on it. The book's backbones (``adlib.recipes.pretrain``) and the detectors'
defaults (``adlib.methods.patchcore``) were chosen on it, never on SynthTex.

Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from adlib.data import defects, synthtex
from adlib.data.imageset import ImageSet

VALIDATION_IMAGES = ("hubble_deep_field", "immunohistochemistry", "moon", "cell")


def bundled_image(name: str) -> np.ndarray:
    """A photograph bundled with scikit-image (or, for ``"china"`` and ``"flower"``, scikit-learn) as
    (H, W, 3) float32 in [0, 1]; grey images are replicated to three channels.

    Used by: ``adlib.data.heldout.validation_set``, ``adlib.recipes.pretrain.natural_images``.
    """
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data
        img = getattr(skimage.data, name)()
    img = np.asarray(img, dtype=np.float32)
    img = img / 255.0 if img.max() > 1 else img
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


class ValidationCategory(NamedTuple):
    """One category of the validation set: ``train``, an :class:`ImageSet` of normal images (n_train, 3, S, S);
    ``test``, a labelled one (M, 3, S, S) with masks (M, S, S): the normal test images first, then the defects.

    Used by: ``adlib.data.heldout.validation_set``.
    """

    train: ImageSet
    test: ImageSet


def validation_set(image_size: int = 128, n_train: int = 30, n_test_good: int = 40, n_per_defect: int = 8,
                   seed: int = 1234) -> dict[str, ValidationCategory]:
    """Defects on textures used neither by SynthTex nor for pretraining, for choosing a recipe.

    One category per image of ``VALIDATION_IMAGES``: normal images are random crops (a quarter to a half of
    the side), flipped at random; defective ones get one SynthTex defect each. Returns, per category, a
    :class:`ValidationCategory`: ``train`` (n_train, 3, S, S) and ``test`` (M, 3, S, S), :class:`ImageSet` s
    whose ``defects`` name each image's defect (``"good"`` for a normal one) and ``objects`` the category.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    rng = np.random.default_rng(seed)
    sources = {n: bundled_image(n) for n in VALIDATION_IMAGES}

    def crop(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 0.5))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        t = torch.from_numpy(np.ascontiguousarray(img[top:top + side, left:left + side])).permute(2, 0, 1)[None]
        out = F.interpolate(t, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        out = out[0].permute(1, 2, 0).numpy()
        return np.ascontiguousarray(out[:, ::-1] if rng.uniform() < 0.5 else out).clip(0, 1)

    out = {}
    for name, img in sources.items():
        train_x = np.stack([crop(img) for _ in range(n_train)])
        test_x, labels, masks, kinds = [], [], [], []
        for _ in range(n_test_good):
            test_x.append(crop(img))
            labels.append(0)
            masks.append(np.zeros((image_size, image_size), bool))
            kinds.append("good")
        donor_name = VALIDATION_IMAGES[(VALIDATION_IMAGES.index(name) + 1) % len(VALIDATION_IMAGES)]
        for defect in synthtex.DEFECTS:
            for _ in range(n_per_defect):
                bad, mask = defects.add_defect(crop(img), defect, rng, donor=crop(sources[donor_name]))
                test_x.append(bad)
                labels.append(1)
                masks.append(mask)
                kinds.append(defect)
        to_chw = lambda a: np.stack(a).transpose(0, 3, 1, 2).astype(np.float32)  # noqa: E731
        out[name] = ValidationCategory(
            ImageSet(to_chw(list(train_x)), labels=np.zeros(n_train, np.int64), defects=["good"] * n_train,
                     objects=[name] * n_train),
            ImageSet(to_chw(test_x), labels=np.array(labels), masks=np.stack(masks), defects=kinds,
                     objects=[name] * len(test_x)))
    return out
