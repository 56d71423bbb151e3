"""Write exercise-only copies of the chapters: every ```{solution} block removed, outputs cleared.

    python tools/exercise_copies.py [--out book/exercises]

``make book`` runs it before building, and the teacher's page (``book/teaching.md``) links the copies and a zip
of all of them. The chapters mark their solutions as MyST ``{solution}`` blocks inside markdown cells; the
exercises (``{exercise}`` blocks) and every other cell stay as they are.
"""
from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
OPENING = re.compile(r"^(`{3,}|:{3,})\{solution\}")
NOTE = ("**Exercise copy.** The solutions are removed; the full chapter, with solutions and outputs, is in the "
        "online book.")


def strip_solutions(text: str) -> str:
    """``text`` without its ```{solution} ...``` blocks (fences nested inside a solution are skipped with it)."""
    kept, fence, depth = [], "", 0
    for line in text.splitlines(keepends=True):
        bare = line.strip()
        if not depth:
            opening = OPENING.match(bare)
            if opening:
                fence, depth = opening.group(1)[0], 1
            else:
                kept.append(line)
            continue
        if re.fullmatch(rf"{re.escape(fence)}{{3,}}", bare):
            depth -= 1
        elif re.match(rf"{re.escape(fence)}{{3,}}\S", bare):
            depth += 1
    if depth:
        raise ValueError("a {solution} block is not closed")
    return re.sub(r"\n{3,}", "\n\n", "".join(kept)).strip("\n") + "\n"


def exercise_copy(path: Path) -> nbformat.NotebookNode:
    """The notebook at ``path`` with its solutions removed and its outputs cleared, a note on top."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "{solution}" in cell.source:
            cell.source = strip_solutions(cell.source)
        elif cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(NOTE))
    nb.cells[0].id = "exercise-copy-note"
    return nb


def write_copies(notebooks: list[Path], out: Path) -> list[Path]:
    """One exercise copy per notebook in ``out`` (the same file name), plus ``out/exercises.zip`` of all."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        target = out / path.name
        nbformat.write(exercise_copy(path), target)
        written.append(target)
    with zipfile.ZipFile(out / "exercises.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for target in written:
            zf.write(target, f"exercises/{target.name}")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "book" / "exercises")
    args = parser.parse_args()
    written = write_copies(sorted((ROOT / "notebooks").glob("*.ipynb")), args.out)
    print(f"{len(written)} exercise copies and exercises.zip in {args.out}")


if __name__ == "__main__":
    main()
