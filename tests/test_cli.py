"""The command line end to end, and user mistakes as one line without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simfluence.cli.main import main
from simfluence.runlog import load_runset

SYNTH = [
    "--pool",
    "40",
    "--tests",
    "6",
    "--runs",
    "8",
    "--per-run",
    "24",
    "--batch",
    "4",
    "--epochs",
    "2",
    "--seed",
    "5",
]


@pytest.fixture()
def runs_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "runs"
    assert main(["synth", str(directory), *SYNTH]) == 0
    return directory


def test_synth_fit_simulate(
    runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = load_runset(runs_dir)
    assert len(runs.runs) == 8 and runs.runs[0].n_steps == 12
    model = tmp_path / "linear.npz"
    assert (
        main(["fit", str(runs_dir), "--method", "linear", "--holdout", "2", "-o", str(model)]) == 0
    )
    assert "holding out 2 runs: run-0006, run-0007" in capsys.readouterr().out
    curriculum = tmp_path / "c.json"
    curriculum.write_text(json.dumps(runs.runs[-1].curriculum))
    out = tmp_path / "pred.json"
    plot = tmp_path / "pred.png"
    args = [
        "simulate",
        str(model),
        "--curriculum",
        str(curriculum),
        "-o",
        str(out),
        "--plot",
        str(plot),
    ]
    assert main(args) == 0
    pred = json.loads(out.read_text())
    assert pred["test_ids"] == runs.test_ids
    assert np.array(pred["loss"]).shape == (13, 6)
    assert plot.stat().st_size > 1000
    initial = tmp_path / "l0.json"
    initial.write_text(json.dumps({t: 1.0 for t in runs.test_ids}))
    csv_out = tmp_path / "pred.csv"
    args = [
        "simulate",
        str(model),
        "--curriculum",
        str(curriculum),
        "--initial-loss",
        str(initial),
        "-o",
        str(csv_out),
    ]
    assert main(args) == 0
    rows = csv_out.read_text().splitlines()
    assert rows[0].split(",")[0] == "step" and rows[1].split(",")[1] == "1"


def test_evaluate_writes_the_json_contract(runs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    plot = tmp_path / "eval.png"
    args = [
        "evaluate",
        str(runs_dir),
        "--methods",
        "linear,additive,persistence,mean,truth",
        "--holdout",
        "2",
        "--json",
        str(out),
        "--plot",
        str(plot),
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["heldout_runs"] == ["run-0006", "run-0007"]
    assert len(result["train_runs"]) == 6
    assert set(result["methods"]) == {"linear", "additive", "persistence", "mean", "truth"}
    for scores in result["methods"].values():
        for key in (
            "all_steps_mse",
            "all_steps_mae",
            "final_step_mse",
            "final_step_spearman",
            "final_step_spearman_std",
            "fit_seconds",
        ):
            assert np.isfinite(scores[key])
    assert plot.stat().st_size > 1000


def test_gptfluence_commands_round_trip(runs_dir: Path, tmp_path: Path) -> None:
    assert main(["export-gptfluence", str(runs_dir), str(tmp_path / "gpt")]) == 0
    assert (tmp_path / "gpt" / "run-0000" / "all_loss_trajectory.out").exists()
    assert main(["import-gptfluence", str(tmp_path / "gpt"), str(tmp_path / "back")]) == 0
    original, back = load_runset(runs_dir), load_runset(tmp_path / "back")
    for run in original.runs:
        np.testing.assert_array_equal(back.run(run.run_id).losses, run.losses)
        assert back.run(run.run_id).curriculum == run.curriculum
    assert back.train_ids == original.train_ids and back.test_ids == original.test_ids


def test_import_gptfluence_names_a_non_integer_id(tmp_path: Path) -> None:
    run_dir = tmp_path / "gpt" / "run-seed-1"
    run_dir.mkdir(parents=True)
    (run_dir / "train_samples_id.json").write_text(
        '{"step": 1, "samples_id": [0, 1]}\n{"step": 2, "samples_id": ["x", 1]}\n'
    )
    traj = [{"step": s, "loss": 1.0} for s in (0, 1, 2)]
    (run_dir / "all_loss_trajectory.out").write_text(
        json.dumps({"id": 0, "loss_trajectory": traj}) + "\n"
    )
    done = run_cli("import-gptfluence", str(tmp_path / "gpt"), str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert f"{run_dir / 'train_samples_id.json'}: line 2:" in done.stderr
    assert "'x'" in done.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simfluence", *args], capture_output=True, text=True, check=False
    )


def test_user_mistakes_exit_nonzero_with_one_line(runs_dir: Path, tmp_path: Path) -> None:
    cases = [
        (["evaluate", str(tmp_path / "missing")], "no such run-set directory"),
        (
            ["fit", str(runs_dir), "--method", "nope", "-o", str(tmp_path / "m.npz")],
            "unknown method 'nope'",
        ),
        (["evaluate", str(runs_dir), "--holdout", "8"], "--holdout 8: must be between 1 and 7"),
        (
            ["simulate", str(tmp_path / "none.npz"), "--curriculum", "x", "-o", "y"],
            "no such simulator file",
        ),
    ]
    for args, message in cases:
        done = run_cli(*args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_bad_curriculum_file_names_the_step(runs_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.npz"
    assert main(["fit", str(runs_dir), "--method", "additive", "--l2", "1", "-o", str(model)]) == 0
    curriculum = tmp_path / "c.json"
    curriculum.write_text(json.dumps([["train-1"], ["not-an-id"]]))
    done = run_cli(
        "simulate", str(model), "--curriculum", str(curriculum), "-o", str(tmp_path / "o")
    )
    assert done.returncode == 2
    assert "step 2: unknown training id 'not-an-id'" in done.stderr
    curriculum.write_text("[[")
    done = run_cli(
        "simulate", str(model), "--curriculum", str(curriculum), "-o", str(tmp_path / "o")
    )
    assert done.returncode == 2 and "not valid JSON" in done.stderr


def test_core_and_command_line_never_import_torch() -> None:
    """The arrows point one way: the core (and the CLI until a torch command runs) is torch-free."""
    code = (
        "import sys, simfluence, simfluence.simulators, simfluence.runlog, simfluence.metrics, "
        "simfluence.evaluation, simfluence.counterfactual, simfluence.report, simfluence.synth, "
        "simfluence.curricula, simfluence.plots, simfluence.cli.main; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
