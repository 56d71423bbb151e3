"""Every chapter in the toc runs top to bottom at the smoke profile (papermill, in-process)."""
from __future__ import annotations

import json
import sys
import time

import papermill
import pytest

from notebook_contract import ROOT, toc_notebooks

OUT = ROOT / "build" / "executed"
SMOKE_EXPECTED = ROOT / "book" / "expected_smoke.json"
sys.path.insert(0, str(ROOT / "tools"))
import check_expected  # noqa: E402  (tools/ is not a package)


@pytest.mark.notebook
@pytest.mark.parametrize("path", toc_notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_profile(path):
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(path), str(OUT / path.name), parameters={"PROFILE": "smoke"}, kernel_name="python3",
            cwd=str(path.parent), progress_bar=False, execution_timeout=300,
        )
    except papermill.PapermillExecutionError as err:
        pytest.fail(
            f"{path.relative_to(ROOT)} failed in cell {err.cell_index} (execution count {err.exec_count}):\n"
            f"{err.source}\n---\n{err.ename}: {err.evalue}\nExecuted copy: {OUT / path.name}",
            pytrace=False,
        )
    print(f"{path.name}: {time.perf_counter() - start:.1f} s at the smoke profile")
    _check_claim_boxes(path, OUT / path.name)
    _check_smoke_numbers(path, OUT / path.name)


def _check_claim_boxes(source, executed) -> None:
    """A chapter that calls ``scorecard.show`` must show a claim box per claim and glue its table for the scorecard."""
    if "claims.show(" not in source.read_text() and "claims.gather(" not in source.read_text():
        return
    outputs = [o for c in json.loads(executed.read_text())["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", [])]
    html = "".join("".join(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "Claim check (chapter" in html, f"{source.name}: claims.show produced no claim box"
    glued = [o for o in outputs if o.get("metadata", {}).get("scrapbook", {}).get("name") == "claims"]
    assert glued, f"{source.name}: the claim table was not glued under 'claims' for the scorecard page"


def _check_smoke_numbers(source, executed) -> None:
    """The smoke twin of ``book/expected.json`` guards CI: no verdict changes, no number moves beyond tolerance."""
    expected = json.loads(SMOKE_EXPECTED.read_text())
    record = check_expected.read_record(executed)
    if source.stem not in expected["chapters"]:
        assert record is None, (f"{source.name} glues claims that {SMOKE_EXPECTED.name} does not record: "
                                "make expected-smoke REASON=\"...\"")
        return
    problems = check_expected.compare_chapter(source.stem, expected["chapters"][source.stem], record,
                                              expected["tolerance"])
    assert not problems, ("The smoke run moved recorded entries (if meant: make expected-smoke REASON=\"...\"):\n"
                          + "\n".join(problems))
