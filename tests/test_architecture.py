"""The package's architecture, checked from its source: no import cycle between any two
modules (imports inside functions and under TYPE_CHECKING count), every imported name exists,
no private name crosses a subpackage boundary, modules stay small and say what they hold, and
the README's layout names every subpackage. The layer contracts themselves are import-linter's
(``make lint``); this suite checks what import-linter does not."""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "specsight"
MAX_LINES = 400
#: folders of the package that hold data, not code (listed in the layout too)
DATA_FOLDERS = {"examples"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module the statement reaches
    names: tuple[str, ...]  # names imported from ``target`` (empty for `import x` or modules)
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


#: every module of the package; ``examples/`` holds example specs and their data scripts
MODULES: dict[str, Path] = {
    _module_name(p): p
    for p in sorted(PACKAGE.rglob("*.py"))
    if p.relative_to(PACKAGE).parts[0] not in DATA_FOLDERS
}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _base(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    if not _is_package(importer):
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports(name: str) -> list[Import]:
    """Every import statement of a module that reaches a specsight module, wherever it is."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [
                Import(name, a.name, (), node.lineno)
                for a in node.names
                if a.name.split(".")[0] == "specsight"
            ]
        elif isinstance(node, ast.ImportFrom):
            base = _base(name, node)
            if base.split(".")[0] != "specsight":
                continue
            plain = []
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:  # `from package import module`
                    out.append(Import(name, f"{base}.{alias.name}", (), node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                out.append(Import(name, base, tuple(plain), node.lineno))
    return out


IMPORTS = [imp for name in MODULES for imp in _imports(name)]


def _subpackage(module: str) -> str:
    """``specsight.compile`` for ``specsight.compile.ops``; top-level modules are their own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    found.append(sorted(component))
    return found


def test_the_graph_sees_every_kind_of_import():
    """The graph counts imports inside functions and under TYPE_CHECKING, or it proves little."""
    targets = {(imp.importer, imp.target) for imp in IMPORTS}
    assert ("specsight.api", "specsight.engine") in targets  # inside run()
    assert ("specsight.api", "specsight.results") in targets  # TYPE_CHECKING and inside run()
    assert ("specsight.cli", "specsight.cli.run") in targets  # `from . import run`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target != imp.importer:
            edges[imp.importer].add(imp.target)
    assert _cycles(edges) == []


def test_every_imported_name_exists():
    """An import of a name its module does not define fails only when that line runs; for a
    function-local import that may be a rare path (a remote run, an error), so check them all."""
    missing = []
    for imp in IMPORTS:
        module = importlib.import_module(imp.target)
        for name in imp.names:
            if name != "*" and not hasattr(module, name):
                where = MODULES[imp.importer].relative_to(ROOT)
                missing.append(f"{where}:{imp.line}: {imp.target} has no {name}")
    assert missing == []


def test_no_private_name_crosses_a_subpackage():
    """What a package offers others is public in that package."""
    crossing = []
    for imp in IMPORTS:
        if _subpackage(imp.importer) == _subpackage(imp.target):
            continue
        private_module = any(
            part.startswith("_") and part != "__init__" for part in imp.target.split(".")
        )
        private_names = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private_module or private_names:
            where = MODULES[imp.importer].relative_to(ROOT)
            crossing.append(f"{where}:{imp.line}: {imp.target} {private_names}")
    assert crossing == []


def test_modules_are_small_and_say_what_they_hold():
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        assert lines <= MAX_LINES, f"{name} has {lines} lines; split it along a concept"
        doc = ast.get_docstring(ast.parse(text))
        assert doc and len(doc.split()) >= 5, f"{name} has no docstring saying what it holds"


def test_every_subpackage_names_its_public_api():
    for name in MODULES:
        if not _is_package(name) or name in ("specsight", "specsight.remote"):
            continue
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported, f"{name} has no __all__"
        assert all(hasattr(module, n) for n in exported), name


def _layout_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n(.*?)(?=^## )", readme, re.S | re.M)
    assert match, "the README has no '## Layout' section"
    return match.group(1)


def test_readme_layout_names_every_subpackage():
    section = _layout_section()
    subpackages = sorted(
        name.split(".")[1] for name in MODULES if _is_package(name) and name.count(".") == 1
    )
    named = re.findall(r"^- `([a-z_]+)/`", section, re.M)
    missing = [p for p in subpackages if p not in named]
    assert missing == [], f"README '## Layout' does not name {missing}"
    data = {name for name in named if name in DATA_FOLDERS and (PACKAGE / name).is_dir()}
    assert sorted(set(named) - data) == subpackages, (
        "the layout names a package that does not exist"
    )


@pytest.mark.parametrize("package", ["spec", "compile", "plan", "sites"])
def test_torch_free_layers_import_no_torch_at_all(package):
    """The import-linter contract, again from the source: no torch import anywhere in these
    packages, nor in the model information they read."""
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(f"specsight.{package}"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    mods = (
                        [a.name for a in node.names]
                        if isinstance(node, ast.Import)
                        else [node.module or ""]
                    )
                    if any(m.split(".")[0] == "torch" for m in mods):
                        offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


#: the packages that hold the plan, its compiler and its engine: small functions there
PIPELINE = ("specsight.compile", "specsight.plan", "specsight.engine")
MAX_FUNCTION_LINES, MAX_PARAMETERS = 60, 8


def test_pipeline_functions_are_short_and_take_few_parameters():
    too_big = []
    for name, path in MODULES.items():
        if not name.startswith(PIPELINE):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            count = len(params) + bool(args.vararg) + bool(args.kwarg)
            count -= bool(params) and params[0].arg in ("self", "cls")
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if lines > MAX_FUNCTION_LINES or count > MAX_PARAMETERS:
                too_big.append(f"{name}.{node.name}: {lines} lines, {count} parameters")
    assert not too_big, "split these (or group their parameters): " + "; ".join(too_big)
