"""adlib.eval.metrics against independent computations: brute-force loops, pair counts, hand-worked cases."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from skimage import measure
from sklearn.metrics import roc_auc_score

from adlib.eval import metrics

# ---------------------------------------------------------------- brute-force references


def auroc_pairs(labels, scores):
    """Mann-Whitney: fraction of (anomalous, normal) pairs ranked correctly, ties count one half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def confusion(labels, scores, t):
    pred = scores >= t
    tp = int(np.sum(pred & (labels == 1)))
    fp = int(np.sum(pred & (labels == 0)))
    fn = int(np.sum(~pred & (labels == 1)))
    return tp, fp, fn


def ap_loop(labels, scores):
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        tp, fp, _ = confusion(labels, scores, t)
        recall = tp / labels.sum()
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def f1_at(labels, scores, t):
    tp, fp, fn = confusion(labels, scores, t)
    return 2 * tp / (2 * tp + fp + fn)


def fpr_at_tpr_loop(labels, scores, target):
    for t in sorted(set(scores), reverse=True):
        tp, fp, _ = confusion(labels, scores, t)
        if tp / labels.sum() >= target:
            return fp / (labels == 0).sum()
    raise AssertionError("unreachable: the lowest threshold has TPR 1")


def aupro_loop(masks, maps, fpr_limit=0.3):
    """Sweep every distinct threshold; regions from skimage (8-connectivity), overlap and FPR counted directly."""
    regions = [measure.label(m, connectivity=2) for m in masks]
    region_masks = [(i, r == k) for i, r in enumerate(regions) for k in range(1, r.max() + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel()), reverse=True):
        pred = maps >= t
        pro = np.mean([pred[i][rm].mean() for i, rm in region_masks])
        fpr = (pred & normal).sum() / normal.sum()
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < fpr_limit:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (fpr_limit - x0)
    return area / fpr_limit


def random_case(rng, n=20, ties=False):
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + labels
    return labels, (np.round(scores, 1) if ties else scores)


def random_pixel_case(rng, ties=False):
    n, h, w = rng.integers(2, 5), rng.integers(6, 13), rng.integers(6, 13)
    masks = (rng.random((n, h, w)) < rng.uniform(0.05, 0.3)).astype(np.int64)
    masks[0] = 0  # a good image: all its pixels are normal and count in the FPR
    masks[1, 1:3, 1:3] = 1  # at least one defect
    maps = rng.random((n, h, w)) + rng.uniform(0.0, 1.0) * masks
    return masks, (np.round(maps, 1) if ties else maps)


# ---------------------------------------------------------------- image metrics


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_image_metrics_match_brute_force(seed, ties):
    labels, scores = random_case(np.random.default_rng(seed), ties=ties)
    assert metrics.image_auroc(labels, scores) == pytest.approx(auroc_pairs(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(ap_loop(labels, scores), abs=1e-12)
    assert metrics.fpr_at_tpr(labels, scores) == pytest.approx(fpr_at_tpr_loop(labels, scores, 0.95), abs=1e-12)
    assert metrics.fpr_at_tpr(labels, scores, 0.5) == pytest.approx(fpr_at_tpr_loop(labels, scores, 0.5), abs=1e-12)

    best, threshold = metrics.f1_max(labels, scores)
    assert best == pytest.approx(max(f1_at(labels, scores, t) for t in set(scores)), abs=1e-12)
    assert f1_at(labels, scores, threshold) == pytest.approx(best, abs=1e-12)


def test_hand_worked_image_metrics():
    labels = np.array([0, 0, 1, 0, 1])
    scores = np.array([0.1, 0.3, 0.35, 0.8, 0.9])
    # 0.35 beats 0.1 and 0.3; 0.9 beats all three normals: 5 of 6 pairs.
    assert metrics.image_auroc(labels, scores) == pytest.approx(5 / 6)
    # Thresholds 0.9 (P=1, R=.5), 0.8 (P=.5, R=.5), 0.35 (P=2/3, R=1): AP = .5 * 1 + .5 * 2/3.
    assert metrics.average_precision(labels, scores) == pytest.approx(5 / 6)
    # F1 at 0.9: 2/3, at 0.8: 1/2, at 0.35: 2*2 / (2*2 + 1 + 0) = 0.8.
    assert metrics.f1_max(labels, scores) == pytest.approx((0.8, 0.35))
    assert metrics.fpr_at_tpr(labels, scores) == pytest.approx(1 / 3)
    # Mostly anomalous: flagging everything (the lowest threshold) is best, F1 = 2*3 / (2*3 + 1).
    assert metrics.f1_max([0, 1, 1, 1], [0.5, 0.1, 0.6, 0.7]) == pytest.approx((6 / 7, 0.1))


def test_large_raw_scores_do_not_collapse():
    # The torchmetrics pitfall: a sigmoid maps all these to 1.0 in float32 and AUROC becomes 0.5.
    labels = np.array([0] * 10 + [1] * 10)
    scores = 1e6 + 1e-6 * np.arange(20)
    assert metrics.image_auroc(labels, scores) == 1.0
    assert metrics.image_auroc(labels, torch.tensor(scores)) == 1.0
    assert metrics.fpr_at_tpr(labels, scores) == 0.0
    masks = np.zeros((2, 4, 4), int)
    masks[1, :2] = 1
    maps = 1e6 + 1e-6 * masks + 1e-9 * np.arange(32).reshape(2, 4, 4)
    assert metrics.pixel_auroc(masks, maps) == 1.0
    assert metrics.aupro(masks, maps) == 1.0


def test_torch_input_equals_numpy_input():
    masks, maps = random_pixel_case(np.random.default_rng(1))
    labels = masks.reshape(len(masks), -1).max(1)
    scores = maps.reshape(len(maps), -1).max(1)
    expected = metrics.evaluate(labels, scores, masks, maps)
    got = metrics.evaluate(
        torch.tensor(labels), torch.tensor(scores), torch.tensor(masks).bool(), torch.tensor(maps)
    )
    assert got == expected


# ---------------------------------------------------------------- pixel metrics


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_threshold_sweep(seed, ties):
    masks, maps = random_pixel_case(np.random.default_rng(seed), ties=ties)
    assert metrics.aupro(masks, maps) == pytest.approx(aupro_loop(masks, maps), abs=1e-9)
    assert metrics.aupro(masks, maps, fpr_limit=0.05) == pytest.approx(aupro_loop(masks, maps, 0.05), abs=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_pixel_auroc_matches_pairs(seed):
    masks, maps = random_pixel_case(np.random.default_rng(seed), ties=True)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(auroc_pairs(masks.ravel(), maps.ravel()), abs=1e-12)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_aupro_hand_worked():
    # One region of 2 pixels (scores .9, .5), four normal pixels (.8, .4, .3, .2). Curve points
    # (0, 0) (0, .5) (.25, .5) (.25, 1) (.5, 1) ...; area to .3 = .25 * .5 + .05 * 1 = .175.
    masks = np.array([[[1, 1, 0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.8, 0.4, 0.3, 0.2]]])
    assert metrics.aupro(masks, maps) == pytest.approx(0.175 / 0.3, abs=1e-12)
    fpr, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.25, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1, 1, 1, 1])


def test_aupro_perfect_and_reversed_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), int)
    masks[0, 2:5, 2:5] = 1
    masks[0, 10:14, 8:15] = 1
    masks[2, 7, 7] = 1
    noise = rng.random(masks.shape)
    perfect = masks * (1 + noise) + (1 - masks) * noise * 0.9  # every defect pixel above every normal one
    assert metrics.aupro(masks, perfect) == 1.0
    assert metrics.aupro(masks, 1.0 - masks) == 0.0  # defects ranked last


def test_aupro_counts_regions_not_pixels():
    # A 256-pixel defect found, a 4-pixel one ranked below every normal pixel: pixel AUROC ~ 256/260,
    # but each region counts once, so PRO stays 0.5 up to FPR 1 and AUPRO = 0.5.
    rng = np.random.default_rng(0)
    masks = np.zeros((1, 40, 40), int)
    masks[0, 2:18, 2:18] = 1
    masks[0, 30:32, 30:32] = 1
    maps = 0.5 + rng.random(masks.shape)
    maps[0, 2:18, 2:18] = 2.0
    maps[0, 30:32, 30:32] = 0.0
    auroc, pro = metrics.pixel_auroc(masks, maps), metrics.aupro(masks, maps)
    assert auroc == pytest.approx(256 / 260)
    assert pro == pytest.approx(0.5)
    assert pro < auroc - 0.4


def test_aupro_regions_are_8_connected():
    # A and B touch diagonally (one region), C is apart. A and C found, B last:
    # 8-connectivity gives PRO (1/2 + 1) / 2 = .75; 4-connectivity would give (1 + 0 + 1) / 3.
    masks = np.zeros((1, 8, 8), int)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 6, 6] = 1
    maps = np.full((1, 8, 8), 1.0)
    maps[0, 1, 1] = maps[0, 6, 6] = 3.0
    maps[0, 2, 2] = 0.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.75)


def test_good_images_count_in_fpr():
    masks = np.zeros((2, 8, 8), int)
    masks[0, 2:4, 2:4] = 1
    maps = np.zeros((2, 8, 8))
    maps[0] = masks[0]
    assert metrics.aupro(masks, maps) == 1.0
    maps[1] = 2.0  # every pixel of the good image outscores the defect: FPR 64/124 before PRO rises
    assert metrics.aupro(masks, maps) == 0.0


def test_pro_curve_shape_and_subsampling():
    masks, maps = random_pixel_case(np.random.default_rng(3))
    fpr, pro = metrics.pro_curve(masks, maps)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert len(fpr) == len(np.unique(maps)) + 2
    fpr_s, pro_s = metrics.pro_curve(masks, maps, num_thresholds=11)
    assert 2 <= len(fpr_s) <= 11
    exact = set(zip(fpr, pro))
    assert all(point in exact for point in zip(fpr_s, pro_s))
    assert (fpr_s[0], fpr_s[-1]) == (0.0, 1.0)


def test_aupro_speed_100_maps_256():
    rng = np.random.default_rng(0)
    masks = np.zeros((100, 256, 256), np.uint8)
    for i in range(50):
        masks[i, 40 + i : 80 + i, 60:100] = 1
        masks[i, 200:203, 10 + i : 14 + i] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    start = time.perf_counter()
    value = metrics.aupro(masks, maps)
    elapsed = time.perf_counter() - start
    assert 0.0 < value < 1.0
    assert elapsed < 10.0, f"aupro took {elapsed:.1f} s on 100 x 256 x 256"


# ---------------------------------------------------------------- evaluate and errors


def test_evaluate_collects_every_metric():
    rng = np.random.default_rng(2)
    masks, maps = random_pixel_case(rng)
    labels = (masks.reshape(len(masks), -1).max(1) > 0).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    result = metrics.evaluate(labels, scores, masks, maps)
    assert result == {
        "image_auroc": metrics.image_auroc(labels, scores),
        "ap": metrics.average_precision(labels, scores),
        "f1_max": metrics.f1_max(labels, scores)[0],
        "fpr95": metrics.fpr_at_tpr(labels, scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "aupro": metrics.aupro(masks, maps),
    }
    assert set(metrics.evaluate(labels, scores)) == {"image_auroc", "ap", "f1_max", "fpr95"}


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "AUROC needs both normal and anomalous samples"),
        ([1, 1], [0.1, 0.2], "AUROC needs both normal and anomalous samples"),
        ([], [], "AUROC needs both normal and anomalous samples"),
        ([0, 1, 1], [0.1, 0.2], "same length"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 2], [0.1, 0.2], "binary"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1], [0.1, np.inf], "NaN/inf"),
    ],
)
def test_image_metric_errors(labels, scores, message):
    for fn in (metrics.image_auroc, metrics.average_precision, metrics.f1_max, metrics.fpr_at_tpr):
        with pytest.raises(ValueError, match=message):
            fn(labels, scores)


def test_pixel_metric_errors():
    masks = np.zeros((2, 4, 4), int)
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="No defect pixel"):
        metrics.aupro(masks, maps)
    with pytest.raises(ValueError, match="No normal pixel"):
        metrics.aupro(np.ones_like(masks), maps)
    masks[0, 0, 0] = 1
    with pytest.raises(ValueError, match="same shape"):
        metrics.aupro(masks, maps[:, :3])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metrics.pixel_auroc(masks[:, None], maps[:, None])
    with pytest.raises(ValueError, match=r"binary.*mask > 0"):
        metrics.aupro(masks * 255, maps)
    with pytest.raises(ValueError, match="NaN"):
        metrics.aupro(masks, np.where(masks == 1, np.nan, maps))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="both masks and maps"):
        metrics.evaluate([0, 1], [0.1, 0.2], masks=masks)
    with pytest.raises(ValueError, match="one entry per sample"):
        metrics.evaluate([0, 1, 0], [0.1, 0.2, 0.3], masks, maps)


def test_defect_regions_are_8_connected_per_image():
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = 1  # diagonal neighbours: one region
    masks[0, 3, 3] = 1                   # a second region
    masks[1, 0, 0] = 1                   # the same place in another image: its own region
    labels, n = metrics.defect_regions(masks)
    assert n == 3 and labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 3, 3]
    assert labels[1, 0, 0] not in (0, labels[0, 0, 0])
