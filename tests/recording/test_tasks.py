"""Task references: a user's own Task named on the command line, stored in the run set, rebuilt
in another process; the optimizer recorded and the gradient methods' warning about it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from simfluence.cli.main import main
from simfluence.errors import SimfluenceError
from simfluence.recording import (
    RecordingProtocol,
    checkpoint_steps,
    record_runs,
    resolve_task,
    steps_per_run,
    task_for_runset,
    task_reference,
)
from simfluence.recording.workloads import DigitsMLPTask
from simfluence.runlog import load_runset, read_manifest, write_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_model" / "task.py"

#: a user's task file: linear regression on Gaussian features, SGD or Adam
TASK_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from simfluence.recording import Examples, Task, TaskDefaults

    class Regression(Task):
        name = "user-regression"
        defaults = TaskDefaults(runs=4, pool=16, per_run=8, tests=5, batch=2, epochs=2, lr=0.05)

        def __init__(self, features=3, optimizer="sgd"):
            self.features = features
            self.optimizer = optimizer

        def prepare(self, pool, tests, seed):
            gen = torch.Generator().manual_seed(1000 + seed)
            x = torch.randn(pool + tests, self.features, generator=gen, dtype=torch.float64)
            y = x.sum(1) + 0.1 * torch.randn(pool + tests, generator=gen, dtype=torch.float64)
            every = Examples([f"ex-{i}" for i in range(pool + tests)], {"x": x, "y": y})
            return every.subset(range(pool)), every.subset(range(pool, pool + tests))

        def make_model(self, seed):
            torch.manual_seed(seed)
            return nn.Linear(self.features, 1, dtype=torch.float64)

        def example_losses(self, model, inputs):
            return (model(inputs["x"]).squeeze(-1) - inputs["y"]) ** 2

        def make_optimizer(self, model, lr):
            if self.optimizer == "adam":
                return torch.optim.Adam(model.parameters(), lr=lr)
            return torch.optim.SGD(model.parameters(), lr=lr)

    class NotATask:
        pass

    if __name__ == "__main__":
        raise SystemExit("loading by path must not run the script's main block")
    """
)


@pytest.fixture()
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_tasks" / "regression.py"
    path.parent.mkdir()
    path.write_text(TASK_SOURCE)
    return path


# -- resolving --------------------------------------------------------------------------------
def test_every_form_of_reference_resolves(task_file: Path, tmp_path: Path, monkeypatch) -> None:
    assert type(resolve_task("digits-mlp")) is DigitsMLPTask
    module_ref = "simfluence.recording.workloads.digits_mlp:DigitsMLPTask"
    assert resolve_task(module_ref, {"hidden": 7}).hidden == 7
    task = resolve_task(f"{task_file}:Regression", {"features": 4})
    assert task.name == "user-regression" and task.features == 4
    # the same file is executed once per process: the same class comes back
    assert type(resolve_task(f"{task_file}:Regression")) is type(task)
    # an installed plugin: a distribution on sys.path declaring a simfluence.tasks entry point
    dist = tmp_path / "site" / "userplugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[simfluence.tasks]\n"
        f"digits-plugin = {module_ref}\n"
        "broken-plugin = userplugin_not_installed.tasks:Task\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert type(resolve_task("digits-plugin")) is DigitsMLPTask  # the broken one is not loaded
    with pytest.raises(SimfluenceError, match=r"'broken-plugin'.*no module named 'userplugin_not"):
        resolve_task("broken-plugin")
    with pytest.raises(SimfluenceError, match=r"unknown task 'nope'.*broken-plugin, digits-plug"):
        resolve_task("nope")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope", r"unknown task 'nope': not a built-in workload \(digits-logreg, digits-mlp"),
        ("{file}:NotATask", r"is not a subclass of simfluence.recording.Task"),
        ("{file}:Missing", r"has no attribute 'Missing'"),
        ("{dir}/absent.py:Regression", r"no such file"),
        ("no_such_package_xyz.tasks:Task", r"no module named 'no_such_package_xyz'.*pip install"),
        ("simfluence.recording.task:Task", r"does not implement example_losses"),
        ("{broken}:Task", r"needs 'missing_dependency_xyz', which is not installed"),
        ("{syntax}:Task", r"executing .*SyntaxError"),
    ],
)
def test_bad_references_fail_in_one_line(task_file: Path, ref: str, message: str) -> None:
    broken = task_file.parent / "broken.py"
    broken.write_text("import missing_dependency_xyz\n")
    syntax = task_file.parent / "syntax.py"
    syntax.write_text("class Task(:\n")
    ref = ref.format(file=task_file, dir=task_file.parent, broken=broken, syntax=syntax)
    with pytest.raises(SimfluenceError, match=message) as info:
        resolve_task(ref)
    assert "\n" not in str(info.value)


def test_constructor_arguments_can_be_refused(task_file: Path) -> None:
    with pytest.raises(SimfluenceError, match=r"cannot be built with \{'nope': 1\}"):
        resolve_task(f"{task_file}:Regression", {"nope": 1})
    with pytest.raises(SimfluenceError, match=r"cannot be built with .*expected 'sgd' or 'adam'"):
        resolve_task(f"{EXAMPLE}:BreastCancerTask", {"optimizer": "rmsprop"})


# -- writing a reference ----------------------------------------------------------------------
def test_task_reference_reads_constructor_arguments_back(task_file: Path) -> None:
    task = resolve_task(f"{task_file}:Regression", {"features": 2, "optimizer": "adam"})
    spec = task_reference(task)
    assert spec == {
        "ref": f"{task_file.resolve()}:Regression",
        "kwargs": {"features": 2, "optimizer": "adam"},
    }
    rebuilt = resolve_task(spec["ref"], spec["kwargs"])
    assert (rebuilt.features, rebuilt.optimizer) == (2, "adam")
    assert task_reference(DigitsMLPTask(hidden=8)) == {"ref": "digits-mlp", "kwargs": {"hidden": 8}}
    relative = task_reference(task, "regression.py:Regression")
    assert Path(relative["ref"].rpartition(":")[0]).is_absolute()


def test_task_reference_says_why_a_task_cannot_be_rebuilt(task_file: Path) -> None:
    cls = type(resolve_task(f"{task_file}:Regression"))

    class Local(cls):  # type: ignore[misc,valid-type]
        pass

    with pytest.raises(SimfluenceError, match="inside a function"):
        task_reference(Local())

    class Renamed(cls):  # type: ignore[misc,valid-type]
        def __init__(self, width: int = 3) -> None:
            super().__init__(features=width)

    Renamed.__qualname__ = "Renamed"
    with pytest.raises(SimfluenceError, match=r"'width' is not stored as self.width"):
        task_reference(Renamed())
    task = cls()
    task.features = object()
    with pytest.raises(SimfluenceError, match="not JSON-able"):
        task_reference(task)


# -- recording and rebuilding -----------------------------------------------------------------
def test_record_defaults_to_the_task_protocol_and_stores_the_reference(
    task_file: Path, tmp_path: Path
) -> None:
    task = resolve_task(f"{task_file}:Regression")
    runs = record_runs(task, tmp_path / "runs", progress=False)
    d = task.defaults
    config = runs.metadata["config"]
    n_steps = steps_per_run(d.per_run, d.batch, d.epochs)
    assert len(runs.runs) == d.runs and config["pool"] == d.pool and config["lr"] == d.lr
    assert config["checkpoints"] == checkpoint_steps(n_steps) == [0, 3, 5, 8]
    assert config["optimizer"]["name"] == "SGD" and config["optimizer"]["lr"] == d.lr
    assert config["optimizer"]["momentum"] == 0
    assert runs.metadata["task_spec"] == {
        "ref": f"{task_file.resolve()}:Regression",
        "kwargs": {"features": 3, "optimizer": "sgd"},
    }
    # resuming with nothing given keeps what was recorded; other arguments are refused
    again = record_runs(task, tmp_path / "runs", progress=False)
    assert again.run_ids == runs.run_ids
    with pytest.raises(SimfluenceError, match="other constructor arguments"):
        record_runs(type(task)(features=3, optimizer="sgd "), tmp_path / "runs", progress=False)
    with pytest.raises(SimfluenceError, match=r"optimizer\.name: 'SGD' there, 'Adam' now"):
        record_runs(type(task)(features=3, optimizer="adam"), tmp_path / "runs", progress=False)


def test_task_for_runset_old_manifests_overrides_and_moved_files(
    task_file: Path, tmp_path: Path
) -> None:
    options = dict(runs=2, pool=20, per_run=8, tests=4, batch=4, epochs=1)
    legacy = tmp_path / "legacy"
    record_runs(DigitsMLPTask(), legacy, RecordingProtocol(**options), progress=False)
    manifest = read_manifest(legacy)
    meta = manifest["metadata"]
    del meta["task_spec"], meta["config"]["optimizer"]  # as recorded before this change
    write_manifest(legacy, manifest["train_ids"], manifest["test_ids"], meta)
    assert type(task_for_runset(load_runset(legacy))) is DigitsMLPTask
    protocol = RecordingProtocol(**{**options, "runs": 3})
    runs = record_runs(DigitsMLPTask(), legacy, protocol, progress=False)  # resumes
    assert len(runs.runs) == 3 and runs.metadata["task_spec"]["ref"] == "digits-mlp"
    assert "optimizer" not in runs.metadata["config"]  # no claim about the old runs
    with pytest.raises(SimfluenceError, match=r"is task 'newsgroups-minilm', but .* 'digits-mlp'"):
        task_for_runset(runs, "newsgroups-minilm")

    moved = tmp_path / "moved"
    record_runs(resolve_task(f"{task_file}:Regression", {"features": 5}), moved, progress=False)
    new_place = tmp_path / "elsewhere.py"
    task_file.rename(new_place)
    runs = load_runset(moved)
    with pytest.raises(SimfluenceError, match=r"moved: .*no such file.*pass --task REF"):
        task_for_runset(runs)
    task = task_for_runset(runs, f"{new_place}:Regression")
    assert task.features == 5  # the recorded constructor arguments are kept


def test_gradient_methods_warn_once_about_an_adam_recording(
    task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{task_file}:Regression"
    for name, kwargs in (("sgd", "{}"), ("adam", '{"optimizer": "adam"}')):
        argv = ["record", str(tmp_path / name), "--task", ref, "--task-kwargs", kwargs]
        assert main([*argv, "--runs", "6", "--no-progress"]) == 0
    adam = load_runset(tmp_path / "adam").metadata["config"]["optimizer"]
    assert adam["name"] == "Adam" and adam["betas"] == [0.9, 0.999]
    capsys.readouterr()
    results = {}
    for name in ("sgd", "adam"):
        out = tmp_path / f"{name}.json"
        argv = ["evaluate", str(tmp_path / name), "--methods", "linear,tracin-cp-scaled"]
        assert main([*argv, "--holdout", "2", "--json", str(out)]) == 0
        results[name] = (json.loads(out.read_text()), capsys.readouterr().out)
    sgd, sgd_table = results["sgd"]
    adam, adam_table = results["adam"]
    assert sgd["methods"]["tracin-cp-scaled"]["warnings"] == [] and "warning" not in sgd_table
    assert adam["methods"]["linear"]["warnings"] == []
    # Adam runs with a step-0 checkpoint: TracIn uses Adam's replayed preconditioner, no warning
    assert adam["methods"]["tracin-cp-scaled"]["warnings"] == []
    assert "warning: tracin-cp-scaled" not in adam_table
    assert np.isfinite(adam["methods"]["tracin-cp-scaled"]["all_steps_mse"])


def test_only_sgd_without_momentum_counts_as_plain_sgd() -> None:
    """The gradient formulas model plain SGD: SGD with momentum (Nesterov or not) and Adam are
    not, and the warning names the optimizer and its non-zero settings."""
    import torch

    from simfluence.attribution.simulators import is_plain_sgd, optimizer_warnings
    from simfluence.recording.optim import optimizer_spec

    params = [torch.zeros(2, requires_grad=True)]
    plain = optimizer_spec(torch.optim.SGD(params, lr=0.1))
    momentum = optimizer_spec(torch.optim.SGD(params, lr=0.1, momentum=0.9))
    nesterov = optimizer_spec(torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True))
    adam = optimizer_spec(torch.optim.Adam(params, lr=0.1))
    assert [is_plain_sgd(o) for o in (plain, momentum, nesterov, adam)] == [
        True,
        False,
        False,
        False,
    ]
    assert optimizer_warnings("grad-dot", plain) == optimizer_warnings("grad-dot", None) == []
    (warning,) = optimizer_warnings("grad-dot", momentum)
    assert warning.startswith("grad-dot: the runs were trained with SGD (lr 0.1, momentum 0.9),")
