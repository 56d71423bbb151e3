"""The chapter contract as code: what every notebook listed in ``_toc.yml`` must satisfy.

Used by ``test_project.py``; each check returns a list of human-readable problems (empty = fine) so a
failure says exactly which notebook and which cell break which rule.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]


def toc_files(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """All ``file:`` entries of a Jupyter Book toc (root included), without extension."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return files


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """Notebooks listed in the toc, in book order."""
    return [root / f"{f}.ipynb" for f in toc_files(root / "_toc.yml") if (root / f"{f}.ipynb").exists()]


def notebooks_missing_from_toc(root: Path = ROOT) -> list[str]:
    """Notebooks under ``notebooks/`` that the toc does not list (they would never be built or tested)."""
    listed = set(toc_files(root / "_toc.yml"))
    return sorted(
        str(p.relative_to(root))
        for p in (root / "notebooks").glob("*.ipynb")
        if str(p.relative_to(root).with_suffix("")) not in listed
    )


def colab_install(root: Path = ROOT) -> str:
    """What every Colab cell installs: the repository at the ref of ``_config.yml`` (``repository.branch``), the
    same ref the Colab launch buttons and badges open the notebooks at, so notebook and library never drift
    apart. A release sets that one line to its tag."""
    repo = yaml.safe_load((root / "_config.yml").read_text())["repository"]
    return f"adlib @ git+{repo['url']}@{repo['branch']}"


def colab_badge(path: Path, root: Path = ROOT) -> str:
    """The Colab URL of a chapter at the ref of ``_config.yml``."""
    repo = yaml.safe_load((root / "_config.yml").read_text())["repository"]
    slug = repo["url"].removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{slug}/blob/{repo['branch']}/{path.relative_to(root)}"


def contract_problems(path: Path, repo_url: str | None = None) -> list[str]:
    """Everything in notebook ``path`` that breaks the chapter contract."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            problems.append(f"cell {i} has committed outputs or an execution count; strip them "
                            "(e.g. `jupyter nbconvert --clear-output --inplace <nb>`)")
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1:
        problems.append(f"needs exactly one cell tagged 'parameters', found {len(params)} (cells {params})")
    elif not re.search(r"^PROFILE\s*=\s*[\"'](smoke|book|paper)[\"']", nb.cells[params[0]].source, re.M):
        problems.append(f"the parameters cell (cell {params[0]}) must set PROFILE = \"book\" (or another profile)")
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or "google.colab" not in code[0].source:
        problems.append("the first code cell must be the Colab install cell (it checks 'google.colab')")
    elif repo_url and repo_url not in code[0].source:
        problems.append(f"the Colab install cell must install {repo_url!r} (the repository and ref of _config.yml)")
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for heading in ("Results vs paper", "Summary", "Exercises"):
        if not re.search(rf"^#+ .*{heading}", text, re.M | re.I):
            problems.append(f"missing a '{heading}' section (see book/chapter_template)")
    if code and "show_versions" not in code[-1].source:
        problems.append("the last code cell must call adlib.show_versions(...)")
    return problems
