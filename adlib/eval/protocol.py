"""The one-class protocol in one call: fit a detector on normal images, score the test set, measure cost."""
from __future__ import annotations

import time
from typing import Any

from adlib.core.runtime import PeakMemory
from adlib.data.imageset import ImageSet
from adlib.eval import metrics
from adlib.eval.scores import Scores


def evaluate(detector: Any, train: ImageSet | None, test: ImageSet) -> tuple[dict[str, float | None], Scores]:
    """Fit ``detector`` on ``train``, score ``test`` (labelled) and measure it. ``train`` None: the detector is
    fitted already (e.g. a shipped model), only scored; ``fit_s`` is then None.

    Returns the row ``{"image_auroc", "pixel_auroc", "aupro", "fit_s", "predict_s", "peak_mb"}`` (pixel metrics
    None when ``test.masks`` is None: a folder without ground truth) and the detector's :class:`Scores`.
    ``peak_mb``: see :class:`PeakMemory`.

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    if test.labels is None:
        raise ValueError("evaluate needs a labelled test set (test.labels is None); score unlabelled images with "
                         "detector.predict.")
    with PeakMemory(detector.device) as memory:
        t0 = time.perf_counter()
        if train is not None:
            detector.fit(train)
        t1 = time.perf_counter()
        scores = detector.predict(test)
        t2 = time.perf_counter()
    row: dict[str, float | None] = {"image_auroc": metrics.image_auroc(test.labels, scores.image),
                                    "pixel_auroc": None, "aupro": None}
    if test.masks is not None:
        row["pixel_auroc"] = metrics.pixel_auroc(test.masks, scores.maps)
        row["aupro"] = metrics.aupro(test.masks, scores.maps)
    row |= {"fit_s": None if train is None else t1 - t0, "predict_s": t2 - t1, "peak_mb": memory.peak_mb}
    return row, scores
