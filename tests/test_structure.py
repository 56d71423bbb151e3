"""The package's shape: no import cycles, no private names used across modules, light modules stay light."""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# dotted module name -> file, every module of the package (subpackages included)
MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted((ROOT / "adlib").rglob("*.py"))}

# The layers, bottom up: a module may import its own layer (no cycles) and the layers below, never a layer above.
# Written once here and drawn in the README's layout section.
LAYERS = {
    "core": 0,
    "data": 1, "weights": 1, "training": 1, "eval": 1,
    "features": 2, "viz": 2,
    "methods": 3,
    "bench": 4, "recipes": 4,
    "cli": 5, "__main__": 5,
}


def _layer(module: str) -> int | None:
    """The layer of a dotted module name (None for the package itself)."""
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else None


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """The adlib modules ``path`` imports anywhere (top level or inside functions) and the private names it takes."""
    deps, private = set(), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "adlib":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:  # `from adlib.eval import metrics`: a module
                    deps.add(full)
                elif node.module in MODULES:  # `from adlib.eval.metrics import aupro`: a name of a module
                    deps.add(node.module)
                    if a.name.startswith("_"):
                        private.append(full)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in MODULES}
    return deps - {"adlib"}, private


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_and_no_private_imports() -> None:
    edges, private = {}, []
    for name, path in MODULES.items():
        edges[name], taken = _imports(path)
        private += [f"{name} imports {p}" for p in taken]
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"
    assert not private, f"private names used across modules: {private}"


def test_every_module_has_a_layer_and_no_import_runs_upwards() -> None:
    assert {m.split(".")[1] for m in MODULES if m != "adlib"} == set(LAYERS), "a new subpackage needs a layer"
    upwards = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
               for name, path in MODULES.items() if name != "adlib"
               for dep in sorted(_imports(path)[0]) if _layer(dep) > _layer(name)]
    assert not upwards, "imports that run upwards:\n" + "\n".join(upwards)


def test_the_layer_check_sees_an_upward_import(tmp_path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from adlib.methods import patchcore\n"
                      "    from adlib.eval.metrics import _to_float64\n")
    deps, private = _imports(module)
    assert deps == {"adlib.methods.patchcore", "adlib.eval.metrics"} and private == ["adlib.eval.metrics._to_float64"]
    assert _layer("adlib.methods.patchcore") > _layer("adlib.eval.metrics")


def test_no_module_is_over_400_lines() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"split these modules: {long}"


def test_metrics_import_without_torch() -> None:
    code = "import sys; from adlib.eval import metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", "adlib.eval.metrics (or an __init__ above it) imports torch"


POINTER = re.compile(r'Defined in: "([^"]+)" \(``([^`]+)``\)')


def _title(path: Path) -> str:
    """The first '# ' heading of a notebook."""
    first = json.loads(path.read_text())["cells"][0]
    return next(line[2:].strip() for line in "".join(first["source"]).splitlines() if line.startswith("# "))


def test_every_public_object_names_the_chapter_that_teaches_it() -> None:
    missing, wrong = [], []
    for name in sorted(MODULES):
        if name.rsplit(".", 1)[-1].startswith("_"):
            continue
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if obj.__module__ != module.__name__:
                continue  # imported from elsewhere; checked where it is defined
            found = POINTER.search(inspect.getdoc(obj) or "")
            if found is None:
                missing.append(f"{name}.{attr}")
                continue
            title, page = found.groups()
            if not (ROOT / page).is_file():
                wrong.append(f"{name}.{attr}: no page {page}")
            elif not (_title(ROOT / page) == title or _title(ROOT / page).startswith(title + ":")):
                wrong.append(f"{name}.{attr}: {page} is titled {_title(ROOT / page)!r}, not {title!r}")
    assert not missing, f"public objects without a 'Defined in' pointer: {missing}"
    assert not wrong, f"pointers to the wrong page: {wrong}"
