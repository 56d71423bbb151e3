"""The guard on the book's numbers: compare executed chapters with ``book/expected.json``.

Every chapter glues its claims (difference, interval, verdict, causes), its headline numbers and the environment
that made them (``adlib.eval.scorecard.gather``, under ``claims_record``). This tool reads them from the executed
notebooks and fails, naming chapter, entry, old and new value, when a verdict changes or a number moves beyond
its tolerance:

- same environment (CPU model, package versions, threads) as recorded: numbers must repeat bit for bit
  (``tolerance.same_environment``);
- another environment: verdicts must still repeat exactly, numbers within ``tolerance.elsewhere`` (measured: see
  the README, "What repeats").

    python tools/check_expected.py [--expected FILE] [--executed DIR]        # check (make book; make test: smoke)
    python tools/check_expected.py --write --reason "why" [...]              # rewrite (make expected)
    python tools/check_expected.py --tally DIR [--expected FILE]             # the scorecard's tally (md + png)
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from adlib.eval.claims import VERDICTS

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "book" / "expected.json"
EXECUTED = ROOT / "_build" / "jupyter_execute" / "notebooks"
KEY = "claims_record"
ENVIRONMENT_KEYS = ("cpu", "packages", "omp_num_threads", "threads")
# Bit for bit on the recorded environment; elsewhere ten times the largest move measured when only the execution
# changed (2 threads instead of 1 moved chapter 7's numbers by 0.001; README, "What repeats").
TOLERANCE = {"same_environment": 0.0, "elsewhere": 0.01}


def read_record(notebook: Path) -> dict[str, Any] | None:
    """The record a chapter glued under ``claims_record`` (None when it glued none).

    papermill keeps glued outputs in the notebook; the book build moves them to ``<stem>.glue.json`` beside it.
    """
    outputs = [o for c in json.loads(notebook.read_text())["cells"] for o in c.get("outputs", [])]
    sidecar = notebook.with_suffix(".glue.json")
    if sidecar.exists():
        outputs += list(json.loads(sidecar.read_text()).values())
    for out in outputs:
        if out.get("metadata", {}).get("scrapbook", {}).get("name") == KEY:
            text = next(v for k, v in out["data"].items() if k.endswith("text/plain"))
            return json.loads(ast.literal_eval("".join(text)))
    return None


def read_records(executed: Path) -> dict[str, dict[str, Any]]:
    """Chapter (notebook stem) -> record, for every executed notebook in ``executed`` that glued one."""
    if not executed.is_dir():
        raise SystemExit(f"No executed notebooks in {executed}: build the book first (make book).")
    records = {p.stem: read_record(p) for p in sorted(executed.glob("*.ipynb"))}
    return {k: v for k, v in records.items() if v is not None}


def same_environment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ENVIRONMENT_KEYS)


def compare_chapter(chapter: str, old: dict[str, Any], new: dict[str, Any] | None,
                    tolerance: dict[str, float]) -> list[str]:
    """Every difference that fails the guard between a recorded chapter ``old`` and a build's ``new``."""
    if new is None:
        return [f"{chapter}: recorded, but the build has no executed chapter with a claims record"]
    same = same_environment(old["environment"], new["environment"])
    tol = tolerance["same_environment"] if same else tolerance["elsewhere"]
    where = "" if same else " (another environment: cross-machine tolerance)"
    problems = []

    def moved(entry: str, a: float | None, b: float | None) -> None:
        if a is None or b is None:
            if a != b:
                problems.append(f"{chapter}: {entry}: {a} -> {b}")
        elif abs(a - b) > tol:
            problems.append(f"{chapter}: {entry}: {a:.6g} -> {b:.6g} (moved {b - a:+.3g}, tolerance {tol:g}{where})")

    for statement in sorted(set(old["claims"]) | set(new["claims"])):
        a, b = old["claims"].get(statement), new["claims"].get(statement)
        if a is None or b is None:
            problems.append(f"{chapter}: claim {statement!r} is {'new' if a is None else 'gone'}")
            continue
        if a["verdict"] != b["verdict"]:
            problems.append(f"{chapter}: claim {statement!r}: verdict {a['verdict']} -> {b['verdict']}")
        for field in ("ours", "low", "high"):
            moved(f"claim {statement!r}: {field}", a[field], b[field])
    for name in sorted(set(old["numbers"]) | set(new["numbers"])):
        moved(f"number {name!r}", old["numbers"].get(name), new["numbers"].get(name))
    return problems


def compare(expected: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
    """Every failure of the build ``records`` against the ``expected`` file (chapters missing on either side too)."""
    problems = []
    for chapter in sorted(set(expected["chapters"]) | set(records)):
        if chapter not in expected["chapters"]:
            problems.append(f"{chapter}: not recorded in the expected file (make expected REASON=...)")
        else:
            problems += compare_chapter(chapter, expected["chapters"][chapter], records.get(chapter),
                                        expected["tolerance"])
    return problems


def rewrite(path: Path, records: dict[str, dict[str, Any]], reason: str) -> list[str]:
    """Write ``records`` into the expected file at ``path`` with ``reason``; returns what changed (the diff). Only the
    executed chapters are rewritten: a build of one chapter keeps the others' entries."""
    if not reason.strip():
        raise SystemExit("Say why the recorded numbers change: make expected REASON=\"...\".")
    old = json.loads(path.read_text()) if path.exists() else {
        "tolerance": TOLERANCE, "chapters": {}, "history": []}
    executed = {**old, "chapters": {c: e for c, e in old["chapters"].items() if c in records}}
    diff = compare({**executed, "tolerance": {"same_environment": 0.0, "elsewhere": 0.0}}, records)
    new = {**old, "chapters": {**old["chapters"], **records},
           "history": old["history"] + [{"date": datetime.date.today().isoformat(), "reason": reason.strip()}]}
    path.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    return diff


def chapter_title(stem: str) -> str:
    """"3. Reconstruction: AE, VAE and GANomaly" for ``03_reconstruction`` (its notebook's first heading)."""
    path = ROOT / "notebooks" / f"{stem}.ipynb"
    if not path.exists():
        return stem.replace("_", " ")
    first = "".join(json.loads(path.read_text())["cells"][0]["source"]).splitlines()[0]
    number = stem.split("_", 1)[0]
    return f"{int(number)}. {first.lstrip('# ').strip()}" if number.isdigit() else first.lstrip("# ").strip()


def tally(expected: dict[str, Any], out: Path) -> None:
    """The scorecard's tally of ``expected``'s verdicts (per chapter and in total) as ``tally.md`` + ``tally.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = {ch: [sum(c["verdict"] == v for c in rec["claims"].values()) for v in VERDICTS]
            for ch, rec in sorted(expected["chapters"].items())}
    total = [sum(r[i] for r in rows.values()) for i in range(3)]
    lines = ["| chapter | claims | conclusive | holds | contradicted | inconclusive |", "|---|---|---|---|---|---|"]
    for ch, (h, c, i) in {**rows, "**all chapters**": total}.items():
        lines.append(f"| {chapter_title(ch)} | {h + c + i} | {h + c} | {h} | {c} | {i} |")
    (out / "tally.md").write_text(
        f"Of {sum(total)} claims, **{total[0] + total[1]} are conclusive** ({total[0]} hold, {total[1]} are "
        f"contradicted) and **{total[2]} are inconclusive**.\n\n" + "\n".join(lines)
        + "\n")
    colours = {"holds": "#1a7f37", "contradicted": "#cf222e", "inconclusive": "#d4a72c"}
    fig, ax = plt.subplots(figsize=(6.4, 0.3 * len(rows) + 1.1))
    names = [ch.split("_", 1)[0] for ch in rows][::-1]
    left = [0] * len(rows)
    for i, v in enumerate(VERDICTS):
        counts = [r[i] for r in rows.values()][::-1]
        ax.barh(names, counts, left=left, color=colours[v], label=v)
        left = [a + b for a, b in zip(left, counts)]
    ax.set_xlabel("claims")
    ax.set_ylabel("chapter")
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(out / "tally.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expected", type=Path, default=EXPECTED)
    parser.add_argument("--executed", type=Path, default=EXECUTED)
    parser.add_argument("--write", action="store_true", help="rewrite the expected file from the executed chapters")
    parser.add_argument("--reason", default="", help="why the numbers change (with --write)")
    parser.add_argument("--tally", type=Path, help="write the scorecard's tally of the expected file here")
    args = parser.parse_args(argv)
    if args.tally is not None:
        tally(json.loads(args.expected.read_text()) if args.expected.exists() else {"chapters": {}}, args.tally)
        return 0
    records = read_records(args.executed)
    if args.write:
        diff = rewrite(args.expected, records, args.reason)
        print(f"Rewrote {args.expected} from {len(records)} chapters ({args.reason.strip()}).")
        print("\n".join(diff) if diff else "Nothing moved.")
        return 0
    if not args.expected.exists():
        print(f"{args.expected} does not exist: record the build with make expected REASON=\"...\".")
        return 1
    problems = compare(json.loads(args.expected.read_text()), records)
    if problems:
        print(f"The build moved {len(problems)} recorded entr{'y' if len(problems) == 1 else 'ies'} "
              f"({args.expected.relative_to(ROOT) if args.expected.is_relative_to(ROOT) else args.expected}):")
        print("\n".join(f"  {p}" for p in problems))
        print("If the change is meant, record it: make expected REASON=\"...\" (and say why in the commit).")
        return 1
    print(f"Guard passed: {len(records)} chapters match {args.expected.name}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
