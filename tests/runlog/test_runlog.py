"""Run logs: round trips, atomic writes, and every kind of bad input named precisely."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simfluence.errors import RunLogError, SimfluenceError
from simfluence.runlog import (
    Run,
    RunSet,
    export_gptfluence,
    import_gptfluence,
    load_runset,
    save_runset,
    write_run,
)
from simfluence.runlog.layout import MANIFEST, run_path
from simfluence.runlog.store import list_run_files


def small_runset() -> RunSet:
    rng = np.random.default_rng(0)
    runs = [
        Run(
            "r0",
            [["a", "b"], ["c", "c"], ["d"]],
            rng.random((4, 3)) + 0.5,
            seed=0,
            lr=np.array([0.1, 0.1, 0.05]),
            metadata={"note": "x"},
        ),
        Run("r1", [["d", "a"], ["b", "c"]], rng.random((3, 3)) + 0.5, seed=1),
    ]
    return RunSet(["a", "b", "c", "d"], ["t0", "t1", "t2"], runs, {"workload": "unit"})


def assert_same_runset(x: RunSet, y: RunSet) -> None:
    assert x.train_ids == y.train_ids and x.test_ids == y.test_ids
    assert sorted(x.run_ids) == sorted(y.run_ids)
    for run in x.runs:
        other = y.run(run.run_id)
        assert other.curriculum == run.curriculum
        np.testing.assert_array_equal(other.losses, run.losses)
        if run.lr is None:
            assert other.lr is None
        else:
            np.testing.assert_array_equal(other.lr, run.lr)
        assert other.seed == run.seed


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    original = small_runset()
    save_runset(original, tmp_path)
    loaded = load_runset(tmp_path)
    assert_same_runset(original, loaded)
    assert loaded.metadata == {"workload": "unit"}
    assert loaded.run("r0").metadata == {"note": "x"}
    assert loaded.run("r0").curriculum[1] == ["c", "c"]  # repeats survive
    # nothing but the manifest and one file per run, no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r0.parquet", "r1.parquet"]
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_failed_write_leaves_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runset = small_runset()
    save_runset(runset, tmp_path)
    before = run_path(tmp_path, "r0").read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(SimfluenceError, match=r"r0\.parquet: cannot write: disk full"):
        write_run(tmp_path, runset.runs[0], runset.test_ids)
    assert run_path(tmp_path, "r0").read_bytes() == before
    assert not [p for p in tmp_path.rglob("*.tmp")]


def _rewrite_run(path: Path, **columns: object) -> None:
    table = pq.read_table(path)
    for name, values in columns.items():
        index = table.column_names.index(name)
        table = table.set_column(index, name, values)
    pq.write_table(table, path)


def test_unknown_training_id_is_named(tmp_path: Path) -> None:
    runset = small_runset()
    runset.runs[1].curriculum[1] = ["b", "zzz"]
    with pytest.raises(RunLogError, match=r"run 'r1'.*step 2.*'zzz'"):
        save_runset(runset, tmp_path)
    runset.runs[1].curriculum[1] = ["b", "c"]
    save_runset(runset, tmp_path)
    path = run_path(tmp_path, "r1")
    _rewrite_run(path, batch=pa.array([[], ["d", "a"], ["b", "zzz"]], pa.list_(pa.string())))
    with pytest.raises(RunLogError, match=r"r1.parquet.*step 2.*'zzz'"):
        load_runset(tmp_path)


def test_nan_and_infinite_losses_are_named(tmp_path: Path) -> None:
    runset = small_runset()
    runset.runs[0].losses[2, 1] = np.nan
    with pytest.raises(RunLogError, match=r"run 'r0'.*step 2.*'t1'"):
        runset.validate()
    runset.runs[0].losses[2, 1] = np.inf
    with pytest.raises(RunLogError, match=r"step 2.*'t1' is inf"):
        save_runset(runset, tmp_path)


def test_missing_step_is_rejected(tmp_path: Path) -> None:
    save_runset(small_runset(), tmp_path)
    path = run_path(tmp_path, "r0")
    table = pq.read_table(path)
    table = table.filter(pa.array([True, True, False, True]))  # drop step 2
    pq.write_table(table, path)
    with pytest.raises(RunLogError, match=r"r0.*steps must be 0, 1, \.\.\., T.*found 3 at row 2"):
        load_runset(tmp_path)


def test_ragged_losses_are_rejected(tmp_path: Path) -> None:
    runset = small_runset()
    runset.runs[0].losses = runset.runs[0].losses[:3]
    with pytest.raises(RunLogError, match=r"run 'r0': 3 batches but 3 loss rows"):
        runset.validate()
    bad = small_runset()
    bad.runs[1].losses = bad.runs[1].losses[:, :2]
    with pytest.raises(RunLogError, match=r"run 'r1': losses have shape \(3, 2\)"):
        bad.validate()


def test_duplicate_run_ids_are_rejected(tmp_path: Path) -> None:
    runset = small_runset()
    runset.runs[1].run_id = "r0"
    with pytest.raises(RunLogError, match="duplicate run id 'r0'"):
        runset.validate()
    save_runset(small_runset(), tmp_path)
    (tmp_path / "runs" / "copy.parquet").write_bytes(run_path(tmp_path, "r0").read_bytes())
    with pytest.raises(RunLogError, match=r"duplicate run id 'r0' in .*"):
        load_runset(tmp_path)


def test_mismatched_test_list_is_rejected(tmp_path: Path) -> None:
    save_runset(small_runset(), tmp_path)
    other = small_runset()
    other.test_ids = ["t0", "t1", "tX"]
    other.runs[0].run_id = "alien"
    write_run(tmp_path, other.runs[0], other.test_ids)
    with pytest.raises(RunLogError, match=r"alien.*test_ids differ from the manifest"):
        load_runset(tmp_path)


def test_manifest_faults_are_named(tmp_path: Path) -> None:
    with pytest.raises(RunLogError, match="no such run-set directory"):
        load_runset(tmp_path / "nope")
    with pytest.raises(RunLogError, match=r"manifest\.json: missing"):
        load_runset(tmp_path)
    save_runset(small_runset(), tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(RunLogError, match="schema_version 99 is not supported"):
        load_runset(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "test_ids": "t0"}))
    with pytest.raises(RunLogError, match="field 'test_ids' must be a list"):
        load_runset(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "train_ids": ["a", "a"]}))
    with pytest.raises(RunLogError, match="train_ids: duplicate ids 'a'"):
        load_runset(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(RunLogError, match="not valid JSON"):
        load_runset(tmp_path)


def test_empty_batch_and_empty_runset(tmp_path: Path) -> None:
    runset = small_runset()
    runset.runs[0].curriculum[0] = []
    with pytest.raises(RunLogError, match=r"run 'r0': step 1: empty batch"):
        runset.validate()
    save_runset(RunSet(["a"], ["t"], []), tmp_path)
    with pytest.raises(RunLogError, match="holds no runs"):
        load_runset(tmp_path)


def test_split_holds_out_last_runs_by_id() -> None:
    runset = small_runset()
    train, held = runset.split(1)
    assert train.run_ids == ["r0"] and held.run_ids == ["r1"]
    train, held = runset.split(["r0"])
    assert train.run_ids == ["r1"] and held.run_ids == ["r0"]
    with pytest.raises(RunLogError, match="between 1 and 1"):
        runset.split(2)
    with pytest.raises(RunLogError, match="no run 'r9'"):
        runset.split(["r9"])


# -- GPTfluence ---------------------------------------------------------------------------------
def write_gptfluence_run(
    run_dir: Path,
    batches: list[list[int]],
    losses: np.ndarray,
    test_ids: list[int],
    first_step: int = 1,
) -> None:
    run_dir.mkdir(parents=True)
    with open(run_dir / "train_samples_id.json", "w") as f:
        for step, batch in enumerate(batches, start=1):
            f.write(json.dumps({"step": step, "samples_id": batch}) + "\n")
    with open(run_dir / "all_loss_trajectory.out", "w") as f:
        for col, test_id in enumerate(test_ids):
            traj = [
                {"step": first_step + k, "loss": float(x)} for k, x in enumerate(losses[:, col])
            ]
            f.write(json.dumps({"id": test_id, "loss_trajectory": traj}) + "\n")


def test_gptfluence_import_drops_first_batch(tmp_path: Path) -> None:
    losses = np.array([[2.0, 3.0], [1.5, 2.5], [1.2, 2.6]])  # steps 1, 2, 3
    write_gptfluence_run(
        tmp_path / "src" / "run_seed-7", [[10, 2], [2, 3], [3, 10]], losses, [5, 6]
    )
    runset = import_gptfluence(tmp_path / "src")
    run = runset.runs[0]
    assert runset.train_ids == ["2", "3", "10"]  # numeric order
    assert runset.test_ids == ["5", "6"]
    assert run.curriculum == [["2", "3"], ["3", "10"]]  # the step-1 batch is not simulated
    np.testing.assert_array_equal(run.losses, losses)  # step 1 became step 0
    assert run.seed == 7 and run.run_id == "run_seed-7"
    # export then import again: identical
    export_gptfluence(runset, tmp_path / "out")
    again = import_gptfluence(tmp_path / "out")
    assert_same_runset(runset, again)


def test_gptfluence_export_writes_integer_ids_and_round_trips_exactly(tmp_path: Path) -> None:
    runset = small_runset()  # string ids: pool a..d, tests t0..t2
    export_gptfluence(runset, tmp_path)
    lines = (tmp_path / "r0" / "train_samples_id.json").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "samples_id": [0, 1]},
        {"step": 2, "samples_id": [2, 2]},
        {"step": 3, "samples_id": [3]},
    ]
    first = json.loads((tmp_path / "r0" / "all_loss_trajectory.out").read_text().splitlines()[0])
    assert first["id"] == 0 and first["loss_trajectory"][0]["step"] == 0
    back = import_gptfluence(tmp_path)
    assert_same_runset(runset, back)  # ids, pool order, losses, lr, seeds
    assert back.metadata == runset.metadata
    assert back.run("r0").metadata == {"note": "x"}
    # one run directory finds the side file in its parent
    assert import_gptfluence(tmp_path / "r1").train_ids == runset.train_ids


def peer_reader_rows(run_dir: Path, n_train: int, n_test: int) -> list[tuple]:
    """GPTfluence's reader of a run (dataset/simfluence_dataset.py, ``is_train``): consecutive
    trajectory points are paired, the batch is the one of the later point's step; its
    parameter table is indexed by ``n_train * test_id + train_id``."""
    batches = {}
    for line in (run_dir / "train_samples_id.json").read_text().splitlines():
        row = json.loads(line)
        batches[row["step"]] = row["samples_id"]
    rows = []
    for line in (run_dir / "all_loss_trajectory.out").read_text().splitlines():
        row = json.loads(line)
        test_id, traj = row["id"], row["loss_trajectory"]
        assert isinstance(test_id, int) and 0 <= test_id < n_test
        for prev, cur in itertools.pairwise(traj):
            batch = batches[cur["step"]]
            assert all(
                type(i) is int and 0 <= n_train * test_id + i < n_train * n_test for i in batch
            )
            rows.append((test_id, prev["loss"], cur["loss"], batch))
    return rows


def test_gptfluence_export_is_what_the_peer_reader_reads(tmp_path: Path) -> None:
    runset = small_runset()
    export_gptfluence(runset, tmp_path)
    run = runset.run("r0")
    rows = peer_reader_rows(tmp_path / "r0", len(runset.train_ids), len(runset.test_ids))
    index = runset.train_index
    expected = [
        (j, run.losses[t, j], run.losses[t + 1, j], [index[i] for i in run.curriculum[t]])
        for j in range(len(runset.test_ids))
        for t in range(run.n_steps)
    ]
    assert rows == expected  # step 0 is the starting point: every step is a training pair


def test_gptfluence_import_rejects_non_integer_ids(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    write_gptfluence_run(run_dir, [[1, 2], [2, 3]], np.ones((2, 2)), [1, 2])
    path = run_dir / "train_samples_id.json"
    path.write_text('{"step": 1, "samples_id": [1, 2]}\n{"step": 2, "samples_id": [2, "x"]}\n')
    with pytest.raises(RunLogError, match=r"train_samples_id\.json: line 2: .*integer.*'x'"):
        import_gptfluence(tmp_path)
    path.write_text('{"step": "one", "samples_id": [1, 2]}\n')
    with pytest.raises(RunLogError, match=r"line 1: 'step' must be an integer"):
        import_gptfluence(tmp_path)
    write_gptfluence_run(tmp_path / "s", [[1], [2]], np.ones((2, 2)), [1, "t2"])
    with pytest.raises(RunLogError, match=r"all_loss_trajectory\.out: line 2: .*'t2'"):
        import_gptfluence(tmp_path / "s")


def test_gptfluence_import_checks_ids_against_the_side_file(tmp_path: Path) -> None:
    export_gptfluence(small_runset(), tmp_path)
    path = tmp_path / "r1" / "train_samples_id.json"
    path.write_text(path.read_text().replace("[3, 0]", "[3, 4]"))
    with pytest.raises(
        RunLogError, match=r"r1/train_samples_id\.json: line 1: .*id 4 is outside 0\.\.3"
    ):
        import_gptfluence(tmp_path)
    (tmp_path / "simfluence_ids.json").write_text("{}")
    with pytest.raises(RunLogError, match=r"not a simfluence\.gptfluence-ids file"):
        import_gptfluence(tmp_path)


def test_gptfluence_bad_input(tmp_path: Path) -> None:
    with pytest.raises(RunLogError, match="no run directories"):
        import_gptfluence(tmp_path)
    run_dir = tmp_path / "r"
    write_gptfluence_run(run_dir, [[1], [2]], np.ones((2, 2)), [1, 2])
    lines = (run_dir / "all_loss_trajectory.out").read_text().splitlines()
    second = json.loads(lines[1])
    second["loss_trajectory"] = second["loss_trajectory"][1:]  # no first point
    (run_dir / "all_loss_trajectory.out").write_text(lines[0] + "\n" + json.dumps(second) + "\n")
    with pytest.raises(RunLogError, match="no loss at the first recorded step"):
        import_gptfluence(tmp_path)
    (run_dir / "all_loss_trajectory.out").unlink()
    with pytest.raises(RunLogError, match=r"no all_loss_trajectory\.out"):
        import_gptfluence(tmp_path)


def test_listing_ignores_temporary_files(tmp_path: Path) -> None:
    save_runset(small_runset(), tmp_path)
    (tmp_path / "runs" / ".r2.parquet.abc.tmp").write_bytes(b"half")
    assert [p.name for p in list_run_files(tmp_path)] == ["r0.parquet", "r1.parquet"]
    assert len(load_runset(tmp_path).runs) == 2


def _valid_gptfluence(tmp_path: Path) -> Path:
    run_dir = tmp_path / "src" / "run-a"
    write_gptfluence_run(run_dir, [[1, 2], [2, 3], [3, 1]], np.ones((3, 2)), [7, 8])
    return run_dir


TRAIN, LOSS = "train_samples_id.json", "all_loss_trajectory.out"
GOOD_POINTS = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


@pytest.mark.parametrize(
    ("file", "lines", "message"),
    [
        (
            TRAIN,
            ['{"step": 1, "samples_id": [1]', ""],
            r"run-a/train_samples_id\.json: line 1: "
            r"not valid JSON",
        ),
        (TRAIN, ["", "[1, 2]"], r"train_samples_id\.json: line 2: expected a JSON object"),
        (TRAIN, ['{"step": 1, "ids": [1]}'], "needs fields 'step' and 'samples_id'"),
        (
            TRAIN,
            ['{"step": 2, "samples_id": [1]}', '{"step": 2, "samples_id": [3]}'],
            "step 2 appears twice",
        ),
        (TRAIN, ['{"step": 2, "samples_id": [1]}'], r"train_samples_id\.json: no batch for step 3"),
        (LOSS, ['{"id": 7, "trajectory": []}'], "needs fields 'id' and 'loss_trajectory'"),
        (
            LOSS,
            ['{"id": 7, "loss_trajectory": [{"loss": 1.0}]}'],
            "test example '7': every point needs an integer 'step'",
        ),
        (
            LOSS,
            ['{"id": 7, "loss_trajectory": [{"step": 1, "loss": "high"}]}'],
            "test example '7': every point needs a numeric 'loss'",
        ),
        (LOSS, ["", "  "], r"all_loss_trajectory\.out: no test example trajectories"),
        (
            LOSS,
            [
                '{"id": 7, "loss_trajectory": [{"step": 1, "loss": 1}, {"step": 3, "loss": 1}]}',
                '{"id": 8, "loss_trajectory": [{"step": 2, "loss": 1}, {"step": 3, "loss": 1}]}',
            ],
            "test example '8' has no loss at the first recorded step 1",
        ),
    ],
)
def test_gptfluence_import_names_the_file_line_and_field(
    tmp_path: Path, file: str, lines: list[str], message: str
) -> None:
    run_dir = _valid_gptfluence(tmp_path)
    (run_dir / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(RunLogError, match=message):
        import_gptfluence(tmp_path / "src")


def test_gptfluence_import_sources(tmp_path: Path) -> None:
    with pytest.raises(RunLogError, match="no such directory"):
        import_gptfluence(tmp_path / "missing")
    run_dir = _valid_gptfluence(tmp_path)
    single = import_gptfluence(run_dir)  # a run directory itself is a source of one run
    assert single.run_ids == ["run-a"] and single.runs[0].seed is None
    other = tmp_path / "src" / "run-b"
    write_gptfluence_run(other, [[1, 2], [2, 3], [3, 1]], np.ones((3, 2)), [7, 9])
    with pytest.raises(RunLogError, match=r"run-b/all_loss_trajectory\.out: its test ids differ"):
        import_gptfluence(tmp_path / "src")
    (other / LOSS).unlink()
    (other / TRAIN).unlink()
    mixed = tmp_path / "src" / "run-c"
    write_gptfluence_run(mixed, [["x"], [10], ["y"]], np.ones((3, 2)), [7, 8])
    with pytest.raises(RunLogError, match="training id must be an integer, got 'x'"):
        import_gptfluence(tmp_path / "src")


def test_gptfluence_side_file_and_batch_faults_are_named(tmp_path: Path) -> None:
    """The id side file written by export (and its learning rates), and a non-list batch."""
    from simfluence.runlog.gptfluence import IDS_FILE

    runset = RunSet(
        ["a", "b"], ["t"], [Run("r", [["a"], ["b"]], [[1.0], [0.9], [0.8]], lr=[0.1, 0.1])]
    )
    export_gptfluence(runset, tmp_path / "out")
    side = tmp_path / "out" / IDS_FILE
    good = json.loads(side.read_text())
    cases = [
        ("{", "cannot read"),
        (json.dumps({"format": "other"}), "not a "),
        (json.dumps({**good, "train_ids": [1, 2]}), "'train_ids' must be a list of strings"),
        (json.dumps({**good, "test_ids": ["t", "t"]}), "'test_ids' has duplicates"),
        (json.dumps({**good, "runs": []}), "'runs' must be an object"),
        (
            json.dumps({**good, "runs": {"r": {**good["runs"]["r"], "lr": [0.1]}}}),
            "run 'r' has 1 learning rates but 2 steps",
        ),
    ]
    for text, message in cases:
        side.write_text(text)
        with pytest.raises(RunLogError, match=message):
            import_gptfluence(tmp_path / "out")
    side.unlink()
    train = tmp_path / "out" / "r" / "train_samples_id.json"
    train.write_text(json.dumps({"step": 1, "samples_id": 3}) + "\n")
    with pytest.raises(RunLogError, match="'samples_id' must be a list of integers"):
        import_gptfluence(tmp_path / "out")
