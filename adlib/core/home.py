"""Where the book keeps generated and downloaded data: one small module every other one may import.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """``$ADLIB_DATA``, else ``~/.cache/adlib``: where generated and downloaded data sets live.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    return Path(os.environ.get("ADLIB_DATA") or Path.home() / ".cache" / "adlib").expanduser()
