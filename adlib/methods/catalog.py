"""The detectors by name (``python -m adlib run METHOD``): make one, load a saved one.

Light on purpose: :data:`METHODS` is read by ``python -m adlib list`` and ``--help``, which must answer without
torch; the detector modules (and torch) are imported when a detector is first made or loaded.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adlib.methods.base import Detector

# method name -> ("module:Class", its one line for ``python -m adlib list``); the classes live in one module per
# method (imported when first used).
METHODS = {
    "patchknn": ("adlib.methods.knn:PatchKNNDetector",
                 "nearest training patch of every training image (full bank); image score = max of the map"),
    "spade": ("adlib.methods.spade:SPADEDetector",
              "SPADE (Cohen & Hoshen 2020): k nearest images by global feature, then their patches"),
    "patchcore": ("adlib.methods.patchcore:PatchCore",
                  "PatchCore (Roth et al. 2022): locally aware patches, greedy coreset, reweighted NN score"),
    "padim": ("adlib.methods.padim:PaDiM",
              "PaDiM (Defard et al. 2021): a Gaussian per patch position, Mahalanobis distance"),
    "cfa": ("adlib.recipes.cfa_synthtex:ShippedCFADetector",
            "CFA (Lee et al. 2022): patch descriptor + memory bank trained with hypersphere losses, until a "
            "held-out loss is flat (minutes; chapter 7's shipped descriptor on its SynthTex images; --set "
            "epochs=3: the official 30 passes)"),
    "students": ("adlib.methods.students.ensemble:StudentsDetector",
                 "Uninformed Students (Bergmann et al. 2020): students regress a distilled teacher; error + variance"),
    "ae": ("adlib.methods.autoencoder:AutoencoderDetector",
           "autoencoder / VAE (kind=vae) trained on the normal images; residual map, mean residual score"),
    "winclip": ("adlib.methods.winclip:WinCLIPDetector",
                "WinCLIP-style zero-shot (Jeong et al. 2023): prompt-ensemble anchors vs CLIP tokens; no training"),
    "aaclip": ("adlib.recipes.aaclip_caption:AACLIPDetector",
               "AA-CLIP (Ma et al. 2025), zero-shot: chapter 10's shipped adapters over the tiny CLIP; no training"),
    "clipn": ("adlib.recipes.clipn_caption:CLIPNDetector",
              "CLIPN (Wang et al. 2023), zero-shot: chapter 9's shipped 'no' encoder asks 'not a photo of the "
              "object?'; no training"),
}


def detector_class(method: str) -> type[Detector]:
    """The class of a method name of :data:`METHODS` (e.g. ``"patchcore"``).

    Defined in: "All methods, one benchmark" (``notebooks/11_benchmark.ipynb``).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {sorted(METHODS)}.")
    module, name = METHODS[method][0].split(":")
    return getattr(importlib.import_module(module), name)


def make_detector(method: str, **options: Any) -> Detector:
    """A new detector of ``method`` with ``options`` (its ``__init__`` arguments; a misspelt one is an error).

    Defined in: "CFA: coupled-hypersphere feature adaptation" (``notebooks/07_cfa.ipynb``).
    """
    return detector_class(method)(**options)


def run_options(method: str, category: str, backbone: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``method`` runs with on ``category``: ``backbone`` if the method takes one, ``object_name`` =
    the category if it names the object it inspects (the zero-shot CLIP detector), then ``options`` (which win).

    Used by: ``adlib.bench.runs.run_category``.
    """
    params = inspect.signature(detector_class(method)).parameters
    return (({"backbone": backbone} if "backbone" in params else {})
            | ({"object_name": category} if "object_name" in params else {}) | options)


def load_detector(path: str | Path, device: str = "cpu") -> tuple[Detector, dict]:
    """A detector saved by :meth:`adlib.methods.base.Detector.save`, on ``device``, and the ``meta`` saved with it.

    The file's format version must be the one this version of adlib writes; an older or newer file is refused with
    the command that makes a new one.

    Used by: ``adlib.bench.deploy``.
    """
    import torch

    from adlib.methods.base import FORMAT, FORMAT_VERSION

    path = Path(path)
    remake = f"python -m adlib run METHOD --data ROOT --category C --save-model {path}"
    if not path.is_file():
        raise FileNotFoundError(f"No saved detector at {path}; make one with: {remake}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own message suggests weights_only=False, unsafe for a file of unknown origin
        raise ValueError(f"{path} is not a detector saved by adlib: torch cannot read it as a saved model "
                         f"({type(err).__name__}). Make one with: {remake}") from err
    if not isinstance(blob, dict) or not str(blob.get("format", "")).startswith(FORMAT):
        raise ValueError(f"{path} is not a detector saved by adlib ({FORMAT}).")
    version = blob.get("version", 1)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} is a detector of file format {version}; this adlib reads format {FORMAT_VERSION}. "
                         f"Fit it again with this version: {remake}")
    det = make_detector(blob["method"], **blob["hparams"], device=device)
    det.image_shape = tuple(blob["image_shape"])
    det.load_state(blob["state"])
    return det, blob["meta"]
