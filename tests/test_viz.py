"""adlib.viz: figures build with the expected axes, tables mark sources and means correctly."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from adlib import viz
from adlib.eval import metrics  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def small_batch(n=3, size=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size, 3))
    masks = np.zeros((n, size, size), int)
    masks[1:, 3:6, 4:8] = 1
    maps = rng.random((n, size, size)) + 2 * masks
    return images, masks, maps


def test_overlay_blends_image_and_colour_mapped_scores():
    image = np.full((4, 5), 0.5)
    score_map = np.arange(20.0).reshape(4, 5)
    out = viz.overlay(image, score_map, alpha=0.0)
    assert out.shape == (4, 5, 3)
    np.testing.assert_allclose(out, 0.5)
    colours = viz.overlay(image, score_map, alpha=1.0, cmap="gray")
    np.testing.assert_allclose(colours[..., 0], score_map / 19.0, atol=1 / 255)  # own min/max by default
    shared = viz.overlay(image, score_map, alpha=1.0, vmin=0.0, vmax=38.0, cmap="gray")
    np.testing.assert_allclose(shared[..., 0], score_map / 38.0, atol=1 / 255)
    uint8 = viz.overlay(np.full((4, 5, 3), 255, np.uint8), score_map, alpha=0.0)
    np.testing.assert_allclose(uint8, 1.0)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "gray", "uint8", "torch"])
def test_heatmap_grid_axes(layout):
    images, masks, maps = small_batch()
    images = {
        "nhwc": images,
        "nchw": images.transpose(0, 3, 1, 2),
        "gray": images[..., 0],
        "uint8": (images * 255).astype(np.uint8),
        "torch": torch.tensor(images.transpose(0, 3, 1, 2)),
    }[layout]
    fig = viz.heatmap_grid(images, masks, maps, titles=["good", "crack", "hole"])
    assert len(fig.axes) == 3 * 3 + 1  # three panels per row and one shared colour bar
    assert fig.axes[0].get_ylabel() == "good"
    assert [ax.get_title() for ax in fig.axes[:3]] == ["image", "ground truth", "anomaly map"]


def test_heatmap_grid_caps_rows_and_shares_the_colour_scale():
    images, masks, maps = small_batch(n=5)
    maps[4] += 100.0  # outside the rows shown: must not stretch the colour scale
    fig = viz.heatmap_grid(images, masks, maps, max_rows=2)
    assert len(fig.axes) == 2 * 3 + 1
    colour_bar = fig.axes[-1]
    assert colour_bar.get_ylim() == pytest.approx((maps[:2].min(), maps[:2].max()))


def test_heatmap_grid_errors():
    images, masks, maps = small_batch()
    with pytest.raises(ValueError, match="same, nonzero length"):
        viz.heatmap_grid(images, masks[:2], maps)
    with pytest.raises(ValueError, match="titles"):
        viz.heatmap_grid(images, masks, maps, titles=["a"])
    with pytest.raises(ValueError, match="undo the normalisation"):
        viz.heatmap_grid(images * 4 - 2, masks, maps)
    with pytest.raises(ValueError, match="upsample"):
        viz.heatmap_grid(images, masks, maps[:, :6, :6])


def test_curves_show_metrics_in_legend():
    labels = np.array([0, 0, 0, 1, 1])
    scores = {"good": [0.1, 0.2, 0.3, 0.8, 0.9], "poor": [0.9, 0.2, 0.3, 0.1, 0.8]}
    ax = viz.roc_curves(labels, scores)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == [
        f"good (AUROC {metrics.image_auroc(labels, scores['good']):.3f})",
        f"poor (AUROC {metrics.image_auroc(labels, scores['poor']):.3f})",
    ]
    assert legend[0] == "good (AUROC 1.000)"

    with pytest.raises(ValueError, match="empty"):
        viz.roc_curves(labels, {})


def test_score_histogram_counts_each_class():
    labels = np.array([0] * 6 + [1] * 4)
    scores = np.linspace(0.0, 1.0, 10)
    ax = viz.score_histogram(labels, scores, bins=5)
    normal, anomalous = ax.containers
    assert sum(p.get_height() for p in normal) == 6
    assert sum(p.get_height() for p in anomalous) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["normal (n=6)", "anomalous (n=4)"]
    with pytest.raises(ValueError, match="both normal and anomalous"):
        viz.score_histogram([0, 0], [0.1, 0.2])


def test_results_vs_paper_marks_sources():
    table = viz.results_vs_paper(
        [
            viz.Result("PatchCore", "image AUROC (%)", 99.1, "paper:roth2022patchcore", "MVTec AD"),
            {"method": "PatchCore", "metric": "image AUROC", "value": 0.93456, "source": "ours:book",
             "data": "SynthTex", "note": "small backbone"},
        ]
    )
    assert list(table.columns) == ["Method", "Metric", "Value", "Source", "Data", "Note"]
    assert list(table["Source"]) == ["paper (roth2022patchcore)", "ours (profile=book)"]
    assert list(table["Value"]) == ["99.100", "0.935"]  # kept as given: percent stays percent
    assert list(table["Note"]) == ["", "small backbone"]


@pytest.mark.parametrize(
    "source, message",
    [("arxiv:1234", "paper:<citekey>"), ("paper:", "paper:<citekey>"), ("ours", "ours:<profile>"),
     ("ours:bok", "Unknown profile")],
)
def test_results_vs_paper_rejects_unknown_sources(source, message):
    with pytest.raises(ValueError, match=message):
        viz.results_vs_paper([viz.Result("m", "AUROC", 0.9, source, "d")])


def test_results_vs_paper_rejects_misspelt_keys():
    with pytest.raises(ValueError, match="Unknown result keys"):
        viz.results_vs_paper([{"method": "m", "metric": "AUROC", "valeu": 0.9, "source": "ours:book", "data": "d"}])


def test_metrics_table_mean_row():
    table = viz.metrics_table(
        {
            "brick": {"image_auroc": 0.9, "aupro": 0.6},
            "grass": {"image_auroc": 0.7, "aupro": 0.8},
            "gravel": {"image_auroc": 0.8},
        }
    )
    assert list(table.index) == ["brick", "grass", "gravel", "mean"]
    assert table.loc["mean", "image_auroc"] == pytest.approx(0.8)
    assert np.isnan(table.loc["mean", "aupro"])  # one category lacks it: no mean over a subset
    complete = viz.metrics_table({"a": {"ap": 0.5, "fpr95": 0.1}, "b": {"ap": 1.0, "fpr95": 0.4}})
    pd.testing.assert_series_equal(
        complete.loc["mean"], pd.Series({"ap": 0.75, "fpr95": 0.25}, name="mean"), check_exact=False
    )
    with pytest.raises(ValueError, match="reserved"):
        viz.metrics_table({"mean": {"ap": 0.5}})


def _documented(x: int) -> int:
    """A docstring
    over two lines."""
    return x + 1  # the code stays


def test_source_drops_only_the_docstring() -> None:
    assert viz.source(_documented) == "def _documented(x: int) -> int:\n    return x + 1  # the code stays\n"
    assert viz.source(test_source_drops_only_the_docstring).startswith("def test_source_drops_only_the_docstring")
    method = viz.source(viz.Result)
    assert method.startswith("@dataclass(frozen=True)\nclass Result:") and "One number in" not in method
