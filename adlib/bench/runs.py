"""One run path: fit a method on one category of an MVTec-format folder and score its test split.

``python -m adlib run`` and the benchmark (``python -m adlib bench``, chapter 11) both call
:func:`run_category`, so they read folders, decide on pixel metrics and seed in one way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adlib.core.runtime import PeakMemory, seed_everything
from adlib.data import mvtec
from adlib.data.imageset import ImageSet
from adlib.eval import protocol
from adlib.eval.scores import Scores
from adlib.methods import catalog
from adlib.methods.base import Detector


@dataclass
class CategoryRun:
    """What one run of a method on one category leaves: the fitted ``detector``; the ``row`` of
    :func:`adlib.eval.protocol.evaluate` plus ``added_mb`` (peak minus the process's memory before the fit); the
    ``test`` split (:class:`adlib.data.imageset.ImageSet`, masks None without ground truth), the detector's
    ``scores`` on it and ``n_train`` training images.

    Used by: ``adlib.bench.runs.run_category``.
    """

    detector: Detector
    row: dict[str, float | None]
    test: ImageSet
    scores: Scores
    n_train: int


def run_category(method: str, root: str | Path, category: str, *, image_size: int = 128,
                 backbone: str = "effnet-lite0", device: str = "cpu", seed: int = 0,
                 options: dict[str, Any] | None = None) -> CategoryRun:
    """Seed, read ``category``'s train/good and test images at ``image_size`` px, fit ``method`` (a name of
    :data:`adlib.methods.catalog.METHODS`, with ``options`` over its defaults) and score the test split.

    Pixel metrics need a mask for every defect image: a folder where some defect type has no ``ground_truth/``
    masks gives image-level metrics only (``test.masks`` None), never all-zero masks that would count its defect
    pixels as normal. A detector that loaded a shipped training instead of training (chapter 7's CFA on its own
    images) reports that training's recorded seconds as ``fit_s``.

    Used by: ``adlib.bench.benchmark.run_one``, ``adlib.bench.folders``.
    """
    seed_everything(seed)
    train = mvtec.load_split(root, category, "train", image_size)
    test = mvtec.load_split(root, category, "test", image_size)
    before = 0.0 if str(device).startswith("cuda") else PeakMemory.rss_mb()  # CUDA peaks start at 0
    det = catalog.make_detector(
        method, **catalog.run_options(method, category, backbone, {"device": device, "seed": seed} | (options or {})))
    row, scores = protocol.evaluate(det, train, test)
    row["added_mb"] = row["peak_mb"] - before
    if getattr(det, "shipped", None) is not None:  # loaded, not trained: its fit cost is the training's, as recorded
        row["fit_s"] = det.shipped.seconds
    return CategoryRun(det, row, test, scores, len(train))
