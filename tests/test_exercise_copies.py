"""tools/exercise_copies.py: the exercise-only notebooks keep every exercise and lose every solution."""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import nbformat
import pytest

from notebook_contract import ROOT, toc_notebooks

spec = importlib.util.spec_from_file_location("exercise_copies", ROOT / "tools" / "exercise_copies.py")
exercise_copies = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exercise_copies)


def test_strip_solutions_hand_case() -> None:
    text = ("## Exercises\n\n```{exercise} One\n:label: ex-1\nDo it.\n```\n\n"
            "```{solution} ex-1\n:class: dropdown\nLike this:\n```python\nx = 1\n```\nDone.\n```\n\n"
            "```{exercise} Two\n:label: ex-2\nAgain.\n```\n")
    assert exercise_copies.strip_solutions(text) == (
        "## Exercises\n\n```{exercise} One\n:label: ex-1\nDo it.\n```\n\n"
        "```{exercise} Two\n:label: ex-2\nAgain.\n```\n")
    with pytest.raises(ValueError, match="not closed"):
        exercise_copies.strip_solutions("```{solution} ex-1\nunfinished\n")


def test_every_chapter_copy_keeps_its_exercises_and_drops_its_solutions(tmp_path: Path) -> None:
    chapters = [p for p in toc_notebooks() if p.parent.name == "notebooks"]
    written = exercise_copies.write_copies(chapters, tmp_path)
    assert [p.name for p in written] == [p.name for p in chapters]
    for original, copy in zip(chapters, written):
        text = lambda nb: "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")  # noqa: E731
        before, after = nbformat.read(original, 4), nbformat.read(copy, 4)
        nbformat.validate(after)
        assert text(before).count("{solution}") >= 1, f"{original.name} marks no solution"
        assert "{solution}" not in text(after)
        assert text(after).count("{exercise}") == text(before).count("{exercise}")
        assert sum(c.cell_type == "code" for c in after.cells) == sum(c.cell_type == "code" for c in before.cells)
    with zipfile.ZipFile(tmp_path / "exercises.zip") as zf:
        assert sorted(zf.namelist()) == sorted(f"exercises/{p.name}" for p in chapters)
