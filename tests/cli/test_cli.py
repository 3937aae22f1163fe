"""The command line end to end, and user mistakes as one line without a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simfluence.cli.main import main
from simfluence.counterfactual import leave_one_out, step_contributions
from simfluence.curricula import remove
from simfluence.evaluation import evaluate
from simfluence.runlog import load_runset
from simfluence.simulators import LinearSimulator, configure_simulator, load_simulator

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- what the command line prints and writes equals what the library computes -----------------
def test_evaluate_numbers_equal_the_library(
    runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    methods = ["linear", "additive", "persistence", "mean"]
    args = ["evaluate", str(runs_dir), "--methods", ",".join(methods), "--holdout", "2"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())["methods"]
    library = evaluate(
        load_runset(runs_dir),
        {name: configure_simulator(name, defaults={"unseen": "prior"}) for name in methods},
        heldout=2,
    )
    rows = {line.split()[0]: line for line in printed.splitlines() if line.strip()}
    for name, result in library.methods.items():
        scores = {k: v for k, v in result.scores.items() if not k.endswith("seconds")}
        assert scores and {k: written[name][k] for k in scores} == scores
        row = rows[name]  # the printed table shows the same numbers
        assert f"{scores['all_steps_mse']:.4g} ± {scores['all_steps_mse_std']:.2g}" in row
        assert f"{scores['final_step_spearman']:.3f}" in row


def test_fit_and_simulate_equal_the_library(
    runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = load_runset(runs_dir)
    train, held = runs.split(2)
    model = tmp_path / "linear.npz"
    assert (
        main(["fit", str(runs_dir), "--method", "linear", "--holdout", "2", "-o", str(model)]) == 0
    )
    library = LinearSimulator().fit(train)
    assert f"l2 = {library.l2_:g}\n" in capsys.readouterr().out
    saved = load_simulator(model)
    np.testing.assert_array_equal(saved.A_, library.A_)
    np.testing.assert_array_equal(saved.B_, library.B_)

    run = held.runs[0]
    curriculum = tmp_path / "c.json"
    curriculum.write_text(json.dumps(run.curriculum))
    out = tmp_path / "pred.json"
    dropped = run.curriculum[0][0]
    args = ["simulate", str(model), "--curriculum", str(curriculum), "-o", str(out)]
    assert main([*args, "--remove", dropped]) == 0
    printed = capsys.readouterr().out
    edited = remove(run.curriculum, [dropped])
    expected = library.simulate(edited, library.initial_loss_)
    written = json.loads(out.read_text())
    np.testing.assert_array_equal(np.array(written["loss"]), expected)
    assert written["final_loss"] == dict(zip(runs.test_ids, expected[-1].tolist(), strict=True))
    before = library.simulate(run.curriculum, library.initial_loss_)[-1].mean()
    match = re.search(
        r"original \((\d+) steps\) (\S+), edited \((\d+) steps\) (\S+), change (\S+)", printed
    )
    assert match is not None, printed
    assert int(match[1]) == len(run.curriculum) and int(match[3]) == len(edited)
    assert float(match[2]) == pytest.approx(before, abs=5e-6)
    assert float(match[4]) == pytest.approx(expected[-1].mean(), abs=5e-6)
    assert float(match[5]) == pytest.approx(expected[-1].mean() - before, abs=5e-6)


def test_attribute_json_equals_the_library(runs_dir: Path, tmp_path: Path) -> None:
    runs = load_runset(runs_dir)
    model = tmp_path / "linear.npz"
    sim = LinearSimulator(l2=1.0).fit(runs)
    sim.save(model)
    out = tmp_path / "attribution.json"
    args = ["attribute", str(model), "--test", "test-2", "--runs", str(runs_dir)]
    assert main([*args, "--run", "run-0001", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    run = runs.run("run-0001")
    loo = leave_one_out(sim, run.curriculum, run.initial_loss, "test-2")
    assert written["leave_one_out"]["final_loss"] == loo.final_loss
    assert [
        (e["train_id"], e["count"], e["effect"]) for e in written["leave_one_out"]["effects"]
    ] == (loo.rows())
    steps = step_contributions(sim, run.curriculum, run.initial_loss, "test-2")
    assert written["steps"]["trajectory"] == steps.trajectory.tolist()
