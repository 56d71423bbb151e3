"""adlib: the helper package of the book *Anomaly Detection, Reproduced*.

Chapters import the submodules they need, e.g. ``from adlib import data, metrics, viz``.
Each public function's docstring names the chapter that introduces it.
"""
from __future__ import annotations

from adlib.profiles import PROFILES, check_profile, by_profile
from adlib.train import seed_everything, choose_device
from adlib.versions import show_versions, versions

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)

__all__ = [
    "PROFILES",
    "check_profile",
    "by_profile",
    "seed_everything",
    "choose_device",
    "show_versions",
    "versions",
    "__version__",
]
