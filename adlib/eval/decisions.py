"""From anomaly scores to decisions: thresholds, split-conformal p-values and the rates they give.

AUROC ranks; a deployed detector must say yes or no. Three ways to put the threshold:

* **F1-max** (:func:`f1_max_threshold`): the score that maximises F1 on labelled test images. It needs defects with
  labels, and chosen on the test set it flatters the F1 it reports (anomalib's default, with its labelled images).
* **A quantile of normal scores** (:func:`conformal_threshold`): fit on part of the good images, score the held-out
  rest (the calibration set, n images) and take the ceil((n + 1)(1 - A))-th smallest score. If new normal images
  are exchangeable with the calibration ones, the false-alarm rate is at most A in expectation over the calibration
  draw (split conformal prediction: Vovk et al. 2005; for outlier detection Bates et al. 2023). No defect is needed.
* **p-values** (:func:`conformal_p_values`): p = (1 + #{calibration scores >= s}) / (n + 1) for a new score s; flagging
  p <= A is the same decision as the threshold above.

Defined in: "From scores to decisions" (``notebooks/12_decisions.ipynb``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def conformal_threshold(calibration_scores: Any, target_fpr: float) -> float:
    """The split-conformal threshold: the ceil((n + 1)(1 - A))-th smallest of the n calibration scores (normal images
    the detector was not fitted on), A = ``target_fpr``. A new normal image scores above it with probability at most
    A. Refuses when n < 1/A - 1: the rank would exceed n, and the smallest reachable rate is 1/(n + 1).

    Defined in: "From scores to decisions" (``notebooks/12_decisions.ipynb``).
    """
    scores = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    n = len(scores)
    if not 0 < target_fpr < 1:
        raise ValueError(f"the target false-alarm rate must be in (0, 1), got {target_fpr}.")
    rank = math.ceil((n + 1) * (1 - target_fpr) - 1e-9)  # the tolerance keeps (n + 1)(1 - A) = 19.0 at 19, not 20
    if rank > n:
        need = math.ceil(1 / target_fpr - 1 - 1e-9)
        raise ValueError(f"{n} calibration images cannot guarantee a false-alarm rate of {target_fpr:g}: the smallest "
                         f"reachable is 1/(n + 1) = {1 / (n + 1):.3g}; it needs at least {need} calibration images.")
    return float(scores[rank - 1])


def conformal_p_values(calibration_scores: Any, scores: Any) -> np.ndarray:
    """Conformal p-values (M,) of new ``scores`` (M,) against the n ``calibration_scores``:
    (1 + #{calibration >= s}) / (n + 1). Small means unusual for a normal image; p <= A flags exactly the scores above
    :func:`conformal_threshold` (A).

    Defined in: "From scores to decisions" (``notebooks/12_decisions.ipynb``).
    """
    cal = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    s = np.asarray(scores, dtype=np.float64).ravel()
    at_least = len(cal) - np.searchsorted(cal, s, side="left")
    return (1 + at_least) / (len(cal) + 1)


def f1_max_threshold(labels: Any, scores: Any) -> float:
    """The threshold (flag ``score > t``, as :func:`rates`) with the largest F1 on labelled images (1 = defect); it
    needs defects, and chosen on the images it is reported on it is optimistic.

    Defined in: "From scores to decisions" (``notebooks/12_decisions.ipynb``).
    """
    from sklearn.metrics import precision_recall_curve

    s = np.asarray(scores, dtype=np.float64)
    precision, recall, cuts = precision_recall_curve(np.asarray(labels), s)  # flags score >= cut
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    cut = cuts[int(np.argmax(f1[:-1]))]
    below = s[s < cut]
    return float(below.max()) if len(below) else float(np.nextafter(cut, -np.inf))  # > t flags the same as >= cut


def rates(labels: Any, scores: Any, threshold: float) -> dict[str, float]:
    """The false-alarm rate (normal images with score > ``threshold``) and the detection rate (defects with score >
    ``threshold``); NaN where a class is absent.

    Defined in: "From scores to decisions" (``notebooks/12_decisions.ipynb``).
    """
    y = np.asarray(labels).astype(bool)
    flagged = np.asarray(scores, dtype=np.float64) > threshold
    return {"false_alarm_rate": float(flagged[~y].mean()) if (~y).any() else float("nan"),
            "detection_rate": float(flagged[y].mean()) if y.any() else float("nan")}


def map_scale(calibration_maps: Any) -> tuple[float, float]:
    """A fixed colour scale for heatmaps, (lo, hi): the 50th and 99.9th percentiles of the calibration images' pixel
    scores. Typical normal pixels stay uncoloured and a pixel beyond nearly every normal one saturates, whatever
    else is in the batch.

    Defined in: "From scores to decisions" (``notebooks/12_decisions.ipynb``).
    """
    lo, hi = np.percentile(np.asarray(calibration_maps, dtype=np.float64), [50, 99.9])
    return float(lo), float(max(hi, lo + 1e-12))


def calibration_split(n: int, share: float, target_fpr: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of n good images into (fit, calibration) indices, sorted, round(share x n) to calibrate.
    Refused, before any fitting, when the calibration set is too small for ``target_fpr`` (fewer than 1/A - 1),
    with what it would need.

    Used by: ``adlib.bench.deploy.fit``, ``adlib.bench.folders.calibrated_rates``, ``python -m adlib fit``.
    """
    if not 0 < share < 1:
        raise ValueError(f"--calibration-share must be in (0, 1), got {share}.")
    n_cal = int(round(share * n))
    need = math.ceil(1 / target_fpr - 1 - 1e-9)
    if n_cal < need or n_cal == n:
        raise ValueError(f"{n} good images at --calibration-share {share:g} leave {n_cal} to calibrate: the smallest "
                         f"false-alarm rate they can guarantee is {1 / (n_cal + 1):.3g}. --target-fpr {target_fpr:g} "
                         f"needs {need} calibration images, about {math.ceil(need / share)} good images at this share "
                         "(or a larger share, or a larger target).")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_cal:]), np.sort(order[:n_cal])
