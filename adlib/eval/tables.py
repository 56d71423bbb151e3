"""Results tables of a zero-shot detector evaluated object by object, and their summaries over runs.

A zero-shot detector (WinCLIP-style CLIP, AA-CLIP) is told which object it looks at, so it is scored one object at
a time, and its metrics are averaged over the objects, as MVTec AD results are reported per category:
:func:`per_object` gives that table. Trained variants are run with several seeds: :func:`mean_of_runs` averages
their tables, :func:`interval_table` writes "mean [low, high]" cells with a Student-t interval over a table's rows
(objects or seeds), and :func:`interval_bounds` gives the same intervals as numbers, for error bars.

Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, MutableMapping, Sequence

import numpy as np
import pandas as pd

from adlib.data.imageset import ImageSet
from adlib.eval import metrics
from adlib.eval.claims import mean_interval, spread_interval
from adlib.eval.scores import Scores

#: The columns of :func:`per_object`: image AUROC, pixel AUROC and AUPRO.
METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro")


def per_object(
    score_fn: Callable[[ImageSet, str], Any],
    images: ImageSet,
    objects: Sequence[str] | None = None,
    *,
    shown: Sequence[int] = (),
    maps: MutableMapping[int, np.ndarray] | None = None,
    kept: MutableMapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> pd.DataFrame:
    """Image AUROC, pixel AUROC and AUPRO of each object's images, and their mean over the objects.

    ``score_fn(subset, name)`` scores the images of ``images`` whose ``objects`` entry is ``name`` (an
    :class:`adlib.data.imageset.ImageSet` of M images) and returns ((M,) image scores, (M, H, W) maps) or an
    :class:`adlib.eval.scores.Scores`; ``images`` needs labels and masks. ``objects``: the rows, in order (default:
    every object of ``images`` in order of appearance). Returns a DataFrame with one row per object and a last row
    ``"mean"`` (the unweighted mean of the objects' rows), columns :data:`METRICS`. ``maps``: a dict that receives
    the map of every image whose index (into ``images``) is in ``shown``, for a heatmap figure. ``kept``: a dict that
    receives every object's (image scores, maps), for :func:`adlib.bench.benchmark.object_image_draws`.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if images.labels is None or images.masks is None:
        raise ValueError("per_object needs images with labels and masks (the pixel metrics compare maps with masks).")
    names = np.asarray(images.objects)
    rows = {}
    for name in dict.fromkeys(images.objects) if objects is None else objects:
        idx = np.flatnonzero(names == name)
        if len(idx) == 0:
            raise ValueError(f"No image of object {name!r}; the images show {sorted(set(images.objects))}.")
        out = score_fn(images[idx], name)
        scores, object_maps = (out.image, out.maps) if isinstance(out, Scores) else out
        m = metrics.evaluate(images.labels[idx], scores, images.masks[idx], object_maps)
        rows[name] = {k: m[k] for k in METRICS}
        if kept is not None:
            kept[name] = (np.asarray(scores), np.asarray(object_maps))
        if maps is not None:
            maps.update({i: object_maps[j] for j, i in enumerate(idx) if i in shown})
    table = pd.DataFrame(rows).T
    table.loc["mean"] = table.mean()
    return table


def mean_of_runs(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The cell-by-cell mean of several runs' :func:`per_object` tables (e.g. one per seed), without their
    ``"mean"`` rows: (objects x metrics) -> (objects x metrics).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if not tables:
        raise ValueError("mean_of_runs needs at least one table.")
    return sum(t.drop(index="mean", errors="ignore") for t in tables) / len(tables)


def interval_table(tables: Mapping[str, pd.DataFrame], columns: Sequence[str] | None = None, digits: int = 3
                   ) -> pd.DataFrame:
    """One row per entry of ``tables``: for each column, the mean of the table's rows (objects, or seeds) with a
    Student-t 95 % interval over them, as ``"mean [low, high]"`` (:func:`adlib.eval.claims.mean_interval`).

    ``columns`` default to the first table's. Every table needs at least two rows.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    columns = list(next(iter(tables.values())).columns if columns is None else columns)
    return pd.DataFrame({name: {col: mean_interval(t[col], digits) for col in columns}
                         for name, t in tables.items()}).T


def interval_bounds(tables: Mapping[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The numbers behind :func:`interval_table`: (mean, low, high), three DataFrames with a row per entry of
    ``tables`` and a column per column of the tables (for error bars: ``mean - low`` below, ``high - mean`` above).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    parts = {name: {col: spread_interval(t[col]) for col in t.columns} for name, t in tables.items()}
    return tuple(pd.DataFrame({name: {col: cell[k] for col, cell in row.items()} for name, row in parts.items()}).T
                 for k in range(3))  # type: ignore[return-value]
