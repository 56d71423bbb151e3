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
from typing import Any

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


# A public object's docstring ends its story with one footer line: the chapter whose code uses it, or, for the
# objects no chapter calls, who does: other objects of the package (a function or class whose source names it, or
# a module-level table that holds it), ``python -m adlib`` or one of its subcommands. An object that only the tests
# use is dead code: it has no footer to write.
DEFINED = re.compile(r'Defined in: "([^"]+)" \(``([^`]+)``\)\.')
USED = re.compile(r"Used by: (.+)\.")
USED_ITEM = re.compile(r"(``python -m adlib(?: ([a-z][a-z0-9-]*))?``)|``(adlib(?:\.\w+)+)``")
CHAPTERS = [*sorted((ROOT / "notebooks").glob("*.ipynb")), ROOT / "book" / "chapter_template.ipynb"]


def _title(path: Path) -> str:
    """The first '# ' heading of a notebook."""
    first = json.loads(path.read_text())["cells"][0]
    return next(line[2:].strip() for line in "".join(first["source"]).splitlines() if line.startswith("# "))


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"] (None when the chain does not start at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _dotted_uses(code: list[str]) -> set[str]:
    """Every dotted ``adlib...`` name the code cells use: ``alias.name`` with ``alias`` bound by an import from
    adlib, a bare name imported from an adlib module, or ``adlib.<path>.name`` after ``import adlib``."""
    trees = [ast.parse("\n".join(re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in cell.splitlines()))
             for cell in code]
    bound: dict[str, str] = {}  # a name of the notebook -> the dotted adlib path it stands for
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "adlib":
                    bound[a.asname or "adlib"] = a.name if a.asname else "adlib"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "adlib":
            bound |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    uses = set()
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, (ast.Name, ast.Attribute)) and (chain := _chain(node)) and chain[0] in bound:
            uses |= {".".join([bound[chain[0]], *chain[1:k]]) for k in range(1, len(chain) + 1)}
    return uses


def _resolve(dotted: str) -> Any:
    """The object a dotted name ``<module>.<name>`` stands for (lazy exports of ``adlib`` included), or None."""
    module, _, attr = dotted.rpartition(".")
    if module not in MODULES:
        return None
    try:
        return getattr(importlib.import_module(module), attr, None)
    except Exception:  # noqa: BLE001 - an attribute that fails to load is not a use
        return None


def _holds(table: Any, obj: Any) -> bool:
    """Whether a module-level table (dict, list, tuple, nested) holds ``obj``: as a key, value or item, or as the
    ``"module:Name"`` string of a lazy registry such as ``adlib.methods.catalog.METHODS``."""
    if not isinstance(table, (dict, list, tuple)):
        return False
    name = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
    items = [*table, *table.values()] if isinstance(table, dict) else list(table)
    return any(item is obj or (isinstance(item, str) and item == name) or _holds(item, obj) for item in items)


def _code_cells(page: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(page.read_text())["cells"] if c["cell_type"] == "code"]


_USED_IN: dict[Path, list[Any]] = {}


def _uses(page: Path, obj: Any) -> bool:
    """Whether the code cells of ``page`` use ``obj`` (by the rule of ``_dotted_uses``), directly or through a
    table of its module that holds it (``classic.DETECTORS``)."""
    if page not in _USED_IN:
        _USED_IN[page] = [o for d in sorted(_dotted_uses(_code_cells(page))) if (o := _resolve(d)) is not None]
    return any(o is obj or _holds(o, obj) for o in _USED_IN[page])


def _cli_source() -> str:
    files = [ROOT / "adlib" / "cli.py", *sorted((ROOT / "adlib" / "cli").rglob("*.py"))]
    return "\n".join(f.read_text() for f in files if f.is_file())


def _footer_problem(name: str, obj: Any, doc: str | None) -> str | None:
    """What is wrong with the footer of ``doc``, the docstring of ``obj`` (public name ``name``), or None."""
    lines = [line.strip() for line in (doc or "").splitlines()]
    footers = [line for line in lines if "Defined in:" in line or line.startswith("Used by:")]
    short = name.rsplit(".", 1)[-1]
    if len(footers) != 1:
        return f"{name}: {len(footers)} footer lines (need exactly one 'Defined in: ...' or 'Used by: ...')"
    footer = footers[0]
    if found := DEFINED.fullmatch(footer):
        title, page = found.groups()
        if not (ROOT / page).is_file():
            return f"{name}: no page {page}"
        if not (_title(ROOT / page) == title or _title(ROOT / page).startswith(title + ":")):
            return f"{name}: {page} is titled {_title(ROOT / page)!r}, not {title!r}"
        if not _uses(ROOT / page, obj):
            users = [str(p.relative_to(ROOT)) for p in CHAPTERS if _uses(p, obj)]
            return (f"{name}: the code of {page} does not use it; chapters that do: {users or 'none'}"
                    + ("" if users else " (write 'Used by: ...' instead)"))
        return None
    if (found := USED.fullmatch(footer)) is None:
        return f"{name}: malformed footer {footer!r}"
    items = found.group(1).split(", ")
    for item in items:
        if (part := USED_ITEM.fullmatch(item)) is None:
            return (f"{name}: 'Used by' item {item!r} is none of ``python -m adlib [<subcommand>]``, "
                    "``adlib.<path>``")
        cli_item, command, user = part.groups()
        if cli_item:
            cli = _cli_source() if command else (ROOT / "adlib" / "__main__.py").read_text()
            if (command and command not in cli) or not re.search(rf"\b{short}\b", cli):
                return f"{name}: the {'cli' if command else '__main__'} source does not mention {command or ''} {short}"
            continue
        target = _resolve(user)
        if target is None or target is obj:
            return f"{name}: 'Used by' names {user}, which does not exist (or is the object itself)"
        if isinstance(target, (dict, list, tuple)):
            if not _holds(target, obj):
                return f"{name}: the table {user} does not hold it"
        elif not re.search(rf"\b{short}\b", inspect.getsource(target)):
            return f"{name}: the source of {user} does not mention {short}"
    return None


def _public_objects() -> dict[str, Any]:
    """Every public function and class of the package, by its dotted name, where it is defined."""
    found = {}
    for name in sorted(MODULES):
        if name.rsplit(".", 1)[-1].startswith("_"):
            continue
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) \
                    and obj.__module__ == module.__name__:
                found[f"{name}.{attr}"] = obj
    return found


def test_the_footer_check_rejects_wrong_footers() -> None:
    seed = _resolve("adlib.core.runtime.seed_everything")
    template = 'Defined in: "How a chapter is built" (``book/chapter_template.ipynb``).'
    assert _footer_problem("adlib.core.runtime.seed_everything", seed, f"Seed.\n\n{template}") is None
    add_defect = _resolve("adlib.data.defects.add_defect")  # imported by name in chapter 2 only
    problem = _footer_problem("adlib.data.defects.add_defect", add_defect, f"Adds a defect.\n\n{template}")
    assert problem and "does not use it" in problem and "notebooks/02_datasets_and_metrics.ipynb" in problem

    def made_up() -> None:
        """Nobody calls me."""

    assert "0 footer lines" in _footer_problem("x.made_up", made_up, made_up.__doc__)
    assert "2 footer lines" in _footer_problem("x.made_up", made_up, f"{template}\n{template}")
    assert "does not use it" in _footer_problem("x.made_up", made_up, template)
    assert "titled" in _footer_problem("x.made_up", made_up, template.replace("How a", "Why a"))
    for footer, says in [("Used by: ``adlib.eval.metrics.aupro``.", "does not mention made_up"),
                         ("Used by: ``adlib.eval.metrics.no_such_thing``.", "does not exist"),
                         ("Used by: ``python -m adlib bench``.", "cli source"),
                         ("Used by: ``python -m adlib``.", "__main__ source"),
                         ("Used by: ``tests/test_metrics.py``.", "none of"),
                         ("Used by: ``adlib.methods.classic.DETECTORS``.", "does not hold it"),
                         ("Used by: adlib.eval.metrics.aupro.", "none of")]:
        assert says in _footer_problem("x.made_up", made_up, footer), footer
    assert _footer_problem("adlib.eval.metrics.pro_curve", _resolve("adlib.eval.metrics.pro_curve"),
                           "Used by: ``adlib.eval.metrics.aupro``.") is None
    # a table holds an object by value or by its "module:Name" string; a chapter that uses the table uses it
    ocsvm, patchcore = _resolve("adlib.methods.classic.ocsvm"), _resolve("adlib.methods.patchcore.PatchCore")
    assert _holds(_resolve("adlib.methods.classic.DETECTORS"), ocsvm)
    assert _holds(_resolve("adlib.methods.catalog.METHODS"), patchcore)
    assert not _holds(_resolve("adlib.methods.catalog.METHODS"), ocsvm)
    assert _uses(ROOT / "notebooks" / "01_ad_in_ten_minutes.ipynb", ocsvm)


def test_every_public_object_names_the_chapter_that_uses_it_or_who_does() -> None:
    problems = [p for name, obj in _public_objects().items()
                if (p := _footer_problem(name, obj, inspect.getdoc(obj))) is not None]
    assert not problems, f"{len(problems)} footers to fix:\n" + "\n".join(problems)
