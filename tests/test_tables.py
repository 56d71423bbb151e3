"""adlib.eval.tables: per-object results tables and their summaries over runs, against independent computations."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from adlib.bench import benchmark
from adlib.data.imageset import ImageSet
from adlib.eval import metrics, tables
from adlib.eval.scores import Scores


def two_objects() -> ImageSet:
    """Six 4 x 4 images: a "cup" (normal, normal, defect) and a "pen" (normal, defect, defect)."""
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 4, 4), bool)
    masks[2, :2, :2] = masks[4, 1:3, 1:3] = masks[5, 3, :] = True
    return ImageSet(rng.random((6, 3, 4, 4), dtype=np.float32), [0, 0, 1, 0, 1, 1], masks,
                    defects=["good", "good", "hole", "good", "crack", "hole"], objects=["cup"] * 3 + ["pen"] * 3)


def test_per_object_scores_each_object_alone_and_averages_the_objects():
    images = two_objects()
    # image scores: the cup's defect ranks below one normal image (AUROC 0.5), the pen's are perfect (1.0)
    image_scores = {"cup": np.array([0.1, 0.9, 0.5]), "pen": np.array([0.2, 0.6, 0.7])}
    seen = []

    def score_fn(subset: ImageSet, name: str):
        seen.append((name, subset.objects, len(subset)))
        maps = subset.images.mean(axis=1).astype(np.float64)  # any (M, H, W) map
        return image_scores[name], maps

    shown_maps = {}
    table = tables.per_object(score_fn, images, shown=[2, 4], maps=shown_maps)
    assert seen == [("cup", ("cup",) * 3, 3), ("pen", ("pen",) * 3, 3)]
    assert list(table.index) == ["cup", "pen", "mean"] and list(table.columns) == list(tables.METRICS)
    assert table.loc["cup", "image_auroc"] == pytest.approx(0.5) and table.loc["pen", "image_auroc"] == 1.0
    for name, idx in (("cup", [0, 1, 2]), ("pen", [3, 4, 5])):
        maps = images.images[idx].mean(axis=1)
        truth = images.masks[idx]
        assert table.loc[name, "pixel_auroc"] == pytest.approx(roc_auc_score(truth.ravel(), maps.ravel()))
        assert table.loc[name, "aupro"] == pytest.approx(metrics.aupro(truth, maps))
    np.testing.assert_allclose(table.loc["mean"], table.loc[["cup", "pen"]].mean())
    assert sorted(shown_maps) == [2, 4]
    np.testing.assert_array_equal(shown_maps[4], images.images[4].mean(axis=0))
    # a Scores answer reads the same; the rows follow ``objects``
    again = tables.per_object(lambda s, n: Scores(*score_fn(s, n)), images, ["pen", "cup"])
    assert list(again.index) == ["pen", "cup", "mean"]
    pd.testing.assert_frame_equal(again.loc[["cup", "pen"]], table.loc[["cup", "pen"]])


def test_per_object_refuses_what_it_cannot_score():
    images = two_objects()
    with pytest.raises(ValueError, match="No image of object 'mug'"):
        tables.per_object(lambda s, n: (None, None), images, ["mug"])
    with pytest.raises(ValueError, match="labels and masks"):
        tables.per_object(lambda s, n: (None, None), ImageSet(images.images, images.labels))


def test_mean_of_runs_hand_case():
    a = pd.DataFrame({"image_auroc": [0.5, 1.0, 0.75], "aupro": [0.2, 0.4, 0.3]}, index=["cup", "pen", "mean"])
    b = pd.DataFrame({"image_auroc": [0.7, 0.8, 0.75], "aupro": [0.4, 0.0, 0.2]}, index=["cup", "pen", "mean"])
    mean = tables.mean_of_runs([a, b])
    expected = pd.DataFrame({"image_auroc": [0.6, 0.9], "aupro": [0.3, 0.2]}, index=["cup", "pen"])
    pd.testing.assert_frame_equal(mean, expected)
    pd.testing.assert_frame_equal(tables.mean_of_runs([a]), a.drop(index="mean"))
    with pytest.raises(ValueError, match="at least one"):
        tables.mean_of_runs([])


def test_interval_table_and_bounds_against_the_t_distribution():
    runs = {"2": pd.DataFrame({"image_auroc": [0.6, 0.7, 0.8], "aupro": [0.1, 0.3, 0.2]}),
            "full": pd.DataFrame({"image_auroc": [0.9, 0.95, 1.0], "aupro": [0.5, 0.5, 0.8]})}

    def by_hand(values):
        v = np.asarray(values)
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
        return v.mean(), v.mean() - half, v.mean() + half

    table = tables.interval_table(runs)
    assert list(table.index) == ["2", "full"] and list(table.columns) == ["image_auroc", "aupro"]
    mean, low, high = by_hand([0.6, 0.7, 0.8])
    assert table.loc["2", "image_auroc"] == f"{mean:.3f} [{low:.3f}, {high:.3f}]" == "0.700 [0.452, 0.948]"
    assert list(tables.interval_table(runs, ["aupro"], digits=1).columns) == ["aupro"]
    curve, lower, upper = tables.interval_bounds(runs)
    for name, run in runs.items():
        for col in run.columns:
            expected = by_hand(run[col])
            got = (curve.loc[name, col], lower.loc[name, col], upper.loc[name, col])
            assert got == pytest.approx(expected)
    assert list(curve.index) == ["2", "full"] and list(curve.columns) == ["image_auroc", "aupro"]


def _two_objects(scores_b: np.ndarray) -> tuple[ImageSet, dict]:
    """Objects "a" (scores that rank every defective image first) and "b" (``scores_b``), 6 images each, the last
    3 defective with a 4-pixel defect; maps = the image score everywhere."""
    labels = np.array([0, 0, 0, 1, 1, 1] * 2)
    masks = np.zeros((12, 4, 4), dtype=bool)
    masks[labels == 1, :2, :2] = True
    images = ImageSet(np.zeros((12, 3, 4, 4), np.float32), labels, masks, objects=["a"] * 6 + ["b"] * 6)
    scores = np.concatenate([[0.0, 0.1, 0.2, 0.7, 0.8, 0.9], scores_b])
    kept = {o: (scores[i:i + 6], np.repeat(scores[i:i + 6], 16).reshape(6, 4, 4)) for o, i in (("a", 0), ("b", 6))}
    return images, kept


def test_object_image_draws_resample_objects_hand_case():
    # "a" scores 1 and "b" 0.5 in any resampling of their images (b's scores tie), so a draw's mean over two drawn
    # objects is 1 (a twice), 0.75 or 0.5 (b twice), each pair of objects with its binomial chance
    images, kept = _two_objects(np.full(6, 0.5))
    draws = benchmark.object_image_draws(images, {"row": [kept]}, "image_auroc", n_boot=4000, seed=1)["row"]
    values, counts = np.unique(draws.round(6), return_counts=True)
    assert values.tolist() == [0.5, 0.75, 1.0]
    np.testing.assert_allclose(counts / 4000, [0.25, 0.5, 0.25], atol=0.03)


def test_object_image_draws_against_resampled_images_scored_by_sklearn():
    images, kept = _two_objects(np.array([0.3, 0.6, 0.1, 0.5, 0.2, 0.9]))
    other = {o: (s[::-1].copy(), m) for o, (s, m) in kept.items()}  # a second seed
    draws = benchmark.object_image_draws(images, {"row": [kept, other]}, "image_auroc", n_boot=50, seed=3)["row"]
    # the same draws, written out: object copies, then one resampling of the images per copy, each scored by sklearn
    rng = np.random.default_rng(3)
    copies = rng.multinomial(2, [0.5, 0.5], size=50)
    labels = images.labels[:6]
    masks = images.masks[:6]
    expected, expected_pixel = np.zeros(50), np.zeros(50)
    for k, name in enumerate("ab"):
        n = copies[:, k].max()
        weights = [benchmark.resample_weights(labels, 50, int(rng.integers(2**31))) for _ in range(n)] if n else []
        for b in range(50):
            for c in range(copies[b, k]):
                take = np.repeat(np.arange(6), weights[c][b].astype(int))
                expected[b] += np.mean([roc_auc_score(labels[take], run[name][0][take]) for run in (kept, other)])
                expected_pixel[b] += roc_auc_score(masks[take].ravel(), kept[name][1][take].ravel())
    np.testing.assert_allclose(draws, expected / 2)
    # pixel AUROC from counts above a grid of thresholds: the benchmark's shortcut, close to the exact metric
    pixel = benchmark.object_image_draws(images, {"row": [kept]}, "pixel_auroc", n_boot=50, seed=3)["row"]
    np.testing.assert_allclose(pixel, expected_pixel / 2, atol=0.02)
