"""sha256 of files, read in chunks."""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # 1 MiB: large enough for speed, small enough for a smooth progress bar


def sha256sum(path: str | Path, chunk_size: int = CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB archives need no memory.

    Used by: ``adlib.data.download.fetch``, ``adlib.features.clip.load_tiny_clip``, ``adlib.features.clip.save_clip``.
    """
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
