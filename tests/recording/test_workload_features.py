"""Features from workloads (gradients, the Task hook), the never-seen recording protocol, and
featurized simulators through evaluate and validate on digits-mlp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from simfluence.attribution.gradients import per_example_gradients
from simfluence.cli.main import main
from simfluence.errors import SimfluenceError
from simfluence.recording.features import count_sketch, gradient_features, write_features
from simfluence.recording.protocol import ProtocolError, RecordingProtocol
from simfluence.recording.record import record_runs
from simfluence.recording.reserve import reserved_ids
from simfluence.recording.task import Examples
from simfluence.recording.workloads import get_workload
from simfluence.runlog import load_runset

TINY = dict(runs=8, pool=40, per_run=16, tests=8, batch=4, epochs=2, lr=0.1, seed=0)


@pytest.fixture(scope="module")
def reserved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("digits") / "runs"
    protocol = RecordingProtocol(reserve=0.25, **TINY)
    record_runs(get_workload("digits-mlp"), directory, protocol, progress=False)
    return directory


def test_reserved_examples_are_drawn_only_by_the_held_out_runs(reserved: Path) -> None:
    runs = load_runset(reserved)
    config = runs.metadata["config"]
    assert config["reserve"] == 0.25 and config["reserve_from"] == 8 - 1  # round(8 * 5 / 32)
    kept = set(runs.metadata["reserved_ids"])
    assert kept == set(reserved_ids(runs.train_ids, 0.25, 0)) and len(kept) == 10
    drawn = [{i for b in r.curriculum for i in b} & kept for r in runs.runs]
    assert all(not d for d in drawn[:7]) and drawn[7]


def test_reserve_options_are_checked_and_off_by_default(tmp_path: Path) -> None:
    task = get_workload("digits-mlp")
    with pytest.raises(ProtocolError, match=r"^reserve 0\.9: .*fewer than per_run 16") as info:
        record_runs(task, tmp_path / "a", RecordingProtocol(reserve=0.9, **TINY))
    assert info.value.field == "reserve" and info.value.value == 0.9
    with pytest.raises(ProtocolError, match=r"^reserve_from 8: must be a run index between 1 and"):
        record_runs(task, tmp_path / "b", RecordingProtocol(reserve=0.2, reserve_from=8, **TINY))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    protocol = RecordingProtocol(**{**TINY, "runs": 2})
    runs = record_runs(task, tmp_path / "c", protocol, progress=False)
    assert "reserve" not in runs.metadata["config"] and "reserved_ids" not in runs.metadata


def test_gradient_features_are_the_per_example_gradients_at_the_initial_model() -> None:
    task = get_workload("digits-mlp")
    pool, _ = task.prepare(20, 5, 0)
    model = task.make_model(0)
    exact = gradient_features(task, model, pool)  # D = 2410 <= 2 * 2048: exact
    expected = per_example_gradients(task, model, model.state_dict(), pool).numpy()
    np.testing.assert_allclose(exact, expected, rtol=1e-12)
    sketched = gradient_features(task, model, pool, dim=512, seed=3)
    assert sketched.shape == (20, 512)
    np.testing.assert_array_equal(sketched, gradient_features(task, model, pool, dim=512, seed=3))
    # inner products survive the sketch (in expectation; here within a loose tolerance)
    gram, approx = exact @ exact.T, sketched @ sketched.T
    assert np.corrcoef(gram.ravel(), approx.ravel())[0, 1] > 0.95


def test_count_sketch_adds_signed_entries_into_buckets() -> None:
    grads = torch.tensor([[1.0, 2.0, 3.0]])
    out = count_sketch(grads, torch.tensor([1, 0, 1]), torch.tensor([1.0, -1.0, -1.0]), 2)
    assert out.tolist() == [[-2.0, -2.0]]


def test_task_feature_kinds_and_errors(reserved: Path) -> None:
    features = write_features(reserved, kind="embedding")
    assert features.train.shape == (40, 74) and features.metadata["kind"] == "embedding"
    labels = features.train[:, 64:]
    assert (labels.sum(axis=1) == 1).all()  # the one-hot label
    assert load_runset(reserved).features.metadata["kind"] == "embedding"
    with pytest.raises(SimfluenceError, match="no feature kind 'words'; kinds: gradients"):
        write_features(reserved, kind="words")


def test_a_task_without_the_hook_has_only_gradients() -> None:
    from simfluence.recording.features import example_features, feature_kinds

    task = get_workload("digits-mlp")
    task.feature_kinds = ()
    assert feature_kinds(task) == ["gradients"]
    with pytest.raises(SimfluenceError, match="no feature kind 'embedding'"):
        example_features(task, task.make_model(0), Examples(["a"], {}), "embedding")


def test_evaluate_features_and_unseen_split_on_the_command_line(
    reserved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["features", str(reserved)]) == 0
    assert "x 2410 dimensions (gradients" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    args = ["evaluate", str(reserved), "--methods", "linear,featurized,hybrid,mean"]
    assert main([*args, "--holdout", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "all-steps MSE by unseen share" in printed  # run-0006 saw none, run-0007 some
    assert "(cov. " in printed and "coverage 90%" in printed  # issue 9's intervals, per bin
    result = json.loads(out.read_text())
    shares = result["heldout_unseen_share"]
    assert shares["run-0006"] == 0 and shares["run-0007"] > 0.1
    bins = result["by_unseen_share"]["featurized"]
    assert set(bins) == {"0%", "10-30%"} or set(bins) == {"0%", ">30%"}
    assert all(np.isfinite(b["all_steps_mse"]) for b in bins.values())
    assert all(0.0 <= b["coverage_90"] <= 1.0 for b in bins.values())
    assert 0.0 <= result["methods"]["hybrid"]["coverage_90"] <= 1.0


def test_validate_refits_featurized_simulators(reserved: Path) -> None:
    from simfluence.recording.validation import validate
    from simfluence.simulators import configure_simulator

    write_features(reserved)
    runs = load_runset(reserved)
    sims = {name: configure_simulator(name, unseen="prior") for name in ("hybrid", "featurized")}
    result = validate(get_workload("digits-mlp"), runs, sims, ["random"], count=2)
    scores = result["kinds"]["random"]["methods"]
    assert set(scores) == {"hybrid", "featurized"}
    assert all(np.isfinite(s["all_steps_mse"]) for s in scores.values())


def test_resuming_a_reserved_recording_keeps_its_protocol(tmp_path: Path) -> None:
    task = get_workload("digits-mlp")
    small = {**TINY, "runs": 3, "pool": 20, "per_run": 8}
    protocol = RecordingProtocol(reserve=0.25, reserve_from=2, **small)
    record_runs(task, tmp_path / "r", protocol, progress=False)
    # resumed with more runs and no reserve: the recorded share and first held-out run stay
    runs = record_runs(task, tmp_path / "r", RecordingProtocol(runs=4), progress=False)
    config = runs.metadata["config"]
    assert config["reserve"] == 0.25 and config["reserve_from"] == 2 and len(runs.runs) == 4
    with pytest.raises(SimfluenceError, match="different config"):
        record_runs(task, tmp_path / "r", RecordingProtocol(reserve=0.5), progress=False)


def test_features_of_a_task_from_a_file_are_found_through_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`simfluence features` rebuilds the run set's own task (issue 8's task references), and
    `--task` points at it when the stored reference no longer works."""
    source = tmp_path / "mytask.py"
    source.write_text(
        "from simfluence.recording.workloads.digits_mlp import DigitsMLPTask\n\n\n"
        "class MyDigits(DigitsMLPTask):\n    name = 'my-digits'\n"
    )
    directory = tmp_path / "runs"
    args = "--runs 2 --pool 20 --per-run 8 --tests 5 --batch 4 --epochs 1 --checkpoints none"
    assert main(["record", str(directory), "--task", f"{source}:MyDigits", *args.split()]) == 0
    assert main(["features", str(directory), "--kind", "embedding"]) == 0
    assert "(embedding" in capsys.readouterr().out
    assert load_runset(directory).features.metadata["source"] == "task my-digits"
    moved = tmp_path / "moved.py"
    source.rename(moved)
    assert main(["features", str(directory)]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["features", str(directory), "--task", f"{moved}:MyDigits"]) == 0
