"""The trust model for task code (`simfluence.trust`): a run set's manifest may name a task file
or module, and no command imports it without the user's consent.

A hostile run set is a tiny recorded one with a ``task.py`` dropped into it that writes a marker
file when imported, and its manifest pointed at that file. Every command that rebuilds a run
set's task (record resuming, evaluate and fit with a gradient method, features, validate,
attribute, report) must refuse it in one line naming the reference and ``--trust-task``, without
importing it; ``optimize`` and ``simulate`` never import a task (they read simulator files).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from exact_tasks import LinearLossTask

from simfluence._resolve import file_module_name
from simfluence.cli.main import main
from simfluence.errors import SimfluenceError
from simfluence.recording.protocol import RecordingProtocol
from simfluence.recording.record import record_runs
from simfluence.recording.tasks import task_for_runset
from simfluence.runlog import load_runset, read_manifest
from simfluence.runlog.store import write_manifest
from simfluence.trust import (
    allow_list_path,
    check_task_trusted,
    needs_consent,
    remember_trusted,
    trusting_tasks,
)

SMALL = dict(runs=3, pool=8, per_run=4, tests=3, batch=2, epochs=1)
MARKER = "imported.marker"
HOSTILE = f"""\
from pathlib import Path

Path(__file__).with_name({MARKER!r}).write_text("imported")

from exact_tasks import LinearLossTask


class Evil(LinearLossTask):
    pass
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("trust") / "runs"
    record_runs(
        LinearLossTask(), directory, RecordingProtocol(**SMALL, checkpoints=[0, 2]), progress=False
    )
    return directory


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty allow-list of this test's own."""
    folder = tmp_path / "config"
    monkeypatch.setenv("SIMFLUENCE_CONFIG_DIR", str(folder))
    monkeypatch.delenv("SIMFLUENCE_TRUST_TASK", raising=False)
    return folder


def hostile_copy(recorded: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the run set whose manifest names ``task.py:Evil`` inside it; (dir, ref)."""
    directory = tmp_path / "hostile"
    shutil.copytree(recorded, directory)
    task_file = directory / "task.py"
    task_file.write_text(HOSTILE)
    manifest = read_manifest(directory)
    meta = manifest["metadata"]
    ref = f"{task_file}:Evil"
    meta["task_spec"] = {"ref": ref, "kwargs": {}}
    write_manifest(directory, manifest["train_ids"], manifest["test_ids"], meta)
    return directory, ref


def commands(directory: Path, tmp_path: Path) -> dict[str, list[str]]:
    runs = load_runset(directory)
    d = str(directory)
    return {
        "record": ["record", d, "--no-progress"],
        "evaluate": ["evaluate", d, "--methods", "tracin-cp,mean", "--holdout", "1"],
        "fit": ["fit", d, "--method", "grad-dot", "-o", str(tmp_path / "m.npz")],
        "features": ["features", d],
        "validate": ["validate", d, "--methods", "mean", "--curricula", "1"],
        "attribute": [
            "attribute",
            "--runs",
            d,
            "--run",
            runs.run_ids[0],
            "--test",
            runs.test_ids[0],
            "--method",
            "unrolled",
        ],
        "report": ["report", d, "--methods", "tracin-cp", "-o", str(tmp_path / "r.html")],
    }


COMMANDS = ["record", "evaluate", "fit", "features", "validate", "attribute", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_imports_a_manifests_task_code_without_consent(
    command: str, recorded: Path, tmp_path: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    directory, ref = hostile_copy(recorded, tmp_path)
    capsys.readouterr()
    assert main(commands(directory, tmp_path)[command]) == 2
    err = capsys.readouterr().err.strip()
    assert not (directory / MARKER).exists()
    assert "\n" not in err and err.startswith(f"simfluence {command}: error:")
    assert ref in err and "--trust-task" in err and "SIMFLUENCE_TRUST_TASK=1" in err
    assert file_module_name(directory / "task.py") not in sys.modules


@pytest.mark.parametrize("command", ["features", "evaluate", "fit"])
def test_trust_task_imports_it(
    command: str, recorded: Path, tmp_path: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    directory, _ = hostile_copy(recorded, tmp_path)
    assert main([*commands(directory, tmp_path)[command], "--trust-task"]) == 0
    assert (directory / MARKER).read_text() == "imported"


def test_the_environment_variable_and_the_library_opt_in(
    recorded: Path, tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, ref = hostile_copy(recorded, tmp_path)
    runs = load_runset(directory)
    with pytest.raises(SimfluenceError, match="--trust-task"):
        task_for_runset(runs)
    with trusting_tasks(False), pytest.raises(SimfluenceError, match="not recorded or trusted"):
        task_for_runset(runs)
    monkeypatch.setenv("SIMFLUENCE_TRUST_TASK", "1")
    assert type(task_for_runset(runs)).__name__ == "Evil"
    assert (directory / MARKER).exists()
    # imported once, importing it again runs nothing: no consent needed any more
    monkeypatch.delenv("SIMFLUENCE_TRUST_TASK")
    assert not needs_consent(ref)
    other, _ = hostile_copy(recorded, tmp_path / "b")
    assert type(task_for_runset(load_runset(other), trust=True)).__name__ == "Evil"
    other2, _ = hostile_copy(recorded, tmp_path / "c")
    with trusting_tasks():
        assert type(task_for_runset(load_runset(other2))).__name__ == "Evil"


def test_a_task_recorded_here_is_trusted_until_its_file_changes(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    task_file = tmp_path / "mine" / "task.py"
    task_file.parent.mkdir()
    task_file.write_text(HOSTILE)
    directory = tmp_path / "runs"
    small = ["--runs", "2", "--pool", "8", "--per-run", "4", "--tests", "3", "--batch", "2"]
    assert main(["record", str(directory), "--task", f"{task_file}:Evil", *small]) == 0
    ref = f"{task_file.resolve()}:Evil"
    listed = json.loads(allow_list_path().read_text())["tasks"]
    assert [e["ref"] for e in listed] == [ref] and len(listed[0]["sha256"]) == 64
    # a later process (the module not yet imported) imports it without asking
    del sys.modules[file_module_name(task_file)]
    (task_file.parent / MARKER).unlink()
    assert main(["features", str(directory)]) == 0
    assert (task_file.parent / MARKER).exists()
    # the file changes: ask again, and say why
    del sys.modules[file_module_name(task_file)]
    (task_file.parent / MARKER).unlink()
    task_file.write_text(HOSTILE + "\nprint('changed')\n")
    capsys.readouterr()
    assert main(["features", str(directory)]) == 2
    err = capsys.readouterr().err
    assert "changed since it was trusted" in err and not (task_file.parent / MARKER).exists()
    # recording it again trusts the new content
    assert remember_trusted(ref)
    check_task_trusted(ref, "manifest")
    assert len(json.loads(allow_list_path().read_text())["tasks"]) == 1


def test_the_rules(tmp_path: Path, config: Path) -> None:
    task_file = tmp_path / "t.py"
    task_file.write_text("raise SystemExit('never imported')\n")
    ref = f"{task_file}:T"
    for trusted in ["digits-mlp", "some-plugin-name", "simfluence.recording.workloads:X"]:
        assert not needs_consent(trusted)
        check_task_trusted(trusted, "manifest")
    assert not remember_trusted("digits-mlp") and not allow_list_path().exists()
    check_task_trusted(ref, "command-line")  # the user named it
    check_task_trusted(ref, "manifest", trust=True)
    for untrusted in [ref, "some_unimported_module_xyz.tasks:T"]:
        assert needs_consent(untrusted)
        with pytest.raises(SimfluenceError, match="--trust-task") as caught:
            check_task_trusted(untrusted, "manifest", where="runs")
        assert str(caught.value).startswith(f"runs: its manifest names task code {untrusted!r}")
    assert not needs_consent(f"{tmp_path / 'gone.py'}:T")  # no file: nothing to run
    # a hand-written entry without sha256 trusts the reference whatever the file holds
    config.mkdir()
    allow_list_path().write_text(json.dumps({"version": 1, "tasks": [{"ref": str(ref)}]}))
    check_task_trusted(ref, "manifest")
    task_file.write_text("# changed\n")
    check_task_trusted(ref, "manifest")
    allow_list_path().write_text("{not json")
    with pytest.raises(SimfluenceError, match=r"allow-list .*trusted\.json: not readable JSON"):
        check_task_trusted(ref, "manifest")
    assert not remember_trusted(ref)  # a malformed allow-list is left alone
    assert allow_list_path().read_text() == "{not json"


def test_a_module_reference_is_hashed_without_importing_it(
    tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "pkg_trust_probe"
    package.mkdir()
    (package / "__init__.py").write_text("raise SystemExit('the package was imported')\n")
    (package / "tasks.py").write_text("raise SystemExit('the module was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = "pkg_trust_probe.tasks:T"
    with pytest.raises(SimfluenceError, match="a module"):
        check_task_trusted(ref, "manifest")
    assert remember_trusted(ref)
    check_task_trusted(ref, "manifest")
    (package / "tasks.py").write_text("# changed\n")
    with pytest.raises(SimfluenceError, match="changed since"):
        check_task_trusted(ref, "manifest")
    assert "pkg_trust_probe" not in sys.modules
