"""VisA to MVTec layout: convert the VisA data set so ``mvtec`` reads it like MVTec AD."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm  # text bars: a widget would need JavaScript in the built book

from adlib.data.image_files import read_mask


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

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    visa_root, out_root = Path(visa_root), Path(out_root)
    split_csv = visa_root / "split_csv" / "1cls.csv" if split_csv is None else Path(split_csv)
    if not split_csv.is_file():
        raise FileNotFoundError(
            f"VisA split file {split_csv} not found. It ships with VisA (split_csv/1cls.csv in "
            "VisA_20220922.tar); get the data with adlib.data.download.fetch(\"visa\", <dir>) or from "
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
            Image.fromarray(read_mask(src_mask, label_indices=True).astype(np.uint8) * 255).save(dst_mask)
    return out_root
