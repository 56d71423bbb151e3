"""All methods, one benchmark: every detector of the book on the same MVTec-format folder, with one backbone, one
image size and the same seeds; quality with bootstrap intervals, cost, and a per-defect-type breakdown.

    records = benchmark.sweep(root, ["patchcore", "padim"])   # one record per (method, category, seed)
    table = benchmark.summary(records)                        # per method: means, 95 % intervals, cost

Intervals resample the test images of every category (normal and defective images separately, as
:func:`adlib.eval.claims.bootstrap_differences`), recompute each category's metric and average over categories. The
draws use the same resampled images for every method, so two methods' draws can be subtracted (paired). Pixel
metrics are recomputed per draw from per-image counts on a fixed grid of thresholds (:class:`PixelCounts`);
the point estimates are the exact metrics of :mod:`adlib.eval.metrics`. :func:`object_image_draws` resamples at two
levels (objects, then each one's images) for zero-shot detectors scored object by object (chapter 10).

Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from adlib.bench import runs
from adlib.bench.lineup import SWEEP
from adlib.core.runtime import in_fresh_processes
from adlib.data import mvtec
from adlib.data.imageset import ImageSet
from adlib.eval import claims, metrics, tables

QUALITY = ("image_auroc", "pixel_auroc", "aupro")
#: False-positive rates at which :class:`PixelCounts` puts its thresholds: dense below AUPRO's limit of 0.3.
FPR_GRID = np.unique(np.concatenate([np.linspace(0.0, 0.3, 151), np.linspace(0.3, 1.0, 71)]))


@dataclass
class PixelCounts:
    """Per-image pixel counts above a fixed grid of T thresholds, enough to recompute pixel AUROC and AUPRO for
    any reweighting of the test images (a bootstrap draw) without the maps.

    ``normal`` (N,) normal pixels per image; ``false_pos`` (N, T) of them at or above each threshold;
    ``anomalous`` (N,) and ``true_pos`` (N, T) the same for defect pixels; ``regions`` (N,) defect regions
    (8-connected) per image; ``overlap`` (N, T) the sum over an image's regions of the fraction of the region
    at or above each threshold. Thresholds are the normal-pixel quantiles at the rates of :data:`FPR_GRID`,
    plus one above every normal pixel.

    Used by: ``adlib.bench.benchmark.run_one``.
    """

    normal: np.ndarray
    false_pos: np.ndarray
    anomalous: np.ndarray
    true_pos: np.ndarray
    regions: np.ndarray
    overlap: np.ndarray

    @classmethod
    def from_maps(cls, masks: Any, maps: Any) -> "PixelCounts":
        """Count ``maps`` (N, H, W) against ``masks`` (N, H, W) in {0, 1}."""
        m = np.asarray(masks) > 0
        a = np.asarray(maps, dtype=np.float64)
        if m.shape != a.shape:
            raise ValueError(f"masks {m.shape} and maps {a.shape} must have the same shape (N, H, W).")
        normal_scores = a[~m]
        top = np.nextafter(normal_scores.max(), np.inf)
        thresholds = np.append(np.quantile(normal_scores, 1.0 - FPR_GRID[1:])[::-1], top)  # ascending
        level = np.searchsorted(thresholds, a, side="right")  # pixel >= thresholds[:level]
        n, t = len(a), len(thresholds)

        def at_or_above(weights: np.ndarray) -> np.ndarray:
            """(N, T): per image, the sum of ``weights`` over pixels at or above each threshold."""
            index = np.arange(n)[:, None, None] * (t + 1) + level
            hist = np.bincount(index.ravel(), weights.ravel(), minlength=n * (t + 1)).reshape(n, t + 1)
            return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]

        labels, n_regions = metrics.defect_regions(m)
        inverse_size = np.zeros(n_regions + 1)
        inverse_size[1:] = 1.0 / np.bincount(labels.ravel(), minlength=n_regions + 1)[1:]
        regions = np.array([len(np.unique(image[image > 0])) for image in labels], dtype=np.float64)
        return cls(normal=(~m).sum(axis=(1, 2)).astype(np.float64), false_pos=at_or_above((~m).astype(float)),
                   anomalous=m.sum(axis=(1, 2)).astype(np.float64), true_pos=at_or_above(m.astype(float)),
                   regions=regions, overlap=at_or_above(inverse_size[labels]))

    def curves(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ROC and PRO curves for image ``weights`` (B, N) (None: each image once): FPR, TPR and PRO, each
        (B, T + 2), ascending from 0 to 1."""
        w = np.ones((1, len(self.normal))) if weights is None else np.atleast_2d(weights).astype(np.float64)
        fpr = (w @ self.false_pos) / (w @ self.normal)[:, None]   # (B, T), decreasing along T
        tpr = (w @ self.true_pos) / (w @ self.anomalous)[:, None]
        pro = (w @ self.overlap) / (w @ self.regions)[:, None]
        zeros, ones = np.zeros((len(w), 1)), np.ones((len(w), 1))
        return tuple(np.hstack([zeros, c[:, ::-1], ones]) for c in (fpr, tpr, pro))  # type: ignore[return-value]

    def metrics(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Pixel AUROC and AUPRO (to FPR 0.3, normalised) for image ``weights`` (B, N) (None: each image once);
        returns arrays (B,)."""
        fpr, tpr, pro = self.curves(weights)
        return {"pixel_auroc": np.array([metrics.trapezoid_to(f, r, 1.0) for f, r in zip(fpr, tpr)]),
                "aupro": np.array([metrics.trapezoid_to(f, p, 0.3) / 0.3 for f, p in zip(fpr, pro)])}


def image_auroc_draws(labels: Any, scores: Any, weights: np.ndarray) -> np.ndarray:
    """Image AUROC (B,) for image ``weights`` (B, N): the weighted share of (defect, normal) pairs ranked right,
    ties counting one half (the Mann-Whitney form of the AUROC).

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    y, s = metrics.check_labels_scores(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (P, Q)
    wp, wn = weights[:, y == 1], weights[:, y == 0]
    return np.einsum("bp,pq,bq->b", wp, wins, wn) / (wp.sum(1) * wn.sum(1))


def resample_weights(labels: Any, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap draws of the test images as counts (n_boot, N): normal and defective images are drawn
    with replacement separately, so each draw keeps the class counts. The same seed gives the same draws.

    Used by: ``adlib.bench.benchmark.draws``.
    """
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, len(y)))
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        weights[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return weights


def object_image_draws(images: ImageSet, runs: Mapping[str, Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]]],
                       metric: str, n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap draws (n_boot,) of each row's mean over objects of ``metric`` (one of
    :data:`adlib.eval.tables.METRICS`), resampling at both levels: the objects with replacement, then, for every drawn
    copy of an object, its normal and its defective test images with replacement (class counts kept;
    :func:`resample_weights`).

    ``runs[row]``: one dict per training seed, ``{object: (image scores (M,), maps (M, H, W))}`` as
    :func:`adlib.eval.tables.per_object` keeps them for the M test images of the object in ``images`` (labels and
    masks); a row's value in a draw is the mean over its seeds. Every row sees the same draws, so the draws of
    ``a - b`` give a paired interval (:func:`adlib.eval.claims.percentile_interval`). A reweighting's metrics are the
    benchmark's: the Mann-Whitney image AUROC, and pixel counts above a grid of thresholds (:class:`PixelCounts`).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if metric not in tables.METRICS:
        raise ValueError(f"metric must be one of {tables.METRICS}, got {metric!r}.")
    names = np.asarray(images.objects)
    objects = list(dict.fromkeys(images.objects))
    rng = np.random.default_rng(seed)
    copies = rng.multinomial(len(objects), np.full(len(objects), 1.0 / len(objects)), size=n_boot)  # (B, O)
    totals = {row: np.zeros(n_boot) for row in runs}
    for k, name in enumerate(objects):
        idx = np.flatnonzero(names == name)
        labels, masks = images.labels[idx], images.masks[idx]
        n_copies = int(copies[:, k].max())
        if n_copies == 0:
            continue
        # one independent draw of the images per copy: (copies, B, M) counts
        weights = np.stack([resample_weights(labels, n_boot, int(rng.integers(2**31))) for _ in range(n_copies)])
        used = np.arange(n_copies)[:, None] < copies[None, :, k]  # (copies, B): the copies each draw holds
        for row, seeds in runs.items():
            values = []
            for kept in seeds:
                scores, maps = kept[name]
                if metric == "image_auroc":
                    values.append(np.stack([image_auroc_draws(labels, scores, w) for w in weights]))
                    continue
                counts = PixelCounts.from_maps(masks, maps)
                if metric == "pixel_auroc":  # the whole ROC curve: one vectorised trapezoid per copy
                    curves = [counts.curves(w) for w in weights]
                    values.append(np.stack([np.trapezoid(tpr, fpr, axis=1) for fpr, tpr, _ in curves]))
                else:
                    values.append(np.stack([counts.metrics(w)[metric] for w in weights]))
            totals[row] += (np.mean(values, axis=0) * used).sum(axis=0)  # over the copies in each draw
    return {row: total / len(objects) for row, total in totals.items()}


def run_one(name: str, root: str | Path, category: str, *, seed: int = 0, image_size: int = 128,
            backbone: str = "effnet-lite0", device: str = "cpu", keep: Sequence[int] = (),
            options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit bench method ``name`` on one category's normal training images, score its test split and measure it.
    ``options`` replace the method's settings of :data:`SWEEP` (e.g. fewer epochs in the smoke profile).

    Returns a record: ``row`` (exact metrics, ``fit_s``, ``predict_s``, ``peak_mb``, ``added_mb`` = peak minus the
    process's memory before the fit), ``labels``, ``scores`` and ``defects`` of the test images, ``counts``
    (:class:`PixelCounts`, None without masks), ``by_defect`` (image AUROC and AUPRO of each defect type against
    the normal test images), ``maps`` of the test images at the indices ``keep``, ``n_train`` (training images)
    and ``history`` (the per-epoch training history of a method that trains a network, as
    :func:`adlib.training.loop.fit` returns it; empty for the training-free ones), for its training record.

    Used by: ``adlib.bench.benchmark.sweep``.
    """
    method, defaults = SWEEP[name]
    run = runs.run_category(method, root, category, image_size=image_size, backbone=backbone, device=device,
                            seed=seed, options=defaults | (options or {}))
    labels, scores, maps = run.test.labels, run.scores.image, run.scores.maps
    masks, defects = run.test.masks, list(run.test.defects)
    by_defect = {}
    for kind in sorted(set(defects) - {"good"}):
        idx = np.array([d in ("good", kind) for d in defects])
        by_defect[kind] = {"image_auroc": metrics.image_auroc(labels[idx], scores[idx]),
                           "aupro": None if masks is None else metrics.aupro(masks[idx], maps[idx])}
    return {"name": name, "category": category, "seed": seed, "row": run.row, "labels": labels, "scores": scores,
            "defects": defects, "counts": None if masks is None else PixelCounts.from_maps(masks, maps),
            "by_defect": by_defect, "maps": maps[list(keep)].astype(np.float32), "n_train": run.n_train,
            "history": list(getattr(run.detector, "history", None) or [])}


def sweep(root: str | Path, names: Sequence[str] = tuple(SWEEP), categories: Sequence[str] | None = None, *,
          seeds: Sequence[int] = (0,), image_size: int = 128, backbone: str = "effnet-lite0", device: str = "cpu",
          n_jobs: int = 1, keep: Sequence[int] = (), options: dict[str, dict[str, Any]] | None = None,
          progress: bool = False) -> list[dict[str, Any]]:
    """:func:`run_one` for every bench method x category x seed, each in a new process (so ``added_mb`` is the run's
    own memory, not what an earlier run left behind), ``n_jobs`` side by side on one thread each (so timings stay
    comparable); ``options``: {bench name: options for :func:`run_one`};
    ``progress``: one line on stderr per finished run (done / total, elapsed, estimated remaining).
    Returns the records in that order.

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    unknown = [n for n in names if n not in SWEEP]
    if unknown:
        raise ValueError(f"Unknown bench method {unknown[0]!r}; choose from {sorted(SWEEP)}.")
    cats = mvtec.select_categories(root, categories)
    jobs = [(n, c, s) for n in names for c in cats for s in seeds]
    results = in_fresh_processes(run_one, [
        {"name": n, "root": root, "category": c, "seed": s, "image_size": image_size, "backbone": backbone,
         "device": device, "keep": keep, "options": (options or {}).get(n)} for n, c, s in jobs], n_jobs=n_jobs)
    records, t0 = [], time.perf_counter()
    for done, record in enumerate(results, 1):
        records.append(record)
        if progress:
            elapsed = time.perf_counter() - t0
            print(f"[{done}/{len(jobs)}] {record['name']} on {record['category']} (seed {record['seed']}): "
                  f"{elapsed:.0f} s elapsed, about {elapsed / done * (len(jobs) - done):.0f} s to go",
                  file=sys.stderr, flush=True)
    return records


def draws(records: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap draws (n_boot,) of each method's mean over categories (and seeds), per quality metric:
    ``{name: {metric: draws}}``. Every method sees the same resampled test images, so draws are paired.

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    weights: dict[str, np.ndarray] = {}
    per: dict[str, dict[str, list[np.ndarray]]] = {}
    for rec in records:
        cat = rec["category"]
        if cat not in weights:
            weights[cat] = resample_weights(rec["labels"], n_boot, seed + len(weights))
        w = weights[cat]
        out = {"image_auroc": image_auroc_draws(rec["labels"], rec["scores"], w)}
        if rec["counts"] is not None:
            out |= rec["counts"].metrics(w)
        for metric, values in out.items():
            per.setdefault(rec["name"], {}).setdefault(metric, []).append(values)
    return {name: {m: np.mean(v, axis=0) for m, v in by_metric.items()} for name, by_metric in per.items()}


def summary(records: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per method: each quality metric's mean over categories and seeds with its 95 % bootstrap interval
    (``<metric>_low`` / ``_high``), mean fit and predict seconds per category, predict milliseconds per test
    image, and the largest memory added by a run (MB).

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    boot = draws(records, n_boot, seed)
    rows = {}
    for name in dict.fromkeys(r["name"] for r in records):
        recs = [r for r in records if r["name"] == name]
        row: dict[str, float] = {}
        for metric in QUALITY:
            values = [r["row"][metric] for r in recs]
            if any(v is None for v in values):
                row |= {metric: np.nan, f"{metric}_low": np.nan, f"{metric}_high": np.nan}
                continue
            low, high = claims.percentile_interval(boot[name][metric])
            row |= {metric: float(np.mean(values)), f"{metric}_low": low, f"{metric}_high": high}
        row["fit_s"] = float(np.mean([r["row"]["fit_s"] for r in recs]))
        row["predict_s"] = float(np.mean([r["row"]["predict_s"] for r in recs]))
        row["predict_ms"] = float(np.mean([1e3 * r["row"]["predict_s"] / len(r["labels"]) for r in recs]))
        row["added_mb"] = float(max(r["row"]["added_mb"] for r in recs))
        rows[name] = row
    return pd.DataFrame(rows).T


def by_defect(records: Sequence[dict[str, Any]], metric: str = "aupro") -> pd.DataFrame:
    """Methods x defect types: ``metric`` of each defect type against the normal test images, mean over categories.

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    rows: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        for kind, values in rec["by_defect"].items():
            rows.setdefault(rec["name"], {}).setdefault(kind, []).append(values[metric])
    return pd.DataFrame({n: {k: (np.nan if None in v else float(np.mean(v))) for k, v in kinds.items()}
                         for n, kinds in rows.items()}).T


def markdown(table: pd.DataFrame) -> str:
    """The :func:`summary` table as markdown: each metric as ``mean [low, high]``, then the cost columns.

    Used by: ``adlib.bench.benchmark.write``.
    """
    head = "| method | " + " | ".join(QUALITY) + " | fit s / category | predict ms / image | added MB |"
    lines = [head, "|" + "---|" * (len(QUALITY) + 4)]
    for name, row in table.iterrows():
        cells = ["-" if np.isnan(row[m]) else f"{row[m]:.3f} [{row[m + '_low']:.3f}, {row[m + '_high']:.3f}]"
                 for m in QUALITY]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {row['fit_s']:.1f} | {row['predict_ms']:.1f} | {row['added_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def check_new_folder(out: str | Path) -> Path:
    """``out`` as a Path if it is missing or empty; a FileExistsError if writing there would overwrite anything.

    Used by: ``adlib.bench.benchmark.write``, ``python -m adlib bench``.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose another --out or delete it first.")
    return out


def write(records: Sequence[dict[str, Any]], out: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``bench.json`` (settings, the summary and every per-category row), ``bench.md`` (the table) and
    ``bench.png`` (:func:`adlib.viz.quality_vs_cost`) into the new folder ``out``; refuses an existing one.

    Used by: ``python -m adlib bench``.
    """
    import matplotlib.pyplot as plt

    from adlib import viz

    out = check_new_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    table = summary(records)
    rows = [{"method": r["name"], "category": r["category"], "seed": r["seed"], **r["row"],
             "by_defect": r["by_defect"]} for r in records]
    doc = {"settings": meta, "summary": json.loads(table.to_json(orient="index")), "runs": rows}
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "figure": out / "bench.png"}
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["markdown"].write_text(markdown(table))
    ax = viz.quality_vs_cost(table)
    ax.figure.savefig(paths["figure"], dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    return paths
