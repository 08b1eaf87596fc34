"""The package's import graph: no circles anywhere, and only the Dagster layer imports Dagster.

Reads the source with `ast`, so it needs no import side effects and runs in milliseconds. Every
import counts, function-local ones included (a circle hidden inside a function is still a circle),
except those under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = "deals_pipeline"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
# The Dagster layer: the defs package, the module Dagster loads, and the CLI that launches Dagster runs.
DAGSTER_LAYER = (f"{PACKAGE}.defs", f"{PACKAGE}.definitions", f"{PACKAGE}.cli")
DAGSTER_DISTRIBUTIONS = ("dagster",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node that can run: the tree minus the bodies of ``if TYPE_CHECKING:`` blocks."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports: package modules by full name, third-party by top-level name."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule `pkg.mod`; `from mod import name` imports `mod`.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            found.add(target if target.split(".")[0] == PACKAGE else target.split(".")[0])
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _in_dagster_layer(module: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in DAGSTER_LAYER)


def test_the_graph_sees_the_package() -> None:
    """Guards the two checks below against walking nothing: the walker finds known edges."""
    graph = _graph()
    assert "deals_pipeline.budget" in graph["deals_pipeline.backfill.service"]
    assert "dagster" in graph["deals_pipeline.defs.resources"]
    assert "deals_pipeline.defs.definitions" in graph["deals_pipeline.definitions"]


def test_no_import_cycles_in_the_package() -> None:
    graph = {name: {dep for dep in deps if dep.startswith(PACKAGE)} for name, deps in _graph().items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def test_plain_modules_never_import_dagster_or_defs() -> None:
    offenders = {
        name: sorted(dep for dep in deps if dep in DAGSTER_DISTRIBUTIONS or _in_dagster_layer(dep))
        for name, deps in _graph().items()
        if not _in_dagster_layer(name)
    }
    offenders = {name: deps for name, deps in offenders.items() if deps}
    assert not offenders, f"plain modules import the Dagster layer: {offenders}"
