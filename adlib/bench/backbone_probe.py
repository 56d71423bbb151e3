"""A backbone's quality in one number: patch kNN on held-out texture defects (the pretraining recipes' selection
rule and chapter 4's probe)."""
from __future__ import annotations

from torch import nn

from adlib.data.heldout import ValidationCategory
from adlib.eval import protocol
from adlib.methods import knn


def patch_knn_scores(model: nn.Module, categories: dict[str, ValidationCategory], grid: int = 16,
                     with_aupro: bool = False) -> dict[str, dict[str, float]]:
    """The chapter-02 patch-kNN detector (:class:`adlib.methods.knn.PatchKNNDetector` on ``model``'s stages, a
    ``grid`` x ``grid`` patch grid) evaluated per category with :func:`adlib.eval.protocol.evaluate`.

    ``categories``: name -> (``train``, ``test``) :class:`adlib.data.imageset.ImageSet` s, normal training images
    (N, 3, S, S) and labelled test images (M, 3, S, S) with masks, as :func:`adlib.data.heldout.validation_set`
    returns. Returns name -> {"image_auroc", "pixel_auroc" (, "aupro")}.

    Defined in: "SimCLR: contrastive representations" (``notebooks/04_simclr.ipynb``).
    """
    out = {}
    for name, (train, test) in categories.items():
        det = knn.PatchKNNDetector(model, stride=test.size[-1] // grid)
        row, _ = protocol.evaluate(det, train, test)
        out[name] = {k: row[k] for k in ("image_auroc", "pixel_auroc", "aupro")[:3 if with_aupro else 2]}
    return out
