"""The detectors by name (``python -m adlib run METHOD``): make one, load a saved one."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch

from adlib.methods.base import FORMAT, FeatureDetector

# method name -> "module:Class"; the classes live in one module per method (imported when first used).
METHODS = {
    "patchknn": "adlib.methods.knn:PatchKNNDetector",
    "spade": "adlib.methods.knn:SPADEDetector",
    "patchcore": "adlib.methods.patchcore:PatchCore",
    "padim": "adlib.methods.padim:PaDiM",
    "cfa": "adlib.methods.cfa:CFADetector",
    "students": "adlib.methods.students.ensemble:StudentsDetector",
    "ae": "adlib.methods.autoencoder:AutoencoderDetector",
    "winclip": "adlib.methods.winclip:WinCLIPDetector",
}


def detector_class(method: str) -> type[FeatureDetector]:
    """The class of a method name of :data:`METHODS` (e.g. ``"patchcore"``).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {sorted(METHODS)}.")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def make_detector(method: str, **options: Any) -> FeatureDetector:
    """A new detector of ``method`` with ``options`` (its ``__init__`` arguments; a misspelt one is an error).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    return detector_class(method)(**options)


def run_options(method: str, category: str, backbone: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``method`` runs with on ``category``: ``backbone`` if the method takes one, ``object_name`` =
    the category if it names the object it inspects (the zero-shot CLIP detector), then ``options`` (which win).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    params = inspect.signature(detector_class(method)).parameters
    return (({"backbone": backbone} if "backbone" in params else {})
            | ({"object_name": category} if "object_name" in params else {}) | options)


def load_detector(path: str | Path, device: str = "cpu") -> tuple[FeatureDetector, dict]:
    """A detector saved by :meth:`FeatureDetector.save`, on ``device``, and the ``meta`` saved with it.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved detector at {path}; make one with: python -m adlib run METHOD --data "
                                f"ROOT --category C --save-model {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a detector saved by adlib ({FORMAT}).")
    det = make_detector(blob["method"], **blob["config"], device=device)
    det.image_shape = tuple(blob["image_shape"])
    det.load_state(blob["state"])
    return det, blob["meta"]
