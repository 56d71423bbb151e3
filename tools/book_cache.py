"""Keep the book's execution cache honest: clear it when what the chapters import changes.

jupyter-cache keys an executed notebook on the notebook's source alone, and Sphinx re-reads only pages whose
source changed, so after a change to ``adlib``, to a shipped weight or to the lock ``make book`` would serve the old
outputs. ``make book`` runs this first: it hashes ``adlib/`` (code and weights), ``pyproject.toml`` and
``constraints.txt`` and, when the hash differs from the one the build was made with, clears the execution cache
(``_build/.jupyter_cache``), Sphinx's environment (``_build/.doctrees``) and the executed copies
(``_build/jupyter_execute``), so every chapter executes again.

    python tools/book_cache.py [--build DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
CLEARED = (".jupyter_cache", ".doctrees", "jupyter_execute")  # what holds a chapter's outputs between builds
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


def refresh(build: Path = BUILD, root: Path = ROOT) -> bool:
    """Clear the book's outputs in ``build`` unless it was made with the current inputs; True when it cleared."""
    digest = inputs_digest(root)
    stamp = build / STAMP
    if stamp.exists() and stamp.read_text().strip() == digest:
        return False
    cleared = [build / name for name in CLEARED if (build / name).exists()]
    for path in cleared:
        shutil.rmtree(path)
    build.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")
    return bool(cleared)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=BUILD)
    args = parser.parse_args(argv)
    if refresh(args.build):
        print(f"adlib, its weights or the lock changed: cleared the executed chapters in {args.build}; every chapter "
              "executes again.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
