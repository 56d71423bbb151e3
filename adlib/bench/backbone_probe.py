"""A backbone's quality in one number: patch kNN on held-out texture defects (the pretraining recipes' selection
rule and chapter 4's probe)."""
from __future__ import annotations

import numpy as np
from torch import nn

from adlib.eval import protocol
from adlib.methods import knn


def patch_knn_scores(model: nn.Module, categories: dict[str, dict[str, np.ndarray]], grid: int = 16,
                     with_aupro: bool = False) -> dict[str, dict[str, float]]:
    """The chapter-02 patch-kNN detector (:class:`adlib.methods.knn.PatchKNNDetector` on ``model``'s stages, a
    ``grid`` x ``grid`` patch grid) evaluated per category with :func:`adlib.eval.protocol.evaluate`.

    ``categories``: name -> ``train`` (N, 3, S, S) float in [0, 1], ``test`` (M, 3, S, S), ``labels`` (M,) 0/1,
    ``masks`` (M, S, S), as :func:`validation_set` returns. Returns name -> {"image_auroc", "pixel_auroc"
    (, "aupro")}.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    out = {}
    for name, c in categories.items():
        det = knn.PatchKNNDetector(model, stride=c["test"].shape[-1] // grid)
        row, _, _ = protocol.evaluate(det, c["train"], c["test"], c["labels"], c["masks"])
        out[name] = {k: row[k] for k in ("image_auroc", "pixel_auroc", "aupro")[:3 if with_aupro else 2]}
    return out
