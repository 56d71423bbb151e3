"""The book's one image type: a set of images with what is known about each.

Every reader of ``adlib.data`` returns an :class:`ImageSet`, every detector fits on one and scores one::

    train = mvtec.load_split(root, "carpet", "train", 128)   # ImageSet: (N, 3, 128, 128) float32 in [0, 1]
    test = mvtec.load_split(root, "carpet", "test", 128)     # ... with labels, masks, defect and file names
    scores = detector.fit(train).predict(test)               # adlib.eval.scores.Scores

Images are float32 (N, 3, H, W) in [0, 1], never uint8 and never normalised: a backbone normalises them
itself, and CLIP's preprocessing (``adlib.features.clip.to_tensor``) does what CLIP needs.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


def _names(values: Sequence[str] | None, n: int, what: str) -> tuple[str, ...]:
    if values is None:
        return ("",) * n
    values = tuple(str(v) for v in values)
    if len(values) != n:
        raise ValueError(f"{what} needs one entry per image: got {len(values)} for {n} images.")
    return values


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images and what is known about them; one entry per image in every field.

    ``images`` (N, 3, H, W) float32 in [0, 1]; ``labels`` (N,) int64, 0 = normal, 1 = anomalous, or None
    (unknown: new images to score); ``masks`` (N, H, W) bool, the anomalous pixels, or None (no ground truth:
    pixel metrics cannot be computed); ``defects`` the defect type of each image (``"good"`` for a normal one,
    ``""`` unknown); ``objects`` the object or category each image shows; ``files`` where each image was read
    from (``""`` for a generated one). Index it like an array (``test[test.labels == 1]``, ``test[:8]``) to get
    a smaller :class:`ImageSet`; :meth:`concat` joins several.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    masks: np.ndarray | None = None
    defects: tuple[str, ...] | None = None
    objects: tuple[str, ...] | None = None
    files: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        images = self.images
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.asarray(images)
        if images.dtype == np.uint8:
            raise ValueError("images are uint8: build the set with ImageSet.from_uint8(images_hwc), which scales "
                             "them to [0, 1].")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {images.shape}; a (N, H, W, 3) photo array "
                             "goes through ImageSet.from_uint8.")
        images = images.astype(np.float32, copy=False)
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"images must be in [0, 1], got values in [{images.min():.3g}, {images.max():.3g}]: "
                             "pass them before any normalisation (backbones and CLIP normalise them themselves).")
        n, (h, w) = len(images), images.shape[2:]
        labels, masks = self.labels, self.masks
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(labels) != n or not np.isin(labels, (0, 1)).all():
                raise ValueError(f"labels must be {n} values in {{0, 1}} (1 = anomalous), got {labels[:10]}...")
        if masks is not None:
            masks = np.asarray(masks)
            if masks.shape != (n, h, w):
                raise ValueError(f"masks must be (N, H, W) = {(n, h, w)} like the images, got {masks.shape}.")
            masks = masks.astype(bool, copy=False)
        set_ = object.__setattr__
        set_(self, "images", images)
        set_(self, "labels", labels)
        set_(self, "masks", masks)
        set_(self, "defects", _names(self.defects, n, "defects"))
        set_(self, "objects", _names(self.objects, n, "objects"))
        set_(self, "files", _names(self.files, n, "files"))

    @classmethod
    def from_uint8(cls, images: np.ndarray, **fields: Any) -> "ImageSet":
        """An :class:`ImageSet` of 8-bit photos (N, H, W, 3) uint8 (e.g. rendered scenes); ``fields`` as the class."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"from_uint8 needs (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}.")
        return cls(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).numpy(), **fields)

    @classmethod
    def concat(cls, sets: Sequence["ImageSet"]) -> "ImageSet":
        """One set of all images of ``sets``, in order; labels and masks are kept only where every set has them."""
        sets = list(sets)
        if not sets:
            raise ValueError("concat needs at least one ImageSet.")

        def joined(field: str) -> np.ndarray | None:
            parts = [getattr(s, field) for s in sets]
            return None if any(p is None for p in parts) else np.concatenate(parts)

        return cls(np.concatenate([s.images for s in sets]), joined("labels"), joined("masks"),
                   *(sum((getattr(s, f) for s in sets), ()) for f in ("defects", "objects", "files")))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Any) -> "ImageSet":
        """The images at ``index`` (an int, a slice, integer indices or a boolean mask) as an :class:`ImageSet`."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        pick = lambda names: tuple(names[i] for i in idx)  # noqa: E731
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx],
                        None if self.masks is None else self.masks[idx], pick(self.defects), pick(self.objects),
                        pick(self.files))

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return tuple(self.images.shape[2:])  # type: ignore[return-value]

    def tensor(self) -> torch.Tensor:
        """The images as a float32 torch tensor (N, 3, H, W), sharing memory with ``images`` (a copy when they are
        read-only, as joblib hands them to its workers: torch cannot share memory it may not write)."""
        return torch.from_numpy(self.images if self.images.flags.writeable else self.images.copy())

    def picture(self, i: int) -> np.ndarray:
        """Image ``i`` as (H, W, 3) for ``matplotlib``'s ``imshow``."""
        return self.images[i].transpose(1, 2, 0)

    def one_per_defect(self) -> list[int]:
        """The index of the first image of each defect type, in order of appearance ("good" included)."""
        return [self.defects.index(d) for d in dict.fromkeys(self.defects)]


def as_image_set(images: "ImageSet | np.ndarray | torch.Tensor") -> ImageSet:
    """``images`` as an :class:`ImageSet`: itself, or a float (N, 3, H, W) array in [0, 1] wrapped unlabelled.

    Used by: ``adlib.methods.base.Detector``, ``adlib.features.clip.to_tensor``.
    """
    return images if isinstance(images, ImageSet) else ImageSet(images)
