"""One run path: fit a method on one category of an MVTec-format folder and score its test split.

``python -m adlib run`` and the benchmark (``python -m adlib bench``, chapter 11) both call
:func:`run_category`, so they read folders, decide on pixel metrics and seed in one way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adlib.core.runtime import PeakMemory, seed_everything
from adlib.data import mvtec
from adlib.eval import protocol
from adlib.methods import catalog
from adlib.methods.base import FeatureDetector


@dataclass
class CategoryRun:
    """What one run of a method on one category leaves: the fitted ``detector``; the ``row`` of
    :func:`adlib.eval.protocol.evaluate` plus ``added_mb`` (peak minus the process's memory before the fit); the
    test split's ``images`` (M, 3, H, W) in [0, 1], ``labels`` (M,), ``scores`` (M,), ``maps`` (M, H, W), ``masks``
    (M, H, W) bool or None, ``defects`` and ``paths``; ``n_train`` training images.

    Used by: ``adlib.bench.runs.run_category``.
    """

    detector: FeatureDetector
    row: dict[str, float | None]
    images: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray | None
    defects: list[str]
    paths: list[str]
    n_train: int


def run_category(method: str, root: str | Path, category: str, *, image_size: int = 128,
                 backbone: str = "effnet-lite0", device: str = "cpu", seed: int = 0,
                 options: dict[str, Any] | None = None) -> CategoryRun:
    """Seed, read ``category``'s train/good and test images at ``image_size`` px, fit ``method`` (a name of
    :data:`adlib.methods.catalog.METHODS`, with ``options`` over its defaults) and score the test split.

    Pixel metrics need a mask for every defect image: a folder where some defect type has no ``ground_truth/``
    masks gives image-level metrics only (``masks`` None), never all-zero masks that would count its defect
    pixels as normal.

    Used by: ``adlib.bench.benchmark.run_one``, ``python -m adlib run``.
    """
    seed_everything(seed)
    x_train, *_ = mvtec.load_arrays(root, category, "train", image_size)
    test = mvtec.MVTecDataset(root, category, "test", image_size=image_size)
    x_test, labels, masks, paths, defects = mvtec.load_arrays(root, category, "test", image_size)
    masks = masks if test.has_masks else None
    before = 0.0 if str(device).startswith("cuda") else PeakMemory.rss_mb()  # CUDA peaks start at 0
    det = catalog.make_detector(
        method, **catalog.run_options(method, category, backbone, {"device": device, "seed": seed} | (options or {})))
    row, scores, maps = protocol.evaluate(det, x_train, x_test, labels, masks)
    row["added_mb"] = row["peak_mb"] - before
    return CategoryRun(det, row, x_test, labels, scores, maps, masks, list(defects), [str(p) for p in paths],
                       len(x_train))
