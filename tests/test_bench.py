"""The benchmark: its bootstrap shortcuts against the exact metrics, the sweep, the files it writes, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from adlib import cli
from adlib.bench import benchmark, folders, runs
from adlib.eval import metrics
from test_detectors import _image, make_folder


def _maps_and_masks(seed: int = 0, n: int = 8, size: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half normal, half with one or two square defects; maps are noise plus signal on the defects, with ties."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n // 2) + [1] * (n // 2))
    masks = np.zeros((n, size, size), np.uint8)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, size - 6, 2)
        masks[i, r:r + rng.integers(2, 6), c:c + rng.integers(2, 6)] = 1
        if i % 2:
            masks[i, 0:2, size - 3:] = 1  # a second region in the same image
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    return labels, masks, np.round(maps, 1)  # rounding makes ties, as blurred maps have


def test_pixel_counts_match_the_exact_metrics() -> None:
    labels, masks, maps = _maps_and_masks()
    grid = benchmark.PixelCounts.from_maps(masks, maps).metrics()
    assert grid["pixel_auroc"][0] == pytest.approx(metrics.pixel_auroc(masks, maps), abs=2e-3)
    assert grid["aupro"][0] == pytest.approx(metrics.aupro(masks, maps), abs=2e-3)


def test_weights_equal_repeating_the_images() -> None:
    """A draw's counts (image i taken w_i times) give the metrics of the test set with those repeats."""
    labels, masks, maps = _maps_and_masks(seed=1)
    weights = np.array([2, 0, 1, 3, 1, 2, 0, 1])
    repeated = np.repeat(np.arange(len(labels)), weights)
    counts = benchmark.PixelCounts.from_maps(masks, maps)
    grid = counts.metrics(weights[None])
    assert grid["aupro"][0] == pytest.approx(metrics.aupro(masks[repeated], maps[repeated]), abs=3e-3)
    assert grid["pixel_auroc"][0] == pytest.approx(metrics.pixel_auroc(masks[repeated], maps[repeated]), abs=3e-3)
    scores = maps.max(axis=(1, 2))
    draws = benchmark.image_auroc_draws(labels, scores, np.vstack([np.ones(len(labels)), weights]))
    assert draws[0] == pytest.approx(roc_auc_score(labels, scores))
    assert draws[1] == pytest.approx(roc_auc_score(labels[repeated], scores[repeated]))


def test_resample_weights_keep_the_class_counts_and_repeat() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    w = benchmark.resample_weights(labels, n_boot=50, seed=3)
    assert w.shape == (50, 5) and (w[:, :3].sum(1) == 3).all() and (w[:, 3:].sum(1) == 2).all()
    assert np.array_equal(w, benchmark.resample_weights(labels, n_boot=50, seed=3))
    assert not np.array_equal(w, benchmark.resample_weights(labels, n_boot=50, seed=4))


SMALL = {"patchknn": {"backbone": "random-resnet18"}, "padim": {"backbone": "random-resnet18", "layers": (1, 2),
                                                                 "d": 16}}


def test_sweep_summary_and_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", masks=True)
    records = benchmark.sweep(root, ["patchknn", "padim"], image_size=32, keep=[0], options=SMALL, seeds=(0, 1))
    assert [(r["name"], r["seed"]) for r in records] == [("patchknn", 0), ("patchknn", 1), ("padim", 0), ("padim", 1)]
    assert records[0]["maps"].shape == (1, 32, 32) and set(records[0]["by_defect"]) == {"dent"}
    table = benchmark.summary(records, n_boot=200)
    assert list(table.index) == ["patchknn", "padim"]
    for metric in benchmark.QUALITY:
        mean = np.mean([r["row"][metric] for r in records[:2]])
        assert table.loc["patchknn", metric] == pytest.approx(mean)
        assert table.loc["patchknn", f"{metric}_low"] <= table.loc["patchknn", f"{metric}_high"]
    assert (table["fit_s"] > 0).all() and (table["predict_ms"] > 0).all()
    assert benchmark.by_defect(records).shape == (2, 1)
    paths = benchmark.write(records, tmp_path / "out", {"data": str(root)})
    doc = json.loads(paths["json"].read_text())
    assert set(doc["summary"]) == {"patchknn", "padim"} and len(doc["runs"]) == 4
    assert paths["markdown"].read_text().startswith("| method |") and paths["figure"].stat().st_size > 1000
    with pytest.raises(FileExistsError, match="not an empty folder"):
        benchmark.write(records, tmp_path / "out", {})


def test_bench_cli_writes_the_report_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "data", masks=True)
    monkeypatch.setitem(benchmark.SWEEP, "patchknn", ("patchknn", SMALL["patchknn"]))
    args = ["bench", "--data", str(root), "--methods", "patchknn", "--image-size", "32", "--device", "cpu",
            "--out", str(tmp_path / "report")]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert "| patchknn |" in printed.out
    assert "[1/1] patchknn on widget (seed 0): " in printed.err and "s to go" in printed.err
    assert json.loads((tmp_path / "report/bench.json").read_text())["settings"]["methods"] == ["patchknn"]
    assert cli.main(args) == 2 and "not an empty folder" in capsys.readouterr().err
    assert cli.main(["bench", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 2
    assert "Expected" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown bench method"):
        benchmark.sweep(root, ["patchkn"])


def test_run_and_bench_share_one_run_path_and_refuse_partial_masks(tmp_path: Path) -> None:
    """A folder where one defect type has masks and another has none gives image metrics only, in `run` and in
    `bench` alike: all-zero masks for the unmasked type would count its defect pixels as normal."""
    root = make_folder(tmp_path / "data", masks=True)  # "dent" has masks
    for i in range(2):
        _image(root / f"widget/test/scratch/{i}.png", 30 + i, defect=True)  # "scratch" has none
    small = dict(image_size=32, backbone="random-resnet18", device="cpu")
    run = runs.run_category("patchcore", root, "widget", seed=0, **small)
    assert run.test.masks is None and run.test.labels.tolist() == [1, 1, 0, 0, 1, 1]  # dent, good, scratch
    assert run.row["pixel_auroc"] is None and run.scores.maps.shape == (6, 32, 32)
    record = benchmark.run_one("patchcore", root, "widget", seed=0, **small)
    assert record["row"]["pixel_auroc"] is None and record["row"]["aupro"] is None and record["counts"] is None
    assert {k: v["aupro"] for k, v in record["by_defect"].items()} == {"dent": None, "scratch": None}
    result = folders.run("patchcore", root, seed=0, **small)["categories"]["widget"]
    # one path: the same seed gives the same image AUROC from both commands
    assert result["aupro"] is None and result["image_auroc"] == record["row"]["image_auroc"]
    assert result["image_auroc"] == roc_auc_score(record["labels"], record["scores"])
