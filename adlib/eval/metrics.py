"""Metrics: image- and pixel-level scores of an anomaly detector, computed on raw scores.

Every function takes numpy arrays or torch tensors and works in float64 numpy. Labels follow the
book's convention (``0`` = normal, ``1`` = anomalous) and a higher score means more anomalous.
Scores are never squashed (sigmoid), clamped or normalised: ranking metrics only need the order,
and each of those operations can create ties that change the result (see the chapter).

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "check_labels_scores",
    "image_auroc",
    "pixel_auroc",
    "average_precision",
    "f1_max",
    "fpr_at_tpr",
    "pro_curve",
    "aupro",
    "evaluate",
]


def _to_float64(x: Any, name: str) -> np.ndarray:
    """Any array-like or torch tensor as a float64 numpy array."""
    if hasattr(x, "detach"):  # a torch tensor; duck-typed so this module never imports torch
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric (a numpy array or torch tensor), got {type(x).__name__}.") from err


def _check_binary(y: np.ndarray, name: str) -> np.ndarray:
    if not np.isin(y, (0.0, 1.0)).all():
        bad = np.unique(y[~np.isin(y, (0.0, 1.0))])[:5]
        raise ValueError(
            f"{name} must be binary (0 = normal, 1 = anomalous, bool or int or float), found values {bad}. "
            "Threshold or cast your ground truth, e.g. (mask > 0)."
        )
    return y.astype(np.int64)


def _check_finite(s: np.ndarray, name: str) -> None:
    if not np.isfinite(s).all():
        raise ValueError(
            f"{name} contain {np.count_nonzero(~np.isfinite(s))} NaN/inf values; "
            "fix the model's output (e.g. a division by zero) before computing a metric."
        )


def check_labels_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level ``labels`` (N,) in {0, 1} and ``scores`` (N,); return (int64, float64) arrays.

    Raises a ``ValueError`` unless both are 1-D of the same length, labels are binary with both
    classes present, and scores are finite.

    Used by: ``adlib.bench.benchmark.image_auroc_draws``, ``adlib.eval.metrics.average_precision``.
    """
    y, s = _to_float64(labels, "labels"), _to_float64(scores, "scores")
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D (one value per sample), got shapes {y.shape} and {s.shape}; "
            "for pixel maps use pixel_auroc / aupro."
        )
    if len(y) != len(s):
        raise ValueError(f"labels and scores must have the same length, got {len(y)} and {len(s)}.")
    y = _check_binary(y, "labels")
    if np.all(y == y[:1]):  # empty, or a single class
        found = f"only label {int(y[0])}" if len(y) else "no samples"
        raise ValueError(
            f"AUROC needs both normal and anomalous samples (labels 0 and 1), found {found}; "
            "evaluate on a test set that contains both."
        )
    _check_finite(s, "scores")
    return y, s


def _check_masks_maps(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate ground-truth ``masks`` (N, H, W) in {0, 1} and anomaly ``maps`` (N, H, W)."""
    m, a = _to_float64(masks, "masks"), _to_float64(maps, "maps")
    if m.ndim != 3 or m.shape != a.shape:
        raise ValueError(
            f"masks and maps must both be (N, H, W) with the same shape, got {m.shape} and {a.shape}; "
            "squeeze a channel axis (x[:, 0]) and resize the maps to the masks' size first."
        )
    m = _check_binary(m, "masks")
    if not m.any():
        raise ValueError("No defect pixel in masks: pixel metrics need at least one anomalous pixel (mask == 1).")
    if m.all():
        raise ValueError("No normal pixel in masks: pixel metrics need at least one normal pixel (mask == 0).")
    _check_finite(a, "maps")
    return m, a


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image ``scores`` (N,) against ``labels`` (N,): P(score_anomalous > score_normal).

    Ties count one half. Computed by sklearn in float64 on the raw scores.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    y, s = check_labels_scores(labels, scores)
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """AUROC over all pixels: ``masks`` (N, H, W) in {0, 1}, anomaly ``maps`` (N, H, W) -> float.

    Every pixel of every image is one sample, so large defects weigh more than small ones
    (compare :func:`aupro`).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    m, a = _check_masks_maps(masks, maps)
    # roc_auc_score computes exactly this, after label checks done above that cost ~1.5 s per 6.5 M pixels.
    fpr, tpr, _ = roc_curve(m.ravel(), a.ravel())
    return float(auc(fpr, tpr))


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision (area under the precision-recall curve, step-wise) of ``scores`` (N,).

    Unlike AUROC it depends on the fraction of anomalies: a random detector scores that fraction.

    Used by: ``adlib.eval.metrics.evaluate``.
    """
    y, s = check_labels_scores(labels, scores)
    return float(average_precision_score(y, s))


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 over all thresholds of ``scores`` (N,) and the threshold that reaches it: (f1, threshold).

    F1 scores hard decisions (anomalous if ``score >= threshold``), not a ranking, so it needs a
    threshold; F1-max reports the best one found *on the test labels*, an optimistic upper bound
    of what a threshold chosen without them would give.

    Used by: ``adlib.eval.metrics.evaluate``.
    """
    y, s = check_labels_scores(labels, scores)
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def fpr_at_tpr(labels: Any, scores: Any, tpr: float = 0.95) -> float:
    """False positive rate at the first threshold whose true positive rate is ``>= tpr`` (FPR@95TPR).

    ``scores`` (N,), ``labels`` (N,) -> float in [0, 1]; lower is better.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}.")
    y, s = check_labels_scores(labels, scores)
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return float(fprs[np.argmax(tprs >= tpr)])


def defect_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """The ground-truth regions of ``masks`` (N, H, W): labels (N, H, W), 0 outside every region, and their number.

    As the official MVTec AD evaluation, a region is an 8-connected component of one image's mask; labels are
    unique across images.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    # A 3-D structure that is 3x3 ones in the middle plane only labels each image in 2-D with
    # 8-connectivity in one call.
    structure = np.zeros((3, 3, 3), dtype=int)
    structure[1] = 1
    return ndimage.label(np.asarray(masks) > 0, structure=structure)


def pro_curve(masks: Any, maps: Any, num_thresholds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap (PRO) curve: ``masks`` (N, H, W) in {0, 1}, ``maps`` (N, H, W) -> (fpr, pro).

    As the official MVTec AD evaluation (Bergmann et al., IJCV 2021): every 8-connected region of
    every mask is one ground-truth region; at threshold t (anomalous if ``map >= t``) PRO is the mean
    over all regions of the fraction of the region's pixels above t, and FPR is the fraction of all
    normal pixels (outside every region, including every pixel of good images) above t. The curve is
    exact: one point per distinct score, from sorting all pixels once and taking cumulative sums,
    plus (0, 0) and (1, 1) at the ends. Both returned arrays have shape (K,), fpr non-decreasing.

    ``num_thresholds``: if given, keep only the curve points at the first threshold reaching each of
    ``num_thresholds`` evenly spaced FPR values (a lighter curve for plotting; :func:`aupro` always
    uses the exact one).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    m, a = _check_masks_maps(masks, maps)
    regions, num_regions = defect_regions(m)
    # Adding one pixel of region k to the positives raises that region's overlap by 1/|k|.
    pro_step = 1.0 / np.bincount(regions.ravel(), minlength=num_regions + 1)
    pro_step[0] = 0.0

    order = np.argsort(a.ravel())[::-1]
    scores = a.ravel()[order]
    regions = regions.ravel()[order]
    normal = regions == 0
    fpr = np.cumsum(normal, dtype=np.float64) / np.count_nonzero(normal)
    pro = np.cumsum(pro_step[regions]) / num_regions
    last_of_run = np.append(scores[1:] != scores[:-1], True)
    fpr = np.concatenate(([0.0], np.minimum(fpr[last_of_run], 1.0), [1.0]))
    pro = np.concatenate(([0.0], np.minimum(pro[last_of_run], 1.0), [1.0]))
    if num_thresholds is not None:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be at least 2 (or None for the exact curve), got {num_thresholds}.")
        keep = np.unique(np.searchsorted(fpr, np.linspace(0.0, 1.0, num_thresholds)))
        fpr, pro = fpr[keep], pro[keep]
    return fpr, pro


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve (x ascending, from 0) up to exactly ``x_max``.

    As the official ``trapezoid``: if ``x_max`` falls between two points, y is linearly interpolated
    there and the last partial trapezoid is added.

    Used by: ``adlib.bench.benchmark.PixelCounts``, ``adlib.eval.metrics.aupro``.
    """
    inside = x <= x_max  # a prefix, since x is sorted
    xi, yi = x[inside], y[inside]
    area = float(np.sum(0.5 * (yi[1:] + yi[:-1]) * np.diff(xi)))
    if xi[-1] < x_max:
        x_next, y_next = x[len(xi)], y[len(xi)]
        y_at = yi[-1] + (y_next - yi[-1]) * (x_max - xi[-1]) / (x_next - xi[-1])
        area += 0.5 * (yi[-1] + y_at) * (x_max - xi[-1])
    return area


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``: ``masks``, ``maps`` (N, H, W) -> [0, 1].

    The official MVTec AD metric (Bergmann et al., IJCV 2021): the exact :func:`pro_curve`,
    integrated with the trapezoid rule up to exactly ``fpr_limit`` (interpolating the curve there)
    and divided by ``fpr_limit``. Each defect region counts once whatever its size, so a map that
    finds only the large defects has a high pixel AUROC but a low AUPRO.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}; the MVTec AD standard is 0.3.")
    fpr, pro = pro_curve(masks, maps)
    # Rounding in the cumulative sums could push the ratio a hair above 1.
    return float(min(trapezoid_to(fpr, pro, fpr_limit) / fpr_limit, 1.0))


def evaluate(labels: Any, scores: Any, masks: Any = None, maps: Any = None) -> dict[str, float]:
    """All metrics of one run, the dict every chapter's results table is built from.

    ``labels``, ``scores`` (N,) give ``image_auroc``, ``ap``, ``f1_max``, ``fpr95``; ``masks``, ``maps``
    (N, H, W), given together, add ``pixel_auroc`` and ``aupro``.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    y, s = check_labels_scores(labels, scores)
    result = {
        "image_auroc": image_auroc(y, s),
        "ap": average_precision(y, s),
        "f1_max": f1_max(y, s)[0],
        "fpr95": fpr_at_tpr(y, s, 0.95),
    }
    if (masks is None) != (maps is None):
        raise ValueError("Pass both masks and maps for pixel metrics, or neither for image metrics only.")
    if masks is not None:
        m, a = _check_masks_maps(masks, maps)
        if len(m) != len(y):
            raise ValueError(f"masks/maps must have one entry per sample: got {len(m)} for {len(y)} labels.")
        result["pixel_auroc"] = pixel_auroc(m, a)
        result["aupro"] = aupro(m, a)
    return result
