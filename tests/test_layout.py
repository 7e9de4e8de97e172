"""Code layout: no import cycles among graphprune modules, no class over 400 lines.

Imports are read with :mod:`ast` (module-level, function-level and ``TYPE_CHECKING``
imports alike), so a cycle hidden inside a function still counts.  The modules are every
``.py`` file of the packages that pyproject.toml installs (``passes/`` as
``graphprune.passes``, ``samples/`` as ``graphprune.samples``).  An edge ``a -> b`` means
``a`` names ``b`` in an import; ``from pkg import name`` points at ``pkg.name`` when that is
a module, else at ``pkg``.  Importing a submodule also runs its parents' ``__init__``, but
that implicit edge is not counted: ``graphprune/__init__.py`` imports most modules for the
public API, so counting it would make every module part of a cycle.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Collection

import networkx as nx
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

pytestmark = pytest.mark.notorch  # static: also run by `make test-notorch`

ROOT = Path(__file__).resolve().parent.parent
MAX_CLASS_LINES = 400

# Classes allowed over MAX_CLASS_LINES, each with the reason.  None today (FxFrontend in
# frontends/fx.py is about 350 lines and is being split further on main).
EXEMPT_CLASSES: dict[str, str] = {}


def package_dirs() -> dict[str, Path]:
    """Installed package name -> source folder, as pyproject.toml maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {"graphprune": ROOT / "graphprune"}
    for name, folder in config.get("package-dir", {}).items():
        dirs[name] = ROOT / folder
    return dirs


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    found: dict[str, tuple[Path, bool]] = {}
    for pkg, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            parts = [pkg, *path.relative_to(folder).with_suffix("").parts]
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            found.setdefault(".".join(parts), (path, is_pkg))
    return found


def imported_modules(tree: ast.AST, module: str, is_pkg: bool, mods: Collection[str]) -> set[str]:
    """The graphprune modules ``tree`` imports anywhere (relative imports resolved).

    ``from pkg import name`` means module ``pkg.name`` when that exists, else ``pkg``.
    """
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.update(f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names)
    return {m for m in found if m in mods and m != module}


def import_graph() -> nx.DiGraph:
    """Modules as nodes, an edge for every import of one graphprune module by another."""
    mods = modules()
    graph = nx.DiGraph()
    for name, (path, is_pkg) in mods.items():
        graph.add_node(name)
        tree = ast.parse(path.read_text(), filename=str(path))
        graph.add_edges_from((name, target) for target in imported_modules(tree, name, is_pkg, mods))
    return graph


def test_layout_sees_the_modules() -> None:
    """The scan finds the modules and the imports it is meant to judge."""
    graph = import_graph()
    assert {"graphprune.cli", "graphprune.onnx_cli", "graphprune.passes_base", "graphprune.verify",
            "graphprune.frontends.fx", "graphprune.frontends.fx_build", "graphprune.passes.prune_channels"} <= set(graph)
    assert graph.has_edge("graphprune.cli", "graphprune.onnx_cli")  # a function-level import
    assert graph.has_edge("graphprune.frontends.fx", "graphprune.frontends.fx_build")
    assert graph.has_edge("graphprune.passes_base", "graphprune.passes")  # ``from . import passes``
    assert not graph.has_edge("graphprune.passes_base", "graphprune")


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = sorted(" -> ".join([*c, c[0]]) for c in nx.simple_cycles(graph))
    assert not cycles, "import cycles among graphprune modules:\n  " + "\n  ".join(cycles)


def test_no_class_over_400_lines() -> None:
    offenders = []
    for name, (path, _) in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            qualified = f"{name}.{node.name}"
            if lines > MAX_CLASS_LINES and qualified not in EXEMPT_CLASSES:
                offenders.append(f"{qualified} ({path.relative_to(ROOT)}:{node.lineno}): {lines} lines")
    assert not offenders, f"classes over {MAX_CLASS_LINES} lines:\n  " + "\n  ".join(sorted(offenders))
