"""Data: one-class splits and (from the "Datasets and metrics" chapter on) MVTec-format folders.

Labels follow one convention everywhere in the book: ``0`` = normal, ``1`` = anomalous.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from adlib.core.home import data_home
from adlib.core.profiles import check_profile
from adlib.data import download, image_files, synthtex
from adlib.data.imageset import ImageSet

# MVTec-format folders, from the "Datasets and metrics" chapter (notebooks/02_datasets_and_metrics.ipynb).

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# MVTec AD, MPDD, VisA and SynthTex call the normal folder "good"; BTAD calls it "ok".
NORMAL_DIRS = ("good", "ok")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LAYOUT = (
    "  <root>/<category>/train/good/*.png                 normal training images\n"
    "  <root>/<category>/test/good/*.png                  normal test images\n"
    "  <root>/<category>/test/<defect>/*.png              anomalous test images\n"
    "  <root>/<category>/ground_truth/<defect>/<name>_mask.png   one mask per anomalous image\n"
    "(png, jpg, jpeg, bmp or tif; BTAD's ok/ folders and <name>.png masks are accepted too)"
)
_WHERE_TO_GET_DATA = (
    "Get data with one of:\n"
    "  - MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (extract it into <root>),\n"
    "  - adlib.data.download.fetch(\"mvtec_ad\", <root>) (paper profile, needs internet),\n"
    "  - the book's offline SynthTex set: adlib.data.synthtex.generate_for_profile(\"book\", <root>)."
)


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (any of :data:`IMAGE_EXTENSIONS`, any letter case), sorted by name;
    hidden files (``._x.png``) are skipped.

    Used by: ``adlib.data.mvtec.MVTecDataset``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _mask_key(mask: Path) -> str:
    """The image stem a mask belongs to: ``000_mask.png`` (MVTec) and ``000.png`` (BTAD) -> ``000``."""
    return mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem


def _to_tensor(path: Path) -> torch.Tensor:
    """An image file as (3, H, W) float32 in [0, 1] (:func:`adlib.data.image_files.read_image`)."""
    return torch.from_numpy(image_files.read_image(path)).permute(2, 0, 1)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) -> (3, *size): antialiased bilinear, the resize of every image the book reads."""
    return TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def read_images(paths: Sequence[str | Path], image_size: int | tuple[int, int] = 256) -> ImageSet:
    """Image files (png, jpg, ...) -> an unlabelled :class:`ImageSet` (N, 3, H, W) in [0, 1] with their file
    names, resized as :class:`MVTecDataset` does.

    Used by: ``adlib.bench.deploy``.
    """
    size = _pair(image_size, "image_size")
    if not paths:
        raise ValueError("No image files given.")
    images = torch.stack([_resize(_to_tensor(Path(p)), size) for p in paths]).numpy()
    return ImageSet(images, files=[str(p) for p in paths])


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}.")
    return hw  # type: ignore[return-value]


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise FileNotFoundError(
            f"No data set found at {root}. Expected the MVTec AD layout:\n{LAYOUT}\n{_WHERE_TO_GET_DATA}"
        )


def categories(root: str | Path) -> list[str]:
    """Sorted names of the categories under ``root`` (folders that hold a ``train/`` or ``test/`` folder).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    root = Path(root)
    _check_root(root)
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())
    )


def select_categories(root: str | Path, wanted: Sequence[str] | None = None) -> list[str]:
    """``wanted`` (None: every category under ``root``), each checked to exist there and listed once; an error names
    the expected layout when ``root`` has no category (and its parent when ``root`` is a category folder itself),
    and the available ones when a name is unknown.

    Used by: ``adlib.bench.benchmark.sweep``, ``adlib.bench.folders.run``.
    """
    root = Path(root)
    available = categories(root)
    if not available:
        if (root / "train").is_dir() or (root / "test").is_dir():
            raise FileNotFoundError(f"{root} is one category folder (it holds train/ or test/), not a root of "
                                    f"categories: pass its parent, {root.parent}, with --category {root.name}.")
        raise FileNotFoundError(f"No category folders (with train/ or test/) under {root}. Expected layout:\n"
                                f"{LAYOUT}")
    twice = sorted({c for c in wanted or () if list(wanted).count(c) > 1})
    if twice:
        raise ValueError(f"Category {twice[0]!r} is listed twice; list each category once.")
    unknown = [c for c in wanted or () if c not in available]
    if unknown:
        raise ValueError(f"Unknown category {unknown[0]!r} in {root}. Available categories: {available}.")
    return list(wanted or available)


class MVTecDataset(Dataset):
    """One category of an MVTec-format folder (MVTec AD, BTAD, MPDD, converted VisA, SynthTex, your own).

    Each item is a dict: ``image`` (3, H, W) float32 in [0, 1] (or normalised), ``label`` int
    (0 = good, 1 = defect), ``mask`` (1, H, W) float32 in {0, 1} (all zeros for good images),
    ``path`` str and ``defect`` str (the folder name, e.g. ``"good"`` or ``"scratch"``). A defect folder
    without any masks in ``ground_truth/`` is accepted (:attr:`has_masks` is then False: image-level metrics
    only); one with some masks missing is an error.

    Images are resized to ``image_size`` (int = square, or (h, w)) with antialiased bilinear
    interpolation, masks with nearest neighbour so they stay binary; ``crop_size`` then center-crops
    both. ``normalize=True`` applies the ImageNet mean/std, a ``(mean, std)`` pair applies that.
    The folder is checked when the dataset is built (missing masks, stray masks, mask sizes), so a
    broken data set fails at once with the file to fix, not mid-way through an epoch.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        split: str = "train",
        image_size: int | tuple[int, int] = 256,
        crop_size: int | tuple[int, int] | None = None,
        normalize: bool | tuple[Sequence[float], Sequence[float]] = False,
    ) -> None:
        self.root = Path(root)
        _check_root(self.root)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        self.category, self.split = category, split
        self.image_size = _pair(image_size, "image_size")
        self.crop_size = None if crop_size is None else _pair(crop_size, "crop_size")
        if self.crop_size and any(c > s for c, s in zip(self.crop_size, self.image_size)):
            raise ValueError(f"crop_size {self.crop_size} is larger than image_size {self.image_size}.")
        if normalize is True:
            normalize = (IMAGENET_MEAN, IMAGENET_STD)
        self.normalize = None if normalize is False else tuple(
            torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in normalize
        )
        cat_dir = self.root / category
        if not cat_dir.is_dir():
            hint = (
                f" {self.root} itself looks like a category folder: pass its parent as root."
                if (self.root / "train").is_dir() or (self.root / "test").is_dir() else ""
            )
            raise ValueError(
                f"Unknown category {category!r} in {self.root}. Available categories: {categories(self.root)}.{hint}"
            )
        self.samples = self._train_samples(cat_dir) if split == "train" else self._test_samples(cat_dir)

    def _train_samples(self, cat_dir: Path) -> list[tuple[Path, int, Path | None, str]]:
        samples = [(p, 0, None, d) for d in NORMAL_DIRS for p in list_images(cat_dir / "train" / d)]
        if not samples:
            raise FileNotFoundError(
                f"No training images in {cat_dir / 'train' / 'good'} (extensions {', '.join(IMAGE_EXTENSIONS)}). "
                f"One-class training needs normal images there. Expected layout:\n{LAYOUT}"
            )
        return samples

    @property
    def has_masks(self) -> bool:
        """True when every defect image has a mask; False when some defect folder has no ``ground_truth/``
        masks (accepted: image-level metrics only; such images get all-zero ``mask`` items)."""
        return all(mask is not None for _, label, mask, _ in self.samples if label == 1)

    @property
    def defects(self) -> list[str]:
        """The defect type of every sample, in order ("good" or the folder name, e.g. "scratch")."""
        return [defect for *_, defect in self.samples]

    def _test_samples(self, cat_dir: Path) -> list[tuple[Path, int, Path | None, str]]:
        test_dir, gt_dir = cat_dir / "test", cat_dir / "ground_truth"
        defects = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
        samples: list[tuple[Path, int, Path | None, str]] = []
        for defect in defects:
            images = list_images(test_dir / defect)
            if defect in NORMAL_DIRS:
                samples += [(p, 0, None, defect) for p in images]
                continue
            masks = {_mask_key(m): m for m in list_images(gt_dir / defect)}
            if not masks:  # no ground truth for this defect type at all: image-level labels only
                samples += [(p, 1, None, defect) for p in images]
                continue
            for image in images:
                mask = masks.pop(image.stem, None)
                if mask is None:
                    raise FileNotFoundError(
                        f"Defect image {image} has no mask: expected {gt_dir / defect / (image.stem + '_mask.png')}. "
                        "Every test image outside good/ needs a binary mask of the same size."
                    )
                if image_files.image_size(mask) != image_files.image_size(image):
                    raise ValueError(
                        f"Mask {mask} is {image_files.image_size(mask)} (width, height) but its image {image} is "
                        f"{image_files.image_size(image)}; a mask must have exactly the size of its image."
                    )
                samples.append((image, 1, mask, defect))
            if masks:
                stray = sorted(masks.values())[0]
                raise FileNotFoundError(
                    f"Mask {stray} has no matching image: expected {test_dir / defect / _mask_key(stray)}.<ext>. "
                    "Delete the mask or restore the image."
                )
        stray_dirs = sorted(
            p for p in (gt_dir.iterdir() if gt_dir.is_dir() else [])
            if p.is_dir() and p.name not in defects and p.name not in NORMAL_DIRS and list_images(p)
        )
        if stray_dirs:
            raise FileNotFoundError(
                f"Mask {list_images(stray_dirs[0])[0]} has no matching image: there is no folder "
                f"{test_dir / stray_dirs[0].name}. Delete the masks or restore the images."
            )
        if not samples:
            raise FileNotFoundError(f"No test images under {test_dir}. Expected layout:\n{LAYOUT}")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label, mask_path, defect = self.samples[index]
        image = _to_tensor(path)
        if mask_path is None:
            mask = torch.zeros((1, *image.shape[1:]), dtype=torch.float32)
        else:
            mask = torch.from_numpy(image_files.read_mask(mask_path)).float()[None]
        image = _resize(image, self.image_size)
        # NEAREST_EXACT samples pixel centres as the bilinear image resize does; plain NEAREST shifts
        # the mask by up to a pixel relative to the image.
        mask = TF.resize(mask, list(self.image_size), interpolation=InterpolationMode.NEAREST_EXACT)
        if self.crop_size is not None:
            image, mask = TF.center_crop(image, list(self.crop_size)), TF.center_crop(mask, list(self.crop_size))
        if self.normalize is not None:
            mean, std = self.normalize
            image = (image - mean) / std
        return {"image": image, "label": label, "mask": mask, "path": str(path), "defect": defect}


def write_images(root: str | Path, category: str, defect: str, pixels: np.ndarray, masks: np.ndarray | None = None,
                 split: str = "test") -> None:
    """Write (N, H, W, 3) uint8 ``pixels`` in the MVTec layout: ``<root>/<category>/<split>/<defect>/000.png`` and,
    for a defect, the (N, H, W) ``masks`` as ``<root>/<category>/ground_truth/<defect>/000_mask.png`` (0/255). The
    folders must not exist yet (nothing is overwritten).

    Used by: ``adlib.data.captionworld.export_mvtec``.
    """
    from PIL import Image

    folder = Path(root) / category / split / defect
    folder.mkdir(parents=True)
    mask_folder = Path(root) / category / "ground_truth" / defect
    if defect != "good":
        if masks is None or masks.shape != pixels.shape[:3]:
            raise ValueError(f"{category}/{defect}: need one (H, W) mask per image, got "
                             f"{None if masks is None else masks.shape} for images {pixels.shape}.")
        mask_folder.mkdir(parents=True)
    for i, picture in enumerate(pixels):
        Image.fromarray(picture).save(folder / f"{i:03d}.png")
        if defect != "good":
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(mask_folder / f"{i:03d}_mask.png")


def load_split(
    root: str | Path,
    category: str,
    split: str = "train",
    image_size: int | tuple[int, int] = 256,
    *,
    crop_size: int | tuple[int, int] | None = None,
) -> ImageSet:
    """A whole (small) split of one category in memory, read through :class:`MVTecDataset`.

    Returns an :class:`adlib.data.imageset.ImageSet`: images (N, 3, H, W) float32 in [0, 1], labels (1 =
    defect), masks (N, H, W) bool, or None when a defect folder has no masks (:attr:`MVTecDataset.has_masks`:
    image-level metrics only), the defect folder of each image, the category as its object and its file.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    ds = MVTecDataset(root, category, split, image_size=image_size, crop_size=crop_size)
    items = [ds[i] for i in range(len(ds))]
    return ImageSet(
        torch.stack([it["image"] for it in items]).numpy(),
        labels=np.array([it["label"] for it in items], dtype=np.int64),
        masks=torch.stack([it["mask"][0] for it in items]).numpy() > 0 if ds.has_masks else None,
        defects=[it["defect"] for it in items],
        objects=[category] * len(items),
        files=[it["path"] for it in items],
    )


def benchmark_root(profile: str) -> Path:
    """The MVTec-format benchmark a profile evaluates on, ready to read with :class:`MVTecDataset`.

    ``smoke`` and ``book``: SynthTex, generated on first use (``adlib.data.synthtex``). ``paper``: MVTec AD
    under ``data_home()/mvtec_ad``, downloaded and verified through ``adlib.data.download`` if absent; offline
    this stops with a message saying where to put the archive.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if check_profile(profile) == "paper":
        return download.fetch("mvtec_ad", data_home() / "mvtec_ad")
    return synthtex.generate_for_profile(profile)
