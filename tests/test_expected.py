"""The guard on the book's numbers (tools/check_expected.py) and the cache refresh (tools/book_cache.py)."""
from __future__ import annotations

import json
import sys

import nbformat
import pytest
from IPython.core.formatters import format_display_data

from adlib.eval import claims, scorecard
from notebook_contract import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import book_cache  # noqa: E402  (tools/ is not a package)
import check_expected  # noqa: E402

PREFIX = "application/papermill.record/"


def _chapter(ours: float = 0.10, low: float = 0.05, high: float = 0.15, number: float = 0.9) -> dict:
    claim = claims.check("1", "A beats B.", "AUROC", ours, low, high, "bootstrap", n=50, unit="test images",
                         cause="too little data to decide")
    return scorecard.record([claim], {"A / image AUROC": number})


def _write_executed(folder, record: dict, stem: str = "01_demo") -> None:
    """An executed notebook with ``record`` glued the way myst_nb.glue(display=False) stores it."""
    bundle, metadata = format_display_data(json.dumps(record))
    metadata["scrapbook"] = {"name": "claims_record", "mime_prefix": PREFIX}
    out = nbformat.v4.new_output("display_data", data={PREFIX + k: v for k, v in bundle.items()}, metadata=metadata)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("glue()", outputs=[out])])
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / f"{stem}.ipynb")


@pytest.fixture
def recorded(tmp_path):
    executed = tmp_path / "executed"
    _write_executed(executed, _chapter())
    expected = tmp_path / "expected.json"
    assert check_expected.main(["--executed", str(executed), "--expected", str(expected), "--write",
                                "--reason", "first record"]) == 0
    return executed, expected


def test_the_guard_passes_on_the_recorded_build(recorded) -> None:
    executed, expected = recorded
    assert check_expected.main(["--executed", str(executed), "--expected", str(expected)]) == 0
    saved = json.loads(expected.read_text())
    assert saved["history"][-1]["reason"] == "first record"
    assert saved["chapters"]["01_demo"]["claims"]["A beats B."]["verdict"] == "holds"


def test_the_guard_fails_on_a_flipped_verdict_and_names_it(recorded, capsys) -> None:
    executed, expected = recorded
    _write_executed(executed, _chapter(ours=0.02, low=-0.01, high=0.05))
    assert check_expected.main(["--executed", str(executed), "--expected", str(expected)]) == 1
    out = capsys.readouterr().out
    assert "01_demo: claim 'A beats B.': verdict holds -> inconclusive" in out


def test_the_guard_fails_on_a_moved_number_and_on_a_tampered_file(recorded, capsys) -> None:
    executed, expected = recorded
    _write_executed(executed, _chapter(number=0.9 + 1e-6))
    assert check_expected.main(["--executed", str(executed), "--expected", str(expected)]) == 1
    assert "number 'A / image AUROC': 0.9 -> 0.900001" in capsys.readouterr().out
    _write_executed(executed, _chapter())
    saved = json.loads(expected.read_text())
    saved["chapters"]["01_demo"]["claims"]["A beats B."]["verdict"] = "contradicted"
    expected.write_text(json.dumps(saved))
    assert check_expected.main(["--executed", str(executed), "--expected", str(expected)]) == 1


def test_another_environment_gets_the_wider_tolerance_but_not_for_verdicts(recorded) -> None:
    executed, expected = recorded
    saved = json.loads(expected.read_text())
    old = saved["chapters"]["01_demo"]
    old["environment"]["cpu"] = "another CPU"
    tol = saved["tolerance"]["elsewhere"]
    assert check_expected.compare_chapter("c", old, _chapter(number=0.9 + tol / 2), saved["tolerance"]) == []
    assert check_expected.compare_chapter("c", old, _chapter(number=0.9 + 2 * tol), saved["tolerance"])
    flipped = check_expected.compare_chapter("c", old, _chapter(ours=0.03, low=-0.001, high=0.06), saved["tolerance"])
    assert any("verdict holds -> inconclusive" in p for p in flipped)


def test_missing_and_new_chapters_and_claims_fail(recorded, tmp_path) -> None:
    executed, expected = recorded
    _write_executed(executed, _chapter(), stem="02_other")
    problems = check_expected.compare(json.loads(expected.read_text()), check_expected.read_records(executed))
    assert problems == ["02_other: not recorded in the expected file (make expected REASON=...)"]
    (executed / "01_demo.ipynb").unlink()
    problems = check_expected.compare(json.loads(expected.read_text()), check_expected.read_records(executed))
    assert any("01_demo: recorded, but the build has no executed chapter" in p for p in problems)
    with pytest.raises(SystemExit, match="Say why"):
        check_expected.main(["--executed", str(executed), "--expected", str(expected), "--write"])


def test_rewriting_from_one_executed_chapter_keeps_the_other_chapters(recorded, tmp_path) -> None:
    executed, expected = recorded
    other = tmp_path / "other"
    _write_executed(other, _chapter(number=0.8), stem="02_other")
    assert check_expected.main(["--executed", str(other), "--expected", str(expected), "--write",
                                "--reason", "chapter 2 only"]) == 0
    saved = json.loads(expected.read_text())
    assert sorted(saved["chapters"]) == ["01_demo", "02_other"]
    _write_executed(other, _chapter(number=0.7), stem="02_other")
    diff = check_expected.rewrite(expected, check_expected.read_records(other), "chapter 2 again")
    assert [line.split(' (')[0] for line in diff] == ["02_other: number 'A / image AUROC': 0.8 -> 0.7"]


def test_a_book_build_keeps_the_glued_record_beside_the_notebook(tmp_path) -> None:
    """myst-nb's build strips glued outputs from the executed notebook into ``<stem>.glue.json``, unprefixed."""
    folder = tmp_path / "jupyter_execute"
    _write_executed(folder, _chapter())
    nb = nbformat.read(folder / "01_demo.ipynb", as_version=4)
    out = nb.cells[0].outputs.pop()
    out["data"] = {k[len(PREFIX):]: v for k, v in out["data"].items()}
    nbformat.write(nb, folder / "01_demo.ipynb")
    (folder / "01_demo.glue.json").write_text(json.dumps({"claims_record": out}))
    assert check_expected.read_records(folder)["01_demo"]["numbers"] == {"A / image AUROC": 0.9}


def test_the_tally_counts_every_verdict(recorded, tmp_path) -> None:
    _, expected = recorded
    saved = json.loads(expected.read_text())
    saved["chapters"]["02_x"] = {"claims": {"a": {"verdict": "contradicted"}, "b": {"verdict": "inconclusive"}}}
    expected.write_text(json.dumps(saved))
    assert check_expected.main(["--expected", str(expected), "--tally", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t" / "tally.md").read_text()
    assert "Of 3 claims, **2 are conclusive** (1 hold, 1 are contradicted) and **1 are inconclusive**" in md
    assert "| 02 x | 2 | 1 | 0 | 1 | 1 |" in md  # no such notebook: the stem stands in
    assert (tmp_path / "t" / "tally.png").stat().st_size > 1000
    assert check_expected.chapter_title("03_reconstruction") == "3. Reconstruction: AE, VAE and GANomaly"


def test_the_book_cache_is_cleared_when_adlib_changes(tmp_path) -> None:
    root = tmp_path / "repo"
    (root / "adlib" / "weights").mkdir(parents=True)
    (root / "adlib" / "m.py").write_text("x = 1\n")
    (root / "adlib" / "weights" / "w.safetensors").write_bytes(b"\0\1")
    (root / "constraints.txt").write_text("torch==2\n")
    build = root / "_build"
    outputs = [build / ".jupyter_cache" / "global.db", build / ".doctrees" / "environment.pickle",
               build / "jupyter_execute" / "01.ipynb"]

    def fill() -> None:
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("old outputs")

    assert not book_cache.refresh(build, root)  # nothing to clear yet
    fill()
    assert not book_cache.refresh(build, root) and all(p.exists() for p in outputs)  # unchanged: kept
    for change in (lambda: (root / "adlib" / "m.py").write_text("x = 2\n"),
                   lambda: (root / "adlib" / "weights" / "w.safetensors").write_bytes(b"\0\2"),
                   lambda: (root / "constraints.txt").write_text("torch==3\n")):
        fill()
        change()
        # The execution cache alone is not enough: Sphinx would not re-read an unchanged notebook.
        assert book_cache.refresh(build, root) and not any(p.exists() for p in outputs)
