"""The README's Python examples run as written: every name they use is defined by an
earlier line (fast, static), and the blocks execute in order (``-m zoo``: they trace
torchvision and YOLO models and fine-tune)."""
from __future__ import annotations

import ast
import builtins
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks() -> list[tuple[int, str]]:
    """``(first line number, source)`` of every ```python block, in order."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return out


class _Names(ast.NodeVisitor):
    """Names a block defines and the names it reads before any definition."""

    def __init__(self, defined: set[str]) -> None:
        self.defined = defined
        self.undefined: list[tuple[str, int]] = []

    def _bind(self, target: ast.AST) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                self.defined.add(node.id)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.defined.add((a.asname or a.name).split(".")[0])

    visit_ImportFrom = visit_Import  # type: ignore[assignment]

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self._bind(t)

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._bind(node.target)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.defined.add(node.name)
        inner = _Names(self.defined | {a.arg for a in node.args.args + node.args.kwonlyargs})
        for stmt in node.body:
            inner.visit(stmt)
        self.undefined += inner.undefined

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self.visit(node.iter)
        self._bind(node.target)

    def visit_ListComp(self, node: ast.ListComp) -> None:
        for g in node.generators:
            self.visit_comprehension(g)
        self.visit(node.elt)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and node.id not in self.defined and not hasattr(builtins, node.id):
            self.undefined.append((node.id, node.lineno))


def test_readme_python_uses_no_undefined_name() -> None:
    defined: set[str] = set()
    problems = []
    for first, src in readme_blocks():
        visitor = _Names(defined)
        visitor.visit(ast.parse(src))
        problems += [f"README.md:{first + line - 1}: `{name}` is not defined" for name, line in visitor.undefined]
    assert not problems, "\n".join(problems)


def test_the_name_check_catches_an_undefined_name() -> None:
    visitor = _Names(set())
    visitor.visit(ast.parse("import torch\ny = torch.relu(x)\nfor i in range(3):\n    z = i + y\n"))
    assert visitor.undefined == [("x", 2)]


@pytest.mark.zoo
def test_readme_python_blocks_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for first, src in readme_blocks():
        try:
            exec(compile(src, f"README.md:{first}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message names the block
            raise AssertionError(f"README block at line {first} failed: {type(exc).__name__}: {exc}") from exc
    assert os.listdir(tmp_path)
