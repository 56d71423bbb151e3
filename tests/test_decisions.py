"""From scores to decisions: the conformal threshold and p-values, fit on good images only, calibrate, predict."""
from __future__ import annotations

import csv
import html.parser
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adlib import cli
from adlib.bench import deploy, folders
from adlib.eval import decisions

SMALL = ["--backbone", "random-resnet18", "--image-size", "32", "--device", "cpu"]


def test_conformal_threshold_by_hand_and_its_refusal() -> None:
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 8.0, 7.0, 6.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0,
                       18.0, 19.0])  # n = 19, the values 1..19
    # A = 0.1: rank ceil(20 * 0.9) = 18 -> 18; A = 0.05: rank ceil(20 * 0.95) = 19 -> 19 (n = 1/A - 1: just enough)
    assert decisions.conformal_threshold(scores, 0.1) == 18.0
    assert decisions.conformal_threshold(scores, 0.05) == 19.0
    assert decisions.conformal_threshold(scores, 0.5) == 10.0  # rank ceil(20 * 0.5) = 10
    with pytest.raises(ValueError, match=r"smallest reachable is 1/\(n \+ 1\) = 0.0556; it needs at least 19"):
        decisions.conformal_threshold(scores[:17], 0.05)
    with pytest.raises(ValueError, match="must be in"):
        decisions.conformal_threshold(scores, 0.0)


def test_p_values_by_hand_and_the_same_decision_as_the_threshold() -> None:
    cal = np.arange(1.0, 20.0)
    assert decisions.conformal_p_values(cal, [0.5, 10.0, 19.0, 25.0]).tolist() == [1.0, 0.55, 0.1, 0.05]
    rng = np.random.default_rng(0)
    cal, new = rng.normal(size=39), rng.normal(size=500)
    for a in (0.05, 0.1, 0.25):
        flagged = new > decisions.conformal_threshold(cal, a)
        assert np.array_equal(flagged, decisions.conformal_p_values(cal, new) <= a)


def test_the_guarantee_holds_by_simulation() -> None:
    """Exchangeable normal scores: over many calibration draws the mean false-alarm rate is at most A, within the
    binomial spread of the simulation, and close to it (the threshold is not needlessly loose)."""
    rng = np.random.default_rng(1)
    n, n_test, draws = 19, 200, 2000
    for a in (0.05, 0.1):
        rates = []
        for _ in range(draws):
            scores = rng.gamma(2.0, size=n + n_test)
            t = decisions.conformal_threshold(scores[:n], a)
            rates.append(np.mean(scores[n:] > t))
        spread = 3 * math.sqrt(a * (1 - a) / (draws * n_test)) + 3 * 0.05 / math.sqrt(draws)  # test and draw noise
        expected = 1 - math.ceil((n + 1) * (1 - a)) / (n + 1)  # the exact false-alarm rate of this rank
        assert np.mean(rates) <= a + spread
        assert abs(np.mean(rates) - expected) <= spread


def test_f1_max_threshold_against_a_brute_force_search() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(size=60) + labels
    t = decisions.f1_max_threshold(labels, scores)

    def f1(threshold: float) -> float:
        flagged = scores > threshold
        tp = np.sum(flagged & (labels == 1))
        return 2 * tp / (flagged.sum() + labels.sum())

    assert f1(t) == pytest.approx(max(f1(c) for c in np.concatenate([[-np.inf], scores])))
    r = decisions.rates(labels, scores, t)
    assert r["detection_rate"] == np.mean(scores[labels == 1] > t)
    assert r["false_alarm_rate"] == np.mean(scores[labels == 0] > t)


def _image(path: Path, seed: int, dent: bool = False) -> None:
    arr = (np.random.default_rng(seed).uniform(0.4, 0.6, (40, 40, 3)) * 255).astype(np.uint8)
    if dent:
        arr[10:20, 10:20] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def good_only(tmp_path: Path) -> Path:
    """ROOT/widget/train/good with 25 good images and no test folder."""
    for i in range(25):
        _image(tmp_path / "data/widget/train/good" / f"{i}.png", i)
    return tmp_path / "data"


def test_fit_on_good_images_only_then_predict_with_decisions(good_only: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.pt"
    assert cli.main(["fit", "--data", str(good_only), "--target-fpr", "0.2", "--save-model", str(model), *SMALL]) == 0
    assert "fitted on 20 good images, calibrated on 5" in capsys.readouterr().out
    meta = torch.load(model, weights_only=True)["meta"]["calibration"]
    assert len(meta["scores"]) == 5 and meta["threshold"] == decisions.conformal_threshold(meta["scores"], 0.2)
    # new images in nested folders: found recursively, each with score, p-value and decision
    new = tmp_path / "new"
    _image(new / "line1/a.png", 100)
    _image(new / "line2/deep/a.png", 101, dent=True)
    out = tmp_path / "s.csv"
    assert cli.main(["predict", "--model", str(model), str(new), "--out", str(out), "--report", str(tmp_path / "r")]) \
        == 0
    assert "2 images scored" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(new / "line1/a.png"), str(new / "line2/deep/a.png")]
    assert set(rows[0]) == {"path", "score", "p_value", "anomalous"}
    assert rows[1]["anomalous"] == "True" and float(rows[1]["p_value"]) == pytest.approx(1 / 6)
    # the report: valid HTML, flagged first, every figure linked and on disk
    page = (tmp_path / "r/index.html").read_text()

    class Links(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.links: list[str] = []
            self.open: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.links += [v for k, v in attrs if k in ("href", "src")]
            if tag not in ("img", "meta", "br"):
                self.open.append(tag)

        def handle_endtag(self, tag: str) -> None:
            assert self.open.pop() == tag  # well nested

    parser = Links()
    parser.feed(page)
    assert page.startswith("<!DOCTYPE html>") and not parser.open
    assert sorted(set(parser.links)) == ["maps/line1_a.png", "maps/deep_a.png"][::-1]
    assert all((tmp_path / "r" / link).is_file() for link in parser.links)
    assert page.index("deep_a.png") < page.index("line1_a.png")  # the flagged image first


def test_fit_on_a_plain_folder_refuses_too_few_calibration_images(tmp_path: Path, capsys) -> None:
    for i in range(30):
        _image(tmp_path / "good" / f"{i}.jpg", i)
    args = ["fit", "--good", str(tmp_path / "good"), "--save-model", str(tmp_path / "m.pt"), *SMALL]
    assert cli.main(args) == 2  # 6 calibration images cannot reach 0.05
    err = capsys.readouterr().err
    assert "leave 6 to calibrate" in err and "needs 19 calibration images, about 95 good images" in err
    assert not (tmp_path / "m.pt").exists()
    assert cli.main([*args, "--target-fpr", "0.15"]) == 0
    assert torch.load(tmp_path / "m.pt", weights_only=True)["meta"]["calibration"]["target_fpr"] == 0.15


def test_calibrate_changes_the_threshold_and_nothing_else(good_only: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    assert cli.main(["fit", "--data", str(good_only), "--target-fpr", "0.2", "--save-model", str(model), *SMALL]) == 0
    before = torch.load(model, weights_only=True)
    brighter = tmp_path / "brighter"  # a lighting change: the same kind of parts, brighter
    for i in range(9):
        arr = np.asarray(Image.open(good_only / f"widget/train/good/{i}.png"), dtype=np.float64) * 1.3
        brighter.mkdir(exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(brighter / f"{i}.png")
    assert cli.main(["calibrate", "--model", str(model), "--good", str(brighter)]) == 0
    after = torch.load(model, weights_only=True)
    assert after["meta"]["calibration"]["threshold"] != before["meta"]["calibration"]["threshold"]
    assert len(after["meta"]["calibration"]["scores"]) == 9
    assert {k: v for k, v in after.items() if k != "meta"}.keys() == {k for k in before if k != "meta"}
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert after["hparams"] == before["hparams"] and after["image_shape"] == before["image_shape"]
    assert {k: v for k, v in after["meta"].items() if k != "calibration"} == \
        {k: v for k, v in before["meta"].items() if k != "calibration"}


def test_a_heatmap_has_the_same_colours_alone_and_in_a_batch(good_only: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    assert cli.main(["fit", "--data", str(good_only), "--target-fpr", "0.2", "--save-model", str(model), *SMALL]) == 0
    _image(tmp_path / "batch/normal.png", 200)
    _image(tmp_path / "batch/dent.png", 201, dent=True)
    deploy.predict(model, [tmp_path / "batch/normal.png"], save_maps=tmp_path / "alone")
    deploy.predict(model, [tmp_path / "batch"], save_maps=tmp_path / "together")
    alone = np.asarray(Image.open(tmp_path / "alone/batch_normal.png"), dtype=np.int16)
    together = np.asarray(Image.open(tmp_path / "together/batch_normal.png"), dtype=np.int16)
    assert alone.shape == together.shape and np.abs(alone - together).max() <= 2


def test_run_calibrate_reports_rates_and_keeps_the_metrics(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(25):
        _image(root / "widget/train/good" / f"{i}.png", i)
    for i in range(4):
        _image(root / "widget/test/good" / f"{i}.png", 50 + i)
        _image(root / "widget/test/dent" / f"{i}.png", 60 + i, dent=True)
    small = {"backbone": "random-resnet18", "image_size": 32, "device": "cpu"}
    plain = folders.run("patchknn", root, **small)["categories"]["widget"]
    calibrated = folders.run("patchknn", root, **small, calibrate=True, target_fpr=0.2)["categories"]["widget"]
    assert {k: calibrated[k] for k in ("image_auroc", "pixel_auroc")} == {k: plain[k] for k in ("image_auroc",
                                                                                                 "pixel_auroc")}
    assert set(folders.CALIBRATED_COLUMNS) <= set(calibrated) and calibrated["detection_rate"] == 1.0
    assert 0 <= calibrated["false_alarm_rate"] <= 1
