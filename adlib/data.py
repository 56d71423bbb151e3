"""Data: one-class splits and (from the "Datasets and metrics" chapter on) MVTec-format folders.

Labels follow one convention everywhere in the book: ``0`` = normal, ``1`` = anomalous.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from tqdm import tqdm  # text bars: a widget would need JavaScript in the built book

from adlib import download, synthtex
from adlib.home import data_home  # noqa: F401  (re-exported: chapters call data.data_home())
from adlib.profiles import check_profile


class OneClassSplit(NamedTuple):
    """A one-class split: train on normal samples only, test on normal + anomalous.

    ``x_train``: (n_train, d) float32, ``x_test``: (n_test, d) float32, ``y_test``: (n_test,) int64
    with 1 = anomalous, ``classes_test``: (n_test,) original class of each test sample.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``)
    """

    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes_test: np.ndarray


def one_class_digits(normal_class: int | Sequence[int], *, test_fraction: float = 0.5, seed: int = 0) -> OneClassSplit:
    """sklearn's 8x8 digits as a one-class problem: ``normal_class`` is normal, the other digits anomalous.

    ``normal_class``: one digit, or several (a *multimodal* normal class; e.g. nine digits, leaving one out as
    the anomaly). Every class is split ``1 - test_fraction`` / ``test_fraction`` (stratified, seeded);
    training keeps only the normal part of the first split, testing uses all of the second. Pixels are scaled
    to [0, 1], so ``x`` is (n, 64); reshape to (n, 8, 8) to look at it.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    normal = [normal_class] if isinstance(normal_class, (int, np.integer)) else list(normal_class)
    if not normal or any(c not in range(10) for c in normal) or len(set(normal)) == 10:
        raise ValueError(f"normal_class must be one digit 0-9 or a list of 1-9 distinct digits, got {normal_class!r}.")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return OneClassSplit(
        x_train=x_tr[np.isin(y_tr, normal)],
        x_test=x_te,
        y_test=(~np.isin(y_te, normal)).astype(np.int64),
        classes_test=y_te,
    )


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
    "  - adlib.download.fetch(\"mvtec_ad\", <root>) (paper profile, needs internet),\n"
    "  - the book's offline SynthTex set: adlib.synthtex.generate_for_profile(\"book\", <root>)."
)


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (any of :data:`IMAGE_EXTENSIONS`, any letter case), sorted by name;
    hidden files (``._x.png``) are skipped.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
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


def _read_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as RGB (grey images are replicated), naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read image {path}: {err}. Replace the file or delete it.") from err


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255.0)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) -> (3, *size): antialiased bilinear, the resize of every image the book reads."""
    return TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def read_images(paths: Sequence[str | Path], image_size: int | tuple[int, int] = 256) -> np.ndarray:
    """Image files (png, jpg, ...) -> (N, 3, H, W) float32 in [0, 1], resized as :class:`MVTecDataset` does.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    size = _pair(image_size, "image_size")
    if not paths:
        raise ValueError("No image files given.")
    return torch.stack([_resize(_to_tensor(_read_rgb(Path(p))), size) for p in paths]).numpy()


def _read_mask(path: Path) -> np.ndarray:
    """Decode a mask file to (H, W) bool: any non-zero value (in any colour channel) is anomalous."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read mask {path}: {err}. Replace the file or delete it.") from err
    if arr.ndim == 3:  # drop alpha (non-zero everywhere): LA keeps channel 0, RGB(A) its colours
        arr = arr[..., : 3 if arr.shape[-1] >= 3 else 1].max(axis=-1)
    return arr > 0


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read image {path}: {err}. Replace the file or delete it.") from err


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
    """``wanted`` (None: every category under ``root``), each checked to exist there; an error names the expected
    layout when ``root`` has no category, and the available ones when a name is unknown.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    available = categories(root)
    if not available:
        raise FileNotFoundError(f"No category folders (with train/ or test/) under {root}. Expected layout:\n"
                                f"{LAYOUT}")
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
                if _image_size(mask) != _image_size(image):
                    raise ValueError(
                        f"Mask {mask} is {_image_size(mask)} (width, height) but its image {image} is "
                        f"{_image_size(image)}; a mask must have exactly the size of its image."
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
        image = _to_tensor(_read_rgb(path))
        if mask_path is None:
            mask = torch.zeros((1, *image.shape[1:]), dtype=torch.float32)
        else:
            mask = torch.from_numpy(_read_mask(mask_path)).float()[None]
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


def load_arrays(
    root: str | Path,
    category: str,
    split: str = "train",
    image_size: int | tuple[int, int] = 256,
    *,
    crop_size: int | tuple[int, int] | None = None,
    normalize: bool | tuple[Sequence[float], Sequence[float]] = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """A whole (small) split in memory, read through :class:`MVTecDataset`.

    Returns ``images`` (N, 3, H, W) float32, ``labels`` (N,) int64 (1 = defect), ``masks``
    (N, H, W) uint8 in {0, 1}, ``paths`` and ``defects`` (lists of N str).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    ds = MVTecDataset(root, category, split, image_size=image_size, crop_size=crop_size, normalize=normalize)
    items = [ds[i] for i in range(len(ds))]
    return (
        torch.stack([it["image"] for it in items]).numpy(),
        np.array([it["label"] for it in items], dtype=np.int64),
        torch.stack([it["mask"][0] for it in items]).numpy().astype(np.uint8),
        [it["path"] for it in items],
        [it["defect"] for it in items],
    )


def visa_to_mvtec(
    visa_root: str | Path,
    out_root: str | Path,
    split_csv: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Apply VisA's official one-class split and write the result in the MVTec layout; returns ``out_root``.

    ``split_csv`` (default ``<visa_root>/split_csv/1cls.csv``, shipped with the data) has the columns
    ``object,split,label,image,mask`` with labels ``normal``/``anomaly`` and paths relative to
    ``visa_root``. Normal images go to ``<object>/<split>/good/``, anomalies to ``<object>/test/bad/``
    with their mask binarised (any non-zero -> 255) as ``ground_truth/bad/<name>_mask.png``; this is
    what the VisA authors' ``prepare_data.py`` and anomalib do. Everything is checked before the first
    file is written, and existing files are kept unless ``overwrite=True``.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    visa_root, out_root = Path(visa_root), Path(out_root)
    split_csv = visa_root / "split_csv" / "1cls.csv" if split_csv is None else Path(split_csv)
    if not split_csv.is_file():
        raise FileNotFoundError(
            f"VisA split file {split_csv} not found. It ships with VisA (split_csv/1cls.csv in "
            "VisA_20220922.tar); get the data with adlib.download.fetch(\"visa\", <dir>) or from "
            "https://github.com/amazon-science/spot-diff."
        )
    columns = ["object", "split", "label", "image", "mask"]
    with split_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or [c.strip() for c in reader.fieldnames] != columns:
            raise ValueError(f"{split_csv} has columns {reader.fieldnames}; expected {','.join(columns)}.")
        rows = list(reader)

    plan: list[tuple[Path, Path, Path | None, Path | None]] = []  # (src image, dst image, src mask, dst mask)
    planned: set[Path] = set()
    for line, row in enumerate(rows, start=2):
        where = f"{split_csv}, line {line}"
        if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
            raise ValueError(
                f"{where}: split must be train/test and label normal/anomaly, got {row['split']!r}, {row['label']!r}."
            )
        if row["split"] == "train" and row["label"] == "anomaly":
            raise ValueError(f"{where}: an anomaly in the training split; this is not a one-class split file.")
        src = visa_root / row["image"]
        if not src.is_file():
            raise FileNotFoundError(f"{where}: image {src} not found; is {visa_root} the extracted VisA folder?")
        defect = "good" if row["label"] == "normal" else "bad"
        dst = out_root / row["object"] / row["split"] / defect / src.name
        src_mask = dst_mask = None
        if defect == "bad":
            src_mask = visa_root / row["mask"] if row["mask"] else None
            if src_mask is None or not src_mask.is_file():
                raise FileNotFoundError(f"{where}: anomaly {src} has no mask file ({row['mask']!r}).")
            dst_mask = out_root / row["object"] / "ground_truth" / "bad" / f"{src.stem}_mask.png"
        for target in (dst, dst_mask):
            if target is None:
                continue
            if target in planned:
                raise ValueError(f"{where}: two rows write to {target}; image names must be unique per object.")
            if target.exists() and not overwrite:
                raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it.")
            planned.add(target)
        plan.append((src, dst, src_mask, dst_mask))

    for src, dst, src_mask, dst_mask in tqdm(plan, desc="VisA -> MVTec layout", unit="img"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        if src_mask is not None and dst_mask is not None:
            dst_mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_read_mask(src_mask).astype(np.uint8) * 255).save(dst_mask)
    return out_root


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def one_class_cifar10(root: str | Path, normal_class: int, download: bool = False) -> OneClassSplit:
    """CIFAR-10 as a one-class problem, the standard protocol of the deep one-class papers.

    Train: the ``normal_class`` images of the CIFAR-10 train split (5000). Test: the whole test split
    (10000), ``y_test`` = 1 for the nine other classes. Pixels are in [0, 1] and ``x`` is
    (n, 3072), flattened channel-first: ``x.reshape(-1, 3, 32, 32)`` gives torch's image layout.
    ``download=True`` lets torchvision fetch the data into ``root`` (needs internet).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    from torchvision.datasets import CIFAR10

    if normal_class not in range(10):
        raise ValueError(f"normal_class must be a CIFAR-10 class index 0-9 {CIFAR10_CLASSES}, got {normal_class!r}.")
    root = Path(root)
    try:
        train, test = (CIFAR10(str(root), train=t, download=download) for t in (True, False))
    except RuntimeError as err:
        raise FileNotFoundError(
            f"CIFAR-10 not found (or incomplete) under {root}: expected {root / 'cifar-10-batches-py'}. "
            "Call one_class_cifar10(root, normal_class, download=True) on a machine with internet, or "
            "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into "
            f"{root}."
        ) from err

    def to_x(data: np.ndarray) -> np.ndarray:  # (n, 32, 32, 3) uint8 -> (n, 3072) float32, channel-first
        return (np.asarray(data).transpose(0, 3, 1, 2).reshape(len(data), -1) / 255.0).astype(np.float32)

    y_train, y_test = np.asarray(train.targets, dtype=np.int64), np.asarray(test.targets, dtype=np.int64)
    return OneClassSplit(
        x_train=to_x(np.asarray(train.data)[y_train == normal_class]),
        x_test=to_x(test.data),
        y_test=(y_test != normal_class).astype(np.int64),
        classes_test=y_test,
    )


def benchmark_root(profile: str) -> Path:
    """The MVTec-format benchmark a profile evaluates on, ready to read with :class:`MVTecDataset`.

    ``smoke`` and ``book``: SynthTex, generated on first use (``adlib.synthtex``). ``paper``: MVTec AD
    under ``data_home()/mvtec_ad``, downloaded and verified through ``adlib.download`` if absent; offline
    this stops with a message saying where to put the archive.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if check_profile(profile) == "paper":
        return download.fetch("mvtec_ad", data_home() / "mvtec_ad")
    return synthtex.generate_for_profile(profile)
