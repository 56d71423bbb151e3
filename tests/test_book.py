"""The book builds strictly (-W -n --keep-going): broken references, citations or toc entries fail.

Execution is off here because test_notebooks.py already executes every chapter; `make book` executes them.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from notebook_contract import ROOT

JUPYTER_BOOK = Path(sys.executable).parent / "jupyter-book"


def build(source: Path, out: Path, config: dict | None = None) -> subprocess.CompletedProcess:
    args = [str(JUPYTER_BOOK), "build", str(source), "--path-output", str(out), "-W", "-n", "--keep-going"]
    if config is not None:
        cfg = out / "_config_test.yml"
        out.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump(config))
        args += ["--config", str(cfg)]
    return subprocess.run(args, capture_output=True, text=True, timeout=900)


@pytest.mark.book
def test_book_builds_without_warnings(tmp_path):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    # Unexecuted notebooks glue nothing, so the scorecard's references are empty here (make book checks them).
    config["sphinx"]["config"]["suppress_warnings"] = ["mystnb.glue_ref"]
    # As `make book`: the teacher's page links the exercise-only copies, which the build must find.
    subprocess.run([sys.executable, str(ROOT / "tools" / "exercise_copies.py")], check=True, timeout=120)
    # As `make book`: the scorecard includes the tally of book/expected.json.
    subprocess.run([sys.executable, str(ROOT / "tools" / "check_expected.py"), "--tally",
                    str(ROOT / "book" / "_generated")], check=True, timeout=120)
    result = build(ROOT, tmp_path / "book", config)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"jupyter-book build failed:\n{log[-6000:]}"
    html = tmp_path / "book" / "_build" / "html"
    assert (html / "book" / "intro.html").exists()
    assert (html / "notebooks" / "01_ad_in_ten_minutes.html").exists()
    downloads = {p.name for p in (html / "_downloads").rglob("*") if p.is_file()}
    assert "exercises.zip" in downloads and "11_benchmark.ipynb" in downloads


@pytest.mark.book
def test_a_broken_citation_fails_the_build(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (src / "intro.md").write_text("# Intro\n\nSee {cite}`no_such_paper` and {doc}`no_such_page`.\n")
    (src / "refs.bib").write_text("@misc{a, title={A}, author={B}, year={2020}}\n")
    config = {"title": "t", "bibtex_bibfiles": ["refs.bib"], "execute": {"execute_notebooks": "off"}}
    result = build(src, tmp_path / "out", config)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no_such_paper" in log and "no_such_page" in log
