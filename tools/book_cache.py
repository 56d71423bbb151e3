"""Keep the book's execution cache honest: clear it when what the chapters import changes.

jupyter-cache keys an executed notebook on the notebook's source alone, so after a change to ``adlib``, to a
shipped weight or to the lock, ``make book`` would serve the old outputs. ``make book`` runs this first: it hashes
``adlib/`` (code and weights), ``pyproject.toml`` and ``constraints.txt`` and clears ``_build/.jupyter_cache`` when
the hash differs from the one the cache was filled with.

    python tools/book_cache.py [--cache DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"
STAMP = "adlib-inputs.sha256"


def inputs_digest(root: Path = ROOT) -> str:
    """sha256 over the relative path and bytes of every file the chapters' outputs depend on besides themselves."""
    files = [p for p in sorted((root / "adlib").rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    files += [root / "pyproject.toml", root / "constraints.txt"]
    h = hashlib.sha256()
    for p in files:
        if p.exists():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def refresh(cache: Path = CACHE, root: Path = ROOT) -> bool:
    """Clear ``cache`` unless it was filled with the current inputs; returns True when it was cleared."""
    digest = inputs_digest(root)
    stamp = cache / STAMP
    if stamp.exists() and stamp.read_text().strip() == digest:
        return False
    cleared = cache.exists()
    if cleared:
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    stamp.write_text(digest + "\n")
    return cleared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    if refresh(args.cache):
        print(f"adlib, its weights or the lock changed: cleared {args.cache}; every chapter executes again.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
