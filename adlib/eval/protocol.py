"""The one-class protocol in one call: fit a detector on normal images, score the test set, measure cost."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from adlib.core.runtime import PeakMemory
from adlib.eval import metrics


def evaluate(detector: Any, train_images: Any, test_images: Any, labels: Any,
             masks: Any | None = None) -> tuple[dict[str, float | None], np.ndarray, np.ndarray]:
    """Fit ``detector`` on ``train_images``, score ``test_images`` and measure it.

    Returns the row ``{"image_auroc", "pixel_auroc", "aupro", "fit_s", "predict_s", "peak_mb"}`` (pixel metrics
    None when ``masks`` (M, H, W) is None: a folder without ground truth), and the image scores (M,) and maps
    (M, H, W). ``peak_mb``: see :class:`PeakMemory`.

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    with PeakMemory(detector.device) as memory:
        t0 = time.perf_counter()
        detector.fit(train_images)
        t1 = time.perf_counter()
        scores, maps = detector.predict(test_images)
        t2 = time.perf_counter()
    row: dict[str, float | None] = {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": None,
                                    "aupro": None}
    if masks is not None:
        row["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
        row["aupro"] = metrics.aupro(masks, maps)
    row |= {"fit_s": t1 - t0, "predict_s": t2 - t1, "peak_mb": memory.peak_mb}
    return row, scores, maps
