"""adlib: the helper package of the book *Anomaly Detection, Reproduced*.

Chapters import the submodules they need, e.g. ``from adlib import data, metrics, viz``.
Each public function's docstring names the chapter that introduces it. The names below are loaded on first
use, so ``from adlib import metrics`` does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)

# name -> the module that defines it
_EXPORTS = {
    "PROFILES": "adlib.profiles",
    "check_profile": "adlib.profiles",
    "by_profile": "adlib.profiles",
    "seed_everything": "adlib.train",
    "choose_device": "adlib.train",
    "show_versions": "adlib.versions",
    "versions": "adlib.versions",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adlib' has no attribute {name!r}")
