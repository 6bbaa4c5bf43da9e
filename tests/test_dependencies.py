"""The package declares exactly what it imports: every third-party module imported anywhere in
``specsight/`` (inside functions too) comes from a declared dependency or extra, and every core
dependency is imported somewhere."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
#: import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "google": "protobuf"}


def _imported() -> set[str]:
    names = set()
    for path in (ROOT / "specsight").rglob("*.py"):
        if "examples" in path.relative_to(ROOT / "specsight").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "specsight"}


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("-", "_")

    core = {name(r) for r in project["dependencies"]}
    extras = {
        name(r)
        for group, reqs in project["optional-dependencies"].items()
        if group not in ("dev", "bench")
        for r in reqs
        if not r.startswith("specsight")
    }
    return core, extras


def test_every_import_is_declared_and_every_core_dependency_used():
    core, extras = _declared()
    imported = {DISTRIBUTION.get(n, n).lower() for n in _imported()}
    undeclared = imported - core - extras
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"
    unused = core - imported
    assert not unused, f"declared but never imported: {sorted(unused)}"
