"""How much do a chapter's printed numbers move when only the execution changes (threads, joblib workers)?

Compares two executed copies of one notebook output by output: every decimal number in the text and HTML outputs,
in order, and reports the largest absolute difference and the outputs where numbers moved. Timings (numbers
followed by "s", "ms", "min" or "MiB") are skipped. It measured the tolerances of ``book/expected.json``:

    OMP_NUM_THREADS=1 papermill notebooks/07_cfa.ipynb a.ipynb; OMP_NUM_THREADS=2 papermill ... b.ipynb
    python tools/compare_executions.py a.ipynb b.ipynb
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?![\d.]*\s*(?:s\b|ms\b|min\b|MiB\b|GiB\b|%))")


def output_numbers(path: Path) -> list[tuple[int, list[float]]]:
    """(cell index, decimal numbers) of every code cell's text and HTML outputs, in order."""
    cells = json.loads(path.read_text())["cells"]
    found = []
    for i, cell in enumerate(cells):
        text = ""
        for out in cell.get("outputs", []):
            text += "".join(out.get("text", ""))
            data = out.get("data", {})
            text += "".join(data.get("text/html", data.get("text/plain", "")))
        found.append((i, [float(x) for x in NUMBER.findall(text)]))
    return found


def spread(a: Path, b: Path) -> tuple[float, list[str]]:
    """Largest absolute difference between the numbers of ``a`` and ``b``, and a line per cell that moved."""
    worst, lines = 0.0, []
    for (i, xs), (_, ys) in zip(output_numbers(a), output_numbers(b)):
        if len(xs) != len(ys):
            lines.append(f"cell {i}: {len(xs)} vs {len(ys)} numbers (the outputs differ in form)")
            continue
        moved = [abs(x - y) for x, y in zip(xs, ys) if x != y]
        if moved:
            worst = max(worst, max(moved))
            lines.append(f"cell {i}: {len(moved)} of {len(xs)} numbers moved, at most {max(moved):.4g}")
    return worst, lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    worst, lines = spread(Path(argv[0]), Path(argv[1]))
    print("\n".join(lines) or "every number repeats exactly")
    print(f"largest move: {worst:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
