"""Ablation scaffolding: rows per arm and seed, metrics of arms scored outside the protocol, means and seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adlib.data.imageset import ImageSet
from adlib.eval import ablation, metrics, protocol
from adlib.eval.scores import Scores
from adlib.methods import knn


def _test_set(masks: bool = True) -> ImageSet:
    m = np.zeros((4, 8, 8), bool)
    m[2, 2:4, 2:4] = m[3, 5:7, 1:3] = True
    images = np.random.default_rng(0).uniform(size=(4, 3, 8, 8)).astype(np.float32)
    return ImageSet(images, np.array([0, 0, 1, 1]), m if masks else None)


def _scores(seed: int) -> Scores:
    maps = np.random.default_rng(seed).normal(size=(4, 8, 8))
    return Scores(maps.max(axis=(1, 2)), maps)


def test_an_arm_scored_outside_the_protocol_gets_the_metrics_of_its_scores() -> None:
    test = _test_set()
    study = ablation.Ablation(test)
    timing = {"fit_s": 1.0, "predict_s": 2.0}
    row = study.add("b", timing, _scores(1))
    expected = metrics.evaluate(test.labels, _scores(1).image, test.masks, _scores(1).maps)
    assert row == expected | timing and timing == {"fit_s": 1.0, "predict_s": 2.0}  # the row given is not changed
    assert study.add("b", None, _scores(2)) == metrics.evaluate(test.labels, _scores(2).image, test.masks,
                                                                _scores(2).maps)
    assert study.seconds() == {}  # the second run has no timings


def test_rows_of_the_protocol_are_kept_means_over_runs_and_first_scores() -> None:
    study = ablation.Ablation(_test_set())
    rows = [{"image_auroc": 0.5, "pixel_auroc": 0.6, "aupro": 0.2, "fit_s": 1.0, "predict_s": 0.5},
            {"image_auroc": 1.0, "pixel_auroc": 0.8, "aupro": 0.4, "fit_s": 3.0, "predict_s": 0.5}]
    first = _scores(0)
    for seed, row in enumerate(rows):
        kept = study.add("a", row, first if seed == 0 else _scores(seed))
        assert kept == row and kept is not row  # taken as given, not recomputed, and copied
    assert study.rows["a"] == rows and study.scores["a"] is first
    means = study.means(["image_auroc", "aupro"])
    assert means == {"a": {"image_auroc": pytest.approx(0.75), "aupro": pytest.approx(0.3)}}
    assert study.seconds() == {"a": pytest.approx(2.5)}


def test_without_masks_pixel_metrics_are_missing_and_their_mean_is_nan() -> None:
    study = ablation.Ablation(_test_set(masks=False))
    row = study.add("a", None, _scores(0))
    assert "pixel_auroc" not in row and "aupro" not in row
    means = study.means(["image_auroc", "pixel_auroc"])["a"]
    assert np.isfinite(means["image_auroc"]) and np.isnan(means["pixel_auroc"])


def test_errors() -> None:
    with pytest.raises(ValueError, match="labelled"):
        ablation.Ablation(ImageSet(np.zeros((2, 3, 8, 8), np.float32)))
    study = ablation.Ablation(_test_set())
    with pytest.raises(ValueError, match="3 scores for a test set of 4"):
        study.add("a", None, Scores(np.zeros(3)))


def test_a_detector_arm_through_the_protocol() -> None:
    g = torch.Generator().manual_seed(0)
    train = ImageSet(torch.rand(4, 3, 32, 32, generator=g))
    test = ImageSet(torch.rand(4, 3, 32, 32, generator=g), np.array([0, 0, 1, 1]))
    study = ablation.Ablation(test)
    det = knn.PatchKNNDetector(backbone="random-resnet18")
    row, scores = protocol.evaluate(det, train, test)
    study.add("patch kNN", *protocol.evaluate(knn.PatchKNNDetector(backbone="random-resnet18"), train, test))
    assert study.rows["patch kNN"][0]["image_auroc"] == row["image_auroc"]
    np.testing.assert_array_equal(study.scores["patch kNN"].maps, scores.maps)
    assert study.means(["pixel_auroc"]) == {"patch kNN": {"pixel_auroc": pytest.approx(np.nan, nan_ok=True)}}
