"""The house's arrows point one way: no import circles, and the library never imports the CLI.

Imports are read from the source (every ``import``, also inside functions, except under
``TYPE_CHECKING``), so a circle hidden in a function-level import is caught too.
"""

from __future__ import annotations

import ast
import re
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


# -- one home for the paths of a run-set directory --------------------------------------------
LAYOUT = "simfluence.runlog.layout"
#: what spells out a path of a run-set directory, matched against every string literal (an
#: f-string reads with ``{}`` for each value); docstrings are prose and are not read
RUN_SET_PATHS = {
    "the manifest": re.compile(r"manifest\.json"),
    "the features file": re.compile(r"features\.npz"),
    "the truth file": re.compile(r"truth\.npz"),
    "a run file": re.compile(r"(\{\}|\*)\.parquet|^runs/"),
    "a checkpoint": re.compile(r"step-(\{\}|\d+|\*)?\.pt|^step-$|(^|/)checkpoints/"),
}
#: folder names that are a path when joined (``DIR / "checkpoints"``, ``os.path.join(DIR,
#: "checkpoints")``; not ``"runs"``: a run set is often itself a folder called ``runs``)
RUN_SET_FOLDERS = {"checkpoints"}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spelled_run_set_paths(source: str) -> list[str]:
    """The run-set paths a module's source spells out itself: ``'what' (line N)`` each."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    texts: list[tuple[str, int]] = []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
            texts.append(("".join(str(p) for p in parts), node.lineno))
        joined: list[ast.expr] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            joined = [node.right]
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.endswith("path.join"):
                joined = node.args[1:]
            elif func.endswith("joinpath"):
                joined = node.args
        for arg in joined:
            if isinstance(arg, ast.Constant) and arg.value in RUN_SET_FOLDERS:
                found.append(f"the {arg.value!r} folder (line {arg.lineno})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            texts.append((node.value, node.lineno))
    for text, line in texts:
        found += [f"{what} (line {line})" for what, p in RUN_SET_PATHS.items() if p.search(text)]
    return found


def test_the_path_finder_finds_planted_paths() -> None:
    planted = (
        '"""Docstrings may say DIR/manifest.json and checkpoints/RUN/step-0.pt."""\n'
        "import os\n"
        'a = os.path.join(d, "checkpoints", run_id, "step-0.pt")\n'
        'b = d / "runs" / f"{run_id}.parquet" / "checkpoints"\n'
        'c = f"{d}/features.npz"\n'
        "e = \"not a path: the step-0 checkpoint, a .parquet file, config['checkpoints']\"\n"
    )
    assert sorted(spelled_run_set_paths(planted)) == [
        "a checkpoint (line 3)",
        "a run file (line 4)",
        "the 'checkpoints' folder (line 3)",
        "the 'checkpoints' folder (line 4)",
        "the features file (line 5)",
    ]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != LAYOUT))
def test_only_the_layout_spells_out_run_set_paths(name: str) -> None:
    """Every path of a run-set directory (manifest, run files, features, truth, checkpoints)
    is spelled out in `simfluence.runlog.layout` only; the others ask it."""
    spelled = spelled_run_set_paths(MODULES[name].read_text())
    assert not spelled, f"{name} spells out {', '.join(spelled)}: use {LAYOUT}"


def test_the_layout_spells_out_every_run_set_path() -> None:
    spelled = " ".join(spelled_run_set_paths(MODULES[LAYOUT].read_text()))
    for what in ("the manifest", "the features file", "the truth file", "a checkpoint"):
        assert what in spelled


TESTS = Path(__file__).resolve().parent


def test_test_folders_mirror_the_packages() -> None:
    """Each folder under tests/ is named after the package (or module) of the library it tests,
    so the tests of `simfluence/simulators/featurized/` are found in
    `tests/simulators/featurized/`; test file names are unique across folders (pytest imports
    them by their base name) and none is left beside the shared helpers in tests/ that tests a
    single package."""
    folders = [p for p in TESTS.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert folders, "the tests are not organized in folders"
    for folder in folders:
        relative = folder.relative_to(TESTS)
        package = SRC / "simfluence" / relative
        assert package.is_dir() or package.with_suffix(".py").is_file(), (
            f"tests/{relative.as_posix()} mirrors no package of src/simfluence"
        )
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    single_package = {"runlog", "simulators", "recording", "attribution", "counterfactual", "cli"}
    for path in TESTS.glob("test_*.py"):
        stem = path.stem.removeprefix("test_")
        assert stem not in single_package, f"{path.name} belongs in tests/{stem}/"
