"""Sparse scoring (issue 25): gappy run logs, protocol, recorder, fits from gaps, metrics."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from simfluence.errors import RunLogError, SimfluenceError
from simfluence.metrics import all_steps_mse, final_step_mse, final_step_spearman
from simfluence.recording.protocol import ProtocolError, RecordingProtocol
from simfluence.recording.recorder import Recorder, Scoring, run_scoring
from simfluence.runlog import (
    Run,
    RunSet,
    export_gptfluence,
    import_gptfluence,
    load_runset,
    save_runset,
)
from simfluence.simulators import gaps
from simfluence.simulators.baselines import MeanTrajectorySimulator, PersistenceSimulator
from simfluence.simulators.linear import DEFAULT_L2_GRID, AdditiveSimulator, LinearSimulator
from simfluence.synth import SynthConfig, generate


def _mask(shape: tuple[int, int], every: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[::every] = True
    mask[-1] = True
    return mask


def _sparse(runs: RunSet, every: int) -> RunSet:
    out = [
        Run(
            r.run_id, r.curriculum, r.losses, r.seed, r.lr, r.metadata, _mask(r.losses.shape, every)
        )
        for r in runs.runs
    ]
    return RunSet(runs.train_ids, runs.test_ids, out, runs.metadata)


def _gappy_runset() -> RunSet:
    rng = np.random.default_rng(0)
    losses = rng.random((5, 3)) + 0.5
    observed = np.ones((5, 3), dtype=bool)
    observed[2] = False  # a whole step missing (score-every)
    observed[3, 1] = False  # one test example missing (score-fraction)
    runs = [
        Run(
            "r0",
            [["a", "b"], ["c", "c"], ["d", "a"], ["b", "d"]],
            losses,
            seed=0,
            observed=observed,
        ),
        Run("r1", [["d", "a"], ["b", "c"]], rng.random((3, 3)) + 0.5, seed=1),
    ]
    return RunSet(["a", "b", "c", "d"], ["t0", "t1", "t2"], runs)


def test_gappy_run_round_trips_with_parquet_nulls(tmp_path: Path) -> None:
    runset = _gappy_runset()
    run = runset.runs[0]
    assert np.isnan(run.losses[2]).all() and np.isnan(run.losses[3, 1])  # NaN in memory
    save_runset(runset, tmp_path)
    column = pq.read_table(tmp_path / "runs" / "r0.parquet").column("loss").combine_chunks()
    assert column.values.null_count == 4  # nulls on disk, never NaN
    values = column.values.to_numpy(zero_copy_only=False)
    assert np.isnan(values).sum() == 4  # (pyarrow reads nulls as NaN: only the nulls)
    assert not np.isnan(column.values.drop_null().to_numpy()).any()
    loaded = load_runset(tmp_path)
    assert np.array_equal(loaded.runs[0].mask, run.mask)
    assert np.array_equal(loaded.runs[0].losses, run.losses, equal_nan=True)
    assert loaded.runs[1].observed is None and loaded.complete is False


def test_complete_runs_have_no_mask_and_files_are_unchanged(tmp_path: Path) -> None:
    runset = _gappy_runset()
    full = runset.runs[1]
    same = Run(full.run_id, full.curriculum, full.losses, full.seed, observed=np.ones((3, 3)))
    assert same.observed is None and same.complete
    save_runset(RunSet(runset.train_ids, runset.test_ids, [full]), tmp_path / "a")
    save_runset(RunSet(runset.train_ids, runset.test_ids, [same]), tmp_path / "b")
    a = (tmp_path / "a" / "runs" / "r1.parquet").read_bytes()
    assert a == (tmp_path / "b" / "runs" / "r1.parquet").read_bytes()
    schema = pq.read_schema(tmp_path / "a" / "runs" / "r1.parquet")
    assert load_runset(tmp_path / "a").complete and schema.field("loss").type.list_size == 3


def test_old_run_files_load_unchanged(tmp_path: Path) -> None:
    """A run file as the writer made it before sparse scoring (no nulls) loads as complete."""
    import json

    import pyarrow as pa

    runset = _gappy_runset()
    save_runset(RunSet(runset.train_ids, runset.test_ids, [runset.runs[1]]), tmp_path)
    run = runset.runs[1]
    table = pa.table(
        {
            "step": pa.array(np.arange(3, dtype=np.int32)),
            "batch": pa.array([[], *run.curriculum], type=pa.list_(pa.string())),
            "lr": pa.array([None] * 3, type=pa.float64()),
            "loss": pa.FixedSizeListArray.from_arrays(pa.array(run.losses.ravel()), 3),
        }
    )
    meta = {"run_id": "r1", "seed": 1, "test_ids": runset.test_ids, "metadata": {}}
    table = table.replace_schema_metadata({b"simfluence": json.dumps(meta).encode()})
    pq.write_table(table, tmp_path / "runs" / "r1.parquet")
    loaded = load_runset(tmp_path)
    assert loaded.complete and np.array_equal(loaded.runs[0].losses, run.losses)


def test_validation_of_masks() -> None:
    runset = _gappy_runset()
    bad = runset.runs[0]
    bad.observed = bad.observed.copy()
    bad.observed[0, 2] = False
    with pytest.raises(RunLogError, match="step 0: loss of test example 't2' is missing"):
        runset.validate()
    nan = _gappy_runset()
    nan.runs[1].losses[2, 0] = np.nan  # NaN where observed is still an error
    with pytest.raises(RunLogError, match="step 2: loss of test example 't0' is nan"):
        nan.validate()


def test_gptfluence_export_import_keeps_the_gaps(tmp_path: Path) -> None:
    runset = _gappy_runset()
    export_gptfluence(runset, tmp_path / "g")
    back = import_gptfluence(tmp_path / "g")
    assert np.array_equal(back.runs[0].mask, runset.runs[0].mask)
    assert np.array_equal(back.runs[0].losses, runset.runs[0].losses, equal_nan=True)
    assert back.runs[1].observed is None


# -- protocol and recorder --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("score_every", 0, "must be a whole number >= 1"),
        ("score_every", 2.5, "must be a whole number >= 1"),
        ("score_fraction", 0.0, r"must be a share in \(0, 1\]"),
        ("score_fraction", 1.5, r"must be a share in \(0, 1\]"),
        ("score_full_from", -1, "must be a run index >= 0"),
    ],
)
def test_protocol_validates_scoring(field: str, value: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        RecordingProtocol(**{field: value})
    assert info.value.field == field


def test_protocol_config_stores_scoring_only_when_sparse() -> None:
    from simfluence.recording.workloads import get_workload

    task = get_workload("digits-mlp")
    full = RecordingProtocol(runs=2).resolve(task).to_config(task)
    assert not {"score_every", "score_fraction", "score_full_from"} & set(full)
    sparse = RecordingProtocol(runs=4, score_every=10, score_full_from=3).resolve(task)
    config = sparse.to_config(task)
    assert config["score_every"] == 10 and config["score_full_from"] == 3
    resumed = RecordingProtocol().resolve(task, {**config, "runs": 4})
    assert resumed.score_every == 10 and resumed.score_full_from == 3
    assert run_scoring(config, 2).every == 10 and run_scoring(config, 3) is None


def test_scoring_schedules() -> None:
    every = Scoring(every=10, n_steps=25)
    scored = [t for t in range(26) if every.columns(t, 4) is None]
    assert scored == [0, 10, 20, 25]
    share = Scoring(fraction=0.25, n_steps=9, seed=3)
    counts = np.zeros(8, dtype=int)
    for t in range(1, 9):
        cols = share.columns(t, 8)
        assert cols is not None and len(cols) == 2
        counts[cols] += 1
    assert (counts == 2).all()  # rotating: every test example is scored equally often
    with pytest.raises(SimfluenceError, match="score fraction"):
        Scoring(fraction=0)


def test_recorder_scores_sparsely_and_finishes_the_last_step(tmp_path: Path) -> None:
    import torch

    model = torch.nn.Linear(1, 1)
    calls: list[int] = []

    def loss_fn(m: torch.nn.Module, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(len(chunk["x"]))
        return (m(chunk["x"]).squeeze(1) - chunk["x"].squeeze(1)) ** 2

    tests = {"x": torch.arange(6, dtype=torch.float32)[:, None]}
    rec = Recorder(
        model, tests, loss_fn, pool=["a", "b"], directory=tmp_path, scoring=Scoring(every=3)
    )
    for _ in range(4):
        rec.step(["a"], lr=0.1)
    run = rec.finish()  # step 4 is not a multiple of 3: finish scores it
    assert [t for t in range(5) if run.mask[t].all()] == [0, 3, 4]
    assert not run.mask[[1, 2]].any()
    assert calls == [6, 6, 6]
    assert np.array_equal(load_runset(tmp_path).runs[0].mask, run.mask)


def test_record_sparse_and_resume_refuses_another_scoring(tmp_path: Path) -> None:
    from simfluence.recording import record_runs
    from simfluence.recording.workloads import get_workload

    task = get_workload("digits-mlp")
    small = dict(pool=24, per_run=8, tests=6, batch=2, epochs=2, checkpoints=[])
    runs = record_runs(
        task,
        tmp_path,
        RecordingProtocol(runs=3, score_every=3, score_full_from=2, **small),
        progress=False,
    )
    steps = runs.runs[0].n_steps
    assert [t for t in range(steps + 1) if runs.runs[0].mask[t].all()] == [0, 3, 6, steps]
    assert runs.runs[2].observed is None  # scored in full from run 2 on
    with pytest.raises(SimfluenceError, match="score_every: 3 there, 2 now"):
        record_runs(task, tmp_path, RecordingProtocol(runs=3, score_every=2), progress=False)


# -- fits and metrics -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> tuple[RunSet, RunSet]:
    runs, _ = generate(SynthConfig(tests=10))
    return runs.split(5)


def _heldout_mse(sim: object, held: RunSet) -> float:
    initial = np.stack([r.initial_loss for r in held.runs])
    simulated = sim.simulate_many([r.curriculum for r in held.runs], initial)  # type: ignore[attr-defined]
    return all_steps_mse([r.losses for r in held.runs], simulated).mean


def test_fully_observed_fits_are_byte_identical(synthetic: tuple[RunSet, RunSet]) -> None:
    train, _ = synthetic
    explicit = RunSet(
        train.train_ids,
        train.test_ids,
        [
            Run(r.run_id, r.curriculum, r.losses, r.seed, r.lr, r.metadata, np.ones_like(r.losses))
            for r in train.runs
        ],
    )
    for cls in (LinearSimulator, AdditiveSimulator, MeanTrajectorySimulator):
        a, b = io.BytesIO(), io.BytesIO()
        first, second = cls().fit(train), cls().fit(explicit)
        for sim, out in ((first, a), (second, b)):
            learned = {k: v for k, v in vars(sim).items() if k.endswith("_")}
            pickle.dump(learned, out)
        assert a.getvalue() == b.getvalue(), cls.name


def test_fit_from_every_fifth_step_nearly_matches_the_full_fit(
    synthetic: tuple[RunSet, RunSet],
) -> None:
    train, held = synthetic
    full = _heldout_mse(LinearSimulator().fit(train), held)
    gappy = _heldout_mse(LinearSimulator().fit(_sparse(train, 5)), held)
    mean = _heldout_mse(MeanTrajectorySimulator().fit(train), held)
    interpolated_only = LinearSimulator()
    interpolated_only.gap_rounds = 0
    plain = _heldout_mse(interpolated_only.fit(_sparse(train, 5)), held)
    assert gappy <= 1.6 * full  # measured ~1.4x on the default synthetic set
    assert gappy < 0.5 * mean
    assert gappy < plain  # the model's own re-imputation beats interpolation alone


def test_imputation_rounds_run_until_the_imputation_settles(
    synthetic: tuple[RunSet, RunSet],
) -> None:
    train, held = synthetic
    sparse = _sparse(train, 10)
    settled = LinearSimulator().fit(sparse)
    three = LinearSimulator()
    three.gap_rounds = 3
    three.fit(sparse)
    assert 3 < settled.gap_rounds_ < gaps.IMPUTATION_ROUNDS
    # the l2 fixed during the rounds is given back, and chosen again by cross-validation
    assert settled.l2 is None and settled.l2_ in DEFAULT_L2_GRID and settled.cv_mse_
    assert _heldout_mse(settled, held) < _heldout_mse(three, held)


def test_imputation_keeps_the_previous_round_when_it_drifts_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = _gappy_runset()
    levels = iter([10.0, 5.0, 4.0, 6.0, 5.5, 5.4])
    used: list[float] = []

    def fake_bridge(runs: RunSet, simulated: list[np.ndarray]) -> RunSet:
        used.append(next(levels))
        return gaps._with_losses(runs, [np.where(r.mask, r.losses, used[-1]) for r in runs.runs])

    monkeypatch.setattr(gaps, "bridge", fake_bridge)
    sim = MeanTrajectorySimulator()
    sim.gap_rounds = 10
    filled = gaps.fit_with_gaps(sim, runs)
    # changes 5, 1, then 2: a rise, so the imputation of the round before (level 4) is kept
    assert used == [10.0, 5.0, 4.0, 6.0]
    assert filled.runs[0].losses[2, 0] == 4.0 and filled.runs[0].losses[3, 1] == 4.0
    assert sim.gap_rounds_ == 4


def test_baselines_fit_from_gaps(synthetic: tuple[RunSet, RunSet]) -> None:
    train, held = synthetic
    sparse = _sparse(train, 5)
    assert _heldout_mse(PersistenceSimulator().fit(sparse), held) == _heldout_mse(
        PersistenceSimulator().fit(train), held
    )
    mean = MeanTrajectorySimulator().fit(sparse)
    assert np.isfinite(mean.mean_change_).all()
    assert _heldout_mse(mean, held) <= 1.1 * _heldout_mse(
        MeanTrajectorySimulator().fit(train), held
    )
    additive = AdditiveSimulator().fit(sparse)
    assert np.isfinite(additive.B_).all() and np.isfinite(additive.floor_).all()


def test_metrics_ignore_unobserved_steps() -> None:
    true = np.array([[1.0, 1.0], [0.5, np.nan], [np.nan, np.nan], [0.2, 0.4]])
    pred = np.array([[1.0, 1.0], [0.6, 100.0], [100.0, 100.0], [0.3, 0.1]])
    mse = all_steps_mse([true], [pred])
    # test 0: steps 1 and 3 observed, errors 0.01 and 0.01; test 1: step 3 only: 0.09
    assert mse.mean == pytest.approx((0.01 + 0.09) / 2)
    assert final_step_mse([true], [pred]).mean == pytest.approx(0.05)
    complete = np.where(np.isnan(true), pred, true)
    assert all_steps_mse([complete], [pred]).mean == pytest.approx((0.02 / 3 + 0.09 / 3) / 2)
    assert final_step_spearman([true], [pred]).mean == pytest.approx(-1.0)
