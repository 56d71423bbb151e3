"""adlib.eval.tables: per-object results tables and their summaries over runs, against independent computations."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

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
