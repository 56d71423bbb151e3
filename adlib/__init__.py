"""adlib: the helper package of the book *Anomaly Detection, Reproduced*.

Chapters import the submodules they need, e.g. ``from adlib import data, metrics, viz``.
Each public function's docstring ends with one footer: ``Defined in:`` the chapter whose code uses it, or, when
no chapter calls it, ``Used by:`` what does (tests/test_structure.py checks both). The names below are loaded on
first use, so ``from adlib import metrics`` does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)

# name -> the module that defines it
_EXPORTS = {
    "PROFILES": "adlib.core.profiles",
    "check_profile": "adlib.core.profiles",
    "by_profile": "adlib.core.profiles",
    "seed_everything": "adlib.core.runtime",
    "choose_device": "adlib.core.runtime",
    "show_versions": "adlib.core.versions",
    "versions": "adlib.core.versions",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adlib' has no attribute {name!r}")
