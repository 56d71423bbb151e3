"""Ablations: several variants of a method ("arms": a part removed, swapped or added), each run with one or more
seeds on the same labelled test set, and their metrics summarised arm by arm.

    study = ablation.Ablation(test)
    for seed in (0, 1, 2):
        study.add("full method", *protocol.evaluate(make(seed), train, test))  # a detector: fit and score
        study.add("without part X", None, scores_without_x)                    # Scores computed another way
    study.means(["image_auroc", "pixel_auroc", "aupro"])                     # {arm: {metric: mean over seeds}}
    study.seconds()                                                          # {arm: fit + predict seconds}

Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from adlib.data.imageset import ImageSet
from adlib.eval import metrics
from adlib.eval.scores import Scores


class Ablation:
    """The runs of every arm of an ablation on one labelled :class:`ImageSet` ``test``, in the order added.

    :meth:`add` records one run (one seed) of an arm; ``rows[arm]`` holds the row of numbers of each run,
    ``scores[arm]`` the :class:`Scores` of the arm's first run only (for figures: keeping every seed's maps of
    every arm would hold N x H x W floats per run). :meth:`means` averages the rows over the runs.

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """

    def __init__(self, test: ImageSet):
        if test.labels is None:
            raise ValueError("an ablation needs a labelled test set (test.labels is None).")
        self.test = test
        self.rows: dict[str, list[dict[str, float | None]]] = {}
        self.scores: dict[str, Scores] = {}

    def add(self, arm: str, row: Mapping[str, float | None] | None, scores: Scores) -> dict[str, float | None]:
        """Record one run of ``arm`` (its ``row`` of numbers and its :class:`Scores` on ``test``); return the row kept.

        ``row``: the row of :func:`adlib.eval.protocol.evaluate` (``study.add(arm, *protocol.evaluate(...))``), or,
        for an arm scored outside the protocol, None or just its timings (``fit_s``, ``predict_s``): a row without
        ``image_auroc`` gets the metrics of :func:`adlib.eval.metrics.evaluate` on ``scores`` (pixel metrics when
        ``test.masks`` is not None). The row kept is a copy: the ``row`` given is not changed.
        """
        if len(scores) != len(self.test):
            raise ValueError(f"{arm!r}: {len(scores)} scores for a test set of {len(self.test)} images.")
        kept = dict(row or {})
        if "image_auroc" not in kept:
            pixels = (self.test.masks, scores.maps) if self.test.masks is not None and scores.maps is not None else ()
            kept = metrics.evaluate(self.test.labels, scores.image, *pixels) | kept
        self.rows.setdefault(arm, []).append(kept)
        self.scores.setdefault(arm, scores)
        return kept

    def means(self, columns: Sequence[str]) -> dict[str, dict[str, float]]:
        """{arm: {column: mean of the column over the arm's runs}}; NaN where a run lacks the number (e.g. a pixel
        metric without masks)."""
        return {arm: {col: float(np.mean([np.nan if r.get(col) is None else r[col] for r in rows]))
                      for col in columns}
                for arm, rows in self.rows.items()}

    def seconds(self) -> dict[str, float]:
        """{arm: mean over its runs of ``fit_s + predict_s``} (wall seconds), for the arms whose rows have both."""
        return {arm: float(np.mean([r["fit_s"] + r["predict_s"] for r in rows]))
                for arm, rows in self.rows.items() if all("fit_s" in r and "predict_s" in r for r in rows)}
