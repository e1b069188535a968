"""The Python package's modules import one another without circles.

Imports inside functions count (they are how start-up time is kept low, and a circle through
them is still a circle a reader has to untangle); imports under ``if TYPE_CHECKING:`` do not
(type checkers only). Records and drawing code are leaves, so that :mod:`qcow2ovl.image` never
depends on the modules that consume an image.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "qcow2ovl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules *path* imports at run time (anywhere in the file)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    # `from qcow2ovl import x` names the submodule x, not the package's __init__.
    return {m for m in found if m in modules and m not in (name, "qcow2ovl")}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, name, modules) for name, path in paths.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk meets, each as the list of modules around it."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def walk(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append([*stack[stack.index(node) :], node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            walk(nxt, [*stack, node])
        done.add(node)

    for node in sorted(graph):
        walk(node, [])
    return cycles


def test_the_walk_finds_a_circle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circles() -> None:
    graph = import_graph()
    assert "qcow2ovl.records" in graph and graph["qcow2ovl.image"], graph
    assert find_cycles(graph) == []


def test_image_does_not_import_its_consumers() -> None:
    graph = import_graph()
    consumers = {"qcow2ovl.check", "qcow2ovl.picture", "qcow2ovl.fleet", "qcow2ovl.cli"}
    assert graph["qcow2ovl.image"].isdisjoint(consumers), graph["qcow2ovl.image"]
    assert graph["qcow2ovl.records"] <= {"qcow2ovl._frozen"}, graph["qcow2ovl.records"]
    assert graph["qcow2ovl._layout_svg"] <= {"qcow2ovl.types"}, graph["qcow2ovl._layout_svg"]
