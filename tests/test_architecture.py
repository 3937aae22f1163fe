"""The house's arrows point one way: no import circles, and the library never imports the CLI.

Imports are read from the source (every ``import``, also inside functions, except under
``TYPE_CHECKING``), so a circle hidden in a function-level import is caught too.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_files() -> dict[str, Path]:
    modules = {}
    for path in (SRC / "simfluence").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _module_files()


def _owner(name: str) -> str:
    """The module (or package) of the source tree that `name` lives in."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else ""


def _imports(path: Path) -> set[str]:
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(_owner(a.name) for a in node.names if a.name.startswith("simfluence"))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0 and node.module and node.module.startswith("simfluence"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(_owner(full) if full in MODULES else _owner(node.module))

    Visitor().visit(ast.parse(path.read_text()))
    return found


@cache
def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the tree it imports (a module importing a package that contains
    it is left out: that is how a subpackage reaches its own ``__init__``)."""
    graph = {}
    for name, path in MODULES.items():
        deps = _imports(path) - {"", name}
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    assert import_cycles(import_graph()) == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("simfluence.cli")))
def test_library_never_imports_the_command_line(name: str) -> None:
    if name == "simfluence.__main__":
        return  # `python -m simfluence` is the command line's own door
    assert not {d for d in import_graph()[name] if d.startswith("simfluence.cli")}


def _is_command(name: str) -> bool:
    """A command module of the CLI (``simfluence.cli.<command>``); shared helper modules start
    with ``_``."""
    prefix = "simfluence.cli."
    return name.startswith(prefix) and not name.removeprefix(prefix).startswith("_")


COMMANDS = sorted(n for n in MODULES if _is_command(n) and n != "simfluence.cli.main")


@pytest.mark.parametrize("name", COMMANDS)
def test_command_modules_never_import_each_other(name: str) -> None:
    """What two commands share lives in the library or a ``cli/_*`` helper (``main`` only
    gathers the commands)."""
    assert not {d for d in import_graph()[name] if _is_command(d)}


def test_command_check_catches_a_command_importing_another() -> None:
    graph = {"simfluence.cli.report": {"simfluence.cli.core", "simfluence.cli._args"}}
    assert {d for d in graph["simfluence.cli.report"] if _is_command(d)} == {"simfluence.cli.core"}
    assert COMMANDS and "simfluence.cli.report" in COMMANDS
    assert "simfluence.cli._args" not in COMMANDS and "simfluence.cli" not in COMMANDS
