"""Paper-profile folders of images with captions or class names (CLIP's evaluation and training data)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- paper-profile data (files on disk)

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".JPEG", ".webp")


def read_image_text_folder(root: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """An image-caption set on disk: every ``root/**/<name>.<jpg|png|...>`` with a ``<name>.txt`` caption.

    Returns (image paths, captions). This is how the paper profile points CLIPN at its training pairs
    (the paper uses CC3M; any subset exported as image + caption files works).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    root = Path(root)
    images = [p for p in root.rglob("*") if p.suffix in _IMAGE_EXT] if root.is_dir() else []
    pairs = sorted((p, p.with_suffix(".txt")) for p in images)
    pairs = [(img, txt) for img, txt in pairs if txt.is_file()]
    if not pairs:
        raise FileNotFoundError(
            f"No image-caption pairs under {root}. Put images there with a caption file of the same name "
            f"(e.g. 000.jpg + 000.txt), for instance a CC3M subset exported with img2dataset.")
    return [p for p, _ in pairs], [t.read_text().strip() for _, t in pairs]


def read_image_folder(root: str | os.PathLike, classnames_file: str | None = "classnames.txt"
                      ) -> tuple[list[Path], np.ndarray, list[str]]:
    """An ImageFolder tree ``root/<class>/*.jpg``: (image paths, (N,) labels, class names).

    Class names come from ``root/<classnames_file>`` (one readable name per line, in sorted folder
    order, as for ImageNet's wnid folders) when it exists, else from the folder names.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    paths, labels = [], []
    for k, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix in _IMAGE_EXT)
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise FileNotFoundError(f"No images in class folders under {root} (expected {root}/<class>/*.jpg). "
                                "Download the data set and unpack it there.")
    names = [f.name for f in folders]
    if classnames_file and (root / classnames_file).is_file():
        names = [line.strip() for line in (root / classnames_file).read_text().splitlines() if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"{root / classnames_file} has {len(names)} names for {len(folders)} class folders.")
    return paths, np.array(labels), names
