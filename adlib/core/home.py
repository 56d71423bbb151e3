"""Where the book keeps generated and downloaded data: one small module every other one may import.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def data_home() -> Path:
    """``$ADLIB_DATA``, else ``~/.cache/adlib``: where generated and downloaded data sets live.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    return Path(os.environ.get("ADLIB_DATA") or Path.home() / ".cache" / "adlib").expanduser()


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if absent) for the ``with`` block, so that processes that
    write the same files (pytest workers, parallel trainings) take turns. Without POSIX locks (Windows) it does nothing.

    Used by: ``adlib.data.synthtex.generate``, ``adlib.recipes.checkpoints.ship``.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
