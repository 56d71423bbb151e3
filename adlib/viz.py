"""Figures and tables: anomaly-map overlays, ROC/PR curves, score histograms, results-vs-paper tables.

Functions return matplotlib Figures/Axes or pandas DataFrames and never call ``plt.show()``: the
notebook decides how to show them. Labels follow the book's convention: ``0`` = normal, ``1`` = anomalous.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from sklearn.metrics import roc_curve

from adlib.core.arrays import to_numpy
from adlib.core.profiles import check_profile
from adlib.eval import metrics

__all__ = [
    "overlay",
    "heatmap_grid",
    "roc_curves",
    "score_histogram",
    "quality_vs_cost",
    "source",
    "Result",
    "results_vs_paper",
    "metrics_table",
]


def _as_rgb(image: Any) -> np.ndarray:
    """One image (H, W), (H, W, 3), (3, H, W) or a 1-channel variant, uint8 or float in [0, 1] -> (H, W, 3) float."""
    x = to_numpy(image)
    if x.ndim == 3 and x.shape[-1] not in (1, 3) and x.shape[0] in (1, 3):
        x = np.moveaxis(x, 0, -1)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = np.stack([x] * 3, axis=-1)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"An image must be (H, W), (H, W, 3) or (3, H, W), got shape {x.shape}.")
    if x.dtype == np.uint8:
        return x / 255.0
    x = x.astype(np.float64)
    if x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise ValueError(
            f"Float images must lie in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
            "undo the normalisation first (x * std + mean) or pass uint8."
        )
    return np.clip(x, 0.0, 1.0)


def overlay(
    image: Any,
    score_map: Any,
    alpha: float = 0.5,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "jet",
) -> np.ndarray:
    """Blend a colour-mapped ``score_map`` (H, W) onto ``image`` -> (H, W, 3) float RGB in [0, 1].

    ``image``: (H, W), (H, W, 3) or (3, H, W), uint8 or float in [0, 1]. ``alpha`` is the weight of
    the map. The colour scale spans [``vmin``, ``vmax``], by default this map's own min and max;
    pass shared values to compare several maps. The scaling is for display only: metrics always
    use the raw scores.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    rgb = _as_rgb(image)
    s = to_numpy(score_map).astype(np.float64)
    if s.shape != rgb.shape[:2]:
        raise ValueError(
            f"score_map must be (H, W) = {rgb.shape[:2]} like the image, got {s.shape}; "
            "upsample the map to the image size first."
        )
    norm = Normalize(s.min() if vmin is None else vmin, s.max() if vmax is None else vmax)
    colours = colormaps[cmap](norm(s))[..., :3]
    return (1.0 - alpha) * rgb + alpha * colours


def save_overlays(folder: str | Path, images: Any, maps: Any, names: Sequence[str], *,
                  vmin: float | None = None, vmax: float | None = None, overwrite: bool = False) -> list[Path]:
    """Write one PNG per image: its anomaly map (N, H, W) blended onto it (:func:`overlay`), as
    ``folder/<name>.png``. The colour scale is shared by all images ([``vmin``, ``vmax``], default the maps'
    overall min and max), so a brighter overlay means a higher score. Refuses to overwrite existing files unless
    ``overwrite``, repeated names and symbolic links always.

    Used by: ``adlib.bench.folders``.
    """
    from PIL import Image

    folder = Path(folder)
    maps = to_numpy(maps, np.float64)
    if len(names) != len(maps):
        raise ValueError(f"need one name per map: {len(names)} names for {len(maps)} maps.")
    paths = [folder / f"{name}.png" for name in names]
    if len(set(paths)) < len(paths):
        raise ValueError(f"two overlays would be named {next(p for p in paths if paths.count(p) > 1).name}; "
                         "give every image its own name.")
    links = [p for p in paths if p.is_symlink()]
    if links:
        raise ValueError(f"{links[0]} is a symbolic link; adlib does not write through links.")
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} of the overlays would be overwritten); "
                              "choose another folder, delete them first or pass --overwrite.")
    lo, hi = (maps.min() if vmin is None else vmin), (maps.max() if vmax is None else vmax)
    for path, image, amap in zip(paths, images, maps):
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = overlay(image, amap, vmin=lo, vmax=hi)
        Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)
    return paths


def save_decision_figure(path: str | Path, image: Any, score_map: Any, scale: tuple[float, float], title: str,
                         dpi: int = 100) -> Path:
    """Write ``path`` (PNG): the original ``image`` (H, W, 3) in [0, 1] beside its ``score_map`` (h, w, any size,
    resized to H x W) blended onto it on the fixed colour ``scale`` (lo, hi) with a colour bar, ``title`` above; each
    panel at the image's own size. A fixed scale gives one image the same colours alone or in any batch.

    Used by: ``adlib.bench.deploy.predict``.
    """
    import torch
    import torch.nn.functional as F

    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; adlib does not write through links.")
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    amap = F.interpolate(torch.as_tensor(to_numpy(score_map, np.float32))[None, None], size=(h, w),
                         mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = scale
    zoom = max(1.0, 256 / max(h, w))  # small images are drawn larger, so the title and colour bar stay readable
    pw, ph, right, top = w * zoom, h * zoom, 110, 40  # panel and margins, in pixels
    fig_w, fig_h = 2 * pw + 8 + right, ph + top + 4
    fig = plt.figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    for k, shown in enumerate((rgb, overlay(rgb, amap, vmin=lo, vmax=hi))):
        ax = fig.add_axes(((k * (pw + 8)) / fig_w, 4 / fig_h, pw / fig_w, ph / fig_h))
        ax.imshow(shown, interpolation="nearest" if zoom > 1 else "antialiased")
        ax.set_axis_off()
    bar = fig.add_axes(((2 * pw + 20) / fig_w, 4 / fig_h + 0.1 * ph / fig_h, 12 / fig_w, 0.8 * ph / fig_h))
    fig.colorbar(ScalarMappable(Normalize(lo, hi), cmap="jet"), cax=bar, label="pixel score")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def heatmap_grid(
    images: Any,
    masks: Any,
    maps: Any,
    titles: list[str] | None = None,
    max_rows: int = 8,
    *,
    alpha: float = 0.5,
) -> Figure:
    """One row per sample: image | ground truth (red, outlined) | anomaly map over the image.

    ``images``: (N, H, W, 3) or (N, 3, H, W) uint8 or float in [0, 1], or grayscale (N, H, W);
    ``masks``: (N, H, W), nonzero = defect; ``maps``: (N, H, W) anomaly scores; ``titles``: N row
    labels. Only the first ``max_rows`` samples are drawn (index the arrays to choose others). One
    colour scale, from the min and max of the maps shown, is shared by the whole grid so rows can be
    compared; it is for display only, metrics use the raw scores. Returns a Figure with 3 axes per
    row plus a colour bar; it is not registered with pyplot, so a cell shows it once, as its value.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    images, masks, maps = to_numpy(images), to_numpy(masks), to_numpy(maps).astype(np.float64)
    n = len(images)
    if n == 0 or len(masks) != n or len(maps) != n:
        raise ValueError(f"images, masks and maps need the same, nonzero length; got {n}, {len(masks)}, {len(maps)}.")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles needs one entry per sample ({n}), got {len(titles)}.")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}.")
    rows = min(n, max_rows)
    vmin, vmax = float(maps[:rows].min()), float(maps[:rows].max())
    cmap = "jet"

    fig = Figure(figsize=(7.5, 2.5 * rows), layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False)
    for i in range(rows):
        rgb = _as_rgb(images[i])
        mask = masks[i] > 0
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"masks must be (N, H, W) with (H, W) = {rgb.shape[:2]} like the images, "
                             f"got {masks.shape}.")
        axes[i, 0].imshow(rgb)
        axes[i, 1].imshow(rgb)
        axes[i, 1].imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap(["red"]), alpha=0.4)
        if mask.any():  # contour of an empty mask only raises a warning
            axes[i, 1].contour(mask, levels=[0.5], colors="red", linewidths=1)
        axes[i, 2].imshow(overlay(rgb, maps[i], alpha, vmin=vmin, vmax=vmax, cmap=cmap))
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i])
    for ax, name in zip(axes[0], ("image", "ground truth", "anomaly map")):
        ax.set_title(name)
    fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=axes[:, 2], label="anomaly score", shrink=0.8)
    return fig


def _new_axes(ax: Axes | None) -> Axes:
    # A pyplot figure, so a notebook cell shows it at the end even when only the Axes is returned.
    return plt.subplots(figsize=(4.5, 4))[1] if ax is None else ax


def roc_curves(labels: Any, scores_by_method: Mapping[str, Any], ax: Axes | None = None) -> Axes:
    """ROC curve of each method's image scores (N,) against ``labels`` (N,), AUROC in the legend.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    if not scores_by_method:
        raise ValueError("scores_by_method is empty: pass {method name: scores}.")
    ax = _new_axes(ax)
    for name, scores in scores_by_method.items():
        y, s = metrics.check_labels_scores(labels, scores)
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {metrics.image_auroc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance (AUROC 0.500)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return ax


def score_histogram(labels: Any, scores: Any, ax: Axes | None = None, bins: int = 30) -> Axes:
    """Histograms of the normal and the anomalous scores (N,) on shared bins: how well they separate.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    y, s = metrics.check_labels_scores(labels, scores)
    ax = _new_axes(ax)
    edges = np.histogram_bin_edges(s, bins=bins)
    for value, name in ((0, "normal"), (1, "anomalous")):
        ax.hist(s[y == value], bins=edges, alpha=0.6, label=f"{name} (n={np.sum(y == value)})")
    ax.set(xlabel="anomaly score", ylabel="count")
    ax.legend()
    return ax


def source(obj: Any) -> str:
    """The source code of a function or class as a chapter prints it, without its docstring (the chapter's text
    explains it): the code exactly as it runs in the package.

    Defined in: "Anomaly detection in ten minutes" (``notebooks/01_ad_in_ten_minutes.ipynb``).
    """
    lines = inspect.getsource(obj).splitlines(keepends=True)
    body = ast.parse(textwrap.dedent("".join(lines))).body[0].body
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines = lines[:first.lineno - 1] + lines[first.end_lineno:]
    return "".join(lines)


def quality_vs_cost(table: pd.DataFrame, metric: str = "aupro", ax: Axes | None = None) -> Axes:
    """One point per method (a row of :func:`adlib.bench.benchmark.summary`): x the seconds per category (fit + predict,
    log scale), y ``metric`` with its 95 % interval (columns ``<metric>``, ``<metric>_low``, ``<metric>_high``).

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    ax = plt.subplots(figsize=(6, 4))[1] if ax is None else ax
    x = table["fit_s"] + table["predict_s"]
    y = table[metric]
    # A percentile interval need not contain the exact estimate on a tiny test set: clip the bars at the point.
    err = np.clip(np.vstack([y - table[f"{metric}_low"], table[f"{metric}_high"] - y]), 0, None)
    ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
    # Labels alternate above and below the points in order of cost, so that neighbours do not overprint.
    for k, (xi, yi, name) in enumerate(sorted(zip(x, y, table.index))):
        ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(5, 4 if k % 2 else -11), fontsize=9)
    ax.set(xscale="log", xlabel="seconds per category (fit + predict, log scale)", ylabel=metric.replace("_", " "))
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.grid(True, alpha=0.3)
    return ax


@dataclass(frozen=True)
class Result:
    """One number in a results-vs-paper table.

    ``source`` is ``"paper:<citekey>"`` (a key of ``book/references.bib``) for a number the paper
    reports, or ``"ours:<profile>"`` for one computed in this run; ``data`` names the data set (and
    split) it was measured on; ``note`` explains a difference.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """

    method: str
    metric: str
    value: float
    source: str
    data: str
    note: str = ""


def _source_label(source: str) -> str:
    kind, _, key = source.partition(":")
    if kind == "paper" and key:
        return f"paper ({key})"
    if kind == "ours" and key:
        return f"ours (profile={check_profile(key)})"
    raise ValueError(
        f"source must be 'paper:<citekey>' (a key of book/references.bib) or 'ours:<profile>', got {source!r}."
    )


def results_vs_paper(rows: Iterable[Result | Mapping[str, Any]]) -> pd.DataFrame:
    """The "Results vs paper" table: columns Method, Metric, Value, Source, Data, Note.

    ``rows``: :class:`Result` objects or dicts with the same keys. Source reads "paper (<citekey>)"
    or "ours (profile=<profile>)". Values are shown with 3 decimals exactly as given, so give
    fractions or percents as the paper does and say which in the Metric (e.g. "image AUROC (%)").

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    keys = [f.name for f in fields(Result)]
    table = []
    for row in rows:
        if isinstance(row, Mapping):
            unknown = set(row) - set(keys)
            if unknown:
                raise ValueError(f"Unknown result keys {sorted(unknown)}; a row has the keys {keys}.")
            row = Result(**row)
        table.append(
            {
                "Method": row.method,
                "Metric": row.metric,
                "Value": f"{float(row.value):.3f}",
                "Source": _source_label(row.source),
                "Data": row.data,
                "Note": row.note,
            }
        )
    if not table:
        raise ValueError("rows is empty: give at least one Result.")
    return pd.DataFrame(table)


def metrics_table(results: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """{method or category: :func:`adlib.eval.metrics.evaluate` dict} -> one row each plus a ``mean`` row.

    A metric missing from a row is NaN there and in the mean, so a mean never silently averages
    fewer rows. Values stay unrounded floats; use ``.round(3)`` to show them.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if not results:
        raise ValueError("results is empty: pass {method or category: metrics dict}.")
    if "mean" in results:
        raise ValueError("'mean' is reserved for the mean row; rename that entry.")
    table = pd.DataFrame.from_dict({name: dict(row) for name, row in results.items()}, orient="index")
    table.loc["mean"] = table.mean(skipna=False)
    return table
