"""The examples, end to end through the command line, as the README's "Your own model" shows:
the own-model Task file through record, evaluate (a gradient method included), validate and
report; validate's JSON byte-identical between two identical calls; the HF Trainer example."""

from __future__ import annotations

import inspect
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from simfluence.cli.main import build_parser, main
from simfluence.counterfactual.search import optimize_curriculum
from simfluence.recording.validation import make_curricula, validate
from simfluence.runlog import load_runset

# these tests record (or train) through the command line in a subprocess
pytestmark = pytest.mark.workers

ROOT = Path(__file__).resolve().parents[1]
TASK_REF = "examples/own_model/task.py:BreastCancerTask"  # relative, as a user types it
SMALL = [
    "--runs",
    "6",
    "--pool",
    "48",
    "--per-run",
    "16",
    "--tests",
    "10",
    "--epochs",
    "2",
    "--no-progress",
]
METHODS = "linear,tracin-cp-scaled,mean"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simfluence", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The own-model example recorded by `simfluence record --task FILE:Class`."""
    directory = tmp_path_factory.mktemp("own-model") / "runs"
    done = run_cli("record", str(directory), "--task", TASK_REF, *SMALL, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "recorded 6 runs x 8 steps of breast-cancer-mlp" in done.stdout
    return directory


def test_own_model_example_end_to_end(
    recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_runset(recorded).metadata["task_spec"]
    assert spec == {
        "ref": f"{ROOT / 'examples' / 'own_model' / 'task.py'}:BreastCancerTask",
        "kwargs": {"hidden": 16, "optimizer": "sgd"},
    }
    # elsewhere, in a process that never saw the task file: found from the manifest alone
    monkeypatch.chdir(tmp_path)
    evaluation = tmp_path / "eval.json"
    args = ["evaluate", str(recorded), "--methods", METHODS, "--holdout", "2"]
    assert main([*args, "--json", str(evaluation)]) == 0
    result = json.loads(evaluation.read_text())
    assert set(result["methods"]) == set(METHODS.split(",")) and result["failed"] == {}
    for name, scores in result["methods"].items():
        assert math.isfinite(scores["all_steps_mse"]) and scores["warnings"] == [], name
    assert result["methods"]["linear"]["final_step_spearman"] > 0.5

    validation = tmp_path / "validation.json"
    args = ["validate", str(recorded), "--kinds", "random,optimized", "--curricula", "3"]
    assert main([*args, "--methods", METHODS, "--json", str(validation)]) == 0
    checked = json.loads(validation.read_text())
    assert set(checked["kinds"]) == {"random", "optimized"}
    assert set(checked["kinds"]["random"]["methods"]) == set(METHODS.split(","))
    assert 0.0 <= checked["optimized"]["fraction_of_random_beaten"] <= 1.0

    report = tmp_path / "report.html"
    args = ["report", str(recorded), "--methods", METHODS, "--holdout", "2"]
    assert main([*args, "--validation", str(validation), "-o", str(report)]) == 0
    html = report.read_text()
    assert "tracin-cp-scaled" in html and "breast-cancer-mlp" in html


def _without_timing(path: Path) -> bytes:
    """The file's bytes with its last key, the wall-clock ``"timing"`` object, cut off."""
    raw = path.read_bytes()
    assert list(json.loads(raw))[-1] == "timing"
    cut = raw[: raw.rindex(b',\n  "timing": ')] + b"\n}\n"
    assert json.loads(cut)
    return cut


def test_validate_twice_gives_byte_identical_json(recorded: Path, tmp_path: Path) -> None:
    """Searches are bounded by rollouts, not seconds: 1500 stops these searches (which run
    about 6000 to 9000 before they stop improving) at the same point on any machine."""
    outputs = [tmp_path / "first.json", tmp_path / "second.json"]
    for out in outputs:
        args = ["validate", str(recorded), "--kinds", "random,optimized", "--curricula", "3"]
        args += ["--methods", "linear,mean", "--search-evaluations", "1500"]
        assert main([*args, "--json", str(out)]) == 0
    first, second = (_without_timing(out) for out in outputs)
    assert first == second
    assert json.loads(first)["search_evaluations"] == 1500


def test_hf_trainer_example_records_runs_the_simulators_evaluate(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    example = runpy.run_path(str(ROOT / "examples" / "hf_trainer" / "train.py"))
    directory = tmp_path / "runs-hf"
    argv = [str(directory), "--runs", "4", "--pool", "40", "--per-run", "12", "--tests", "8"]
    example["main"]([*argv, "--epochs", "1"])
    runs = load_runset(directory)
    assert len(runs.runs) == 4
    for run in runs.runs:  # 12 examples, each once, in batches of 4
        assert [len(b) for b in run.curriculum] == [4, 4, 4]
        assert len({i for b in run.curriculum for i in b}) == 12
    out = tmp_path / "eval.json"
    argv = ["evaluate", str(directory), "--methods", "linear,mean", "--holdout", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["methods"]) == {"linear", "mean"}


def test_hf_trainer_example_on_trainers_defaults(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    example = runpy.run_path(str(ROOT / "examples" / "hf_trainer" / "train.py"))
    directory = tmp_path / "runs-hf"
    argv = [str(directory), "--runs", "2", "--pool", "40", "--per-run", "12", "--tests", "8"]
    example["main"]([*argv, "--epochs", "1", "--trainer-defaults"])
    for run in load_runset(directory).runs:  # AdamW at 0.01, decayed linearly toward 0
        assert run.lr is not None and run.lr[0] == pytest.approx(0.01)
        assert list(run.lr) == sorted(run.lr, reverse=True) and run.lr[-1] < run.lr[0]


def test_searches_are_bounded_by_work_unless_a_time_limit_is_asked_for() -> None:
    for fn, name in (
        (optimize_curriculum, "max_seconds"),
        (validate, "search_seconds"),
        (make_curricula, "search_seconds"),
    ):
        assert inspect.signature(fn).parameters[name].default is None, fn.__name__
    parser = build_parser()
    optimize = parser.parse_args(["optimize", "m.npz", "--size", "4", "-o", "o.json"])
    assert optimize.max_seconds is None and optimize.budget == 200_000
    assert parser.parse_args(["validate", "runs"]).search_seconds is None


def test_own_model_task_file_records_with_workers(recorded: Path, tmp_path: Path) -> None:
    """Worker processes rebuild a user's Task from its file reference (the manifest's
    task_spec): `--workers 2` records the same run set as the serial recording, bit for bit."""
    import numpy as np

    target = tmp_path / "workers"
    done = run_cli("record", str(target), "--task", TASK_REF, *SMALL, "--workers", "2", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "(process:2)" in done.stdout
    serial, parallel = load_runset(recorded), load_runset(target)
    assert serial.metadata == parallel.metadata
    for a, b in zip(serial.runs, parallel.runs, strict=True):
        assert a.curriculum == b.curriculum and np.array_equal(a.losses, b.losses)
