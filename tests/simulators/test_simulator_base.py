"""What every simulator inherits from `simulators.base`: the loss floor and its bend, the
recorded envelope, calibration and the intervals built on it, saving. Tiny run sets and an
additive simulator (milliseconds), values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simfluence.errors import CurriculumError, SimfluenceError
from simfluence.runlog.runs import Run, RunSet
from simfluence.simulators import AdditiveSimulator, PersistenceSimulator, load_simulator
from simfluence.simulators.base import (
    FLOOR_BEND,
    floor_width,
    loss_floor,
    recorded_envelope,
)
from simfluence.simulators.intervals import Bands
from simfluence.synth import SynthConfig, generate


def _runs(*losses: list[list[float]]) -> RunSet:
    """A run set with one run per loss table ``(T + 1, M)``; every step trains on "a"."""
    runs = [
        Run(f"r{k}", [["a"]] * (len(table) - 1), np.array(table, dtype=float))
        for k, table in enumerate(losses)
    ]
    return RunSet(["a", "b"], [f"t{j}" for j in range(len(losses[0][0]))], runs)


@pytest.fixture
def synthetic() -> RunSet:
    runs, _ = generate(SynthConfig(pool=8, tests=3, runs=8, per_run=8, batch=2, epochs=1, seed=1))
    return runs


# -- the floor ----------------------------------------------------------------------------------
def test_floor_and_bend_width_by_hand() -> None:
    """Floor ``min(0, lowest)``; width `FLOOR_BEND` x (lowest - floor): a positive lowest loss
    0.3 gives floor 0 and width 0.003, a negative one gives floor = lowest and width 0 (a hard
    clip); a NaN is a step not observed (sparse scoring), so a test example's lowest loss is
    its lowest observed one (4.0 for the third: floor 0, width 0.04)."""
    runs = _runs([[1.0, 2.0, 5.0], [0.5, -0.4, np.nan]], [[0.3, -0.2, 4.0]])
    np.testing.assert_array_equal(loss_floor(runs), [0.0, -0.4, 0.0])
    np.testing.assert_allclose(
        floor_width(runs), [FLOOR_BEND * 0.3, 0.0, FLOOR_BEND * 4.0], rtol=1e-15
    )


def test_recorded_envelope_by_hand_over_runs_of_different_lengths() -> None:
    """Per step the lowest loss of the runs that reached it; a step where every recorded loss
    is NaN has no envelope (-inf)."""
    short = [[3.0, 1.0], [2.0, np.nan]]
    long = [[4.0, 2.0], [1.0, np.nan], [0.5, 0.25]]
    envelope = recorded_envelope(_runs(short, long))
    np.testing.assert_array_equal(envelope, [[3.0, 1.0], [1.0, -np.inf], [0.5, 0.25]])


# -- calibration and intervals ---------------------------------------------------------------
def test_calibrate_defaults_to_five_folds(synthetic: RunSet) -> None:
    default = AdditiveSimulator(unseen="prior").fit(synthetic).calibrate(synthetic)
    five = AdditiveSimulator(unseen="prior").fit(synthetic).calibrate(synthetic, n_folds=5)
    six = AdditiveSimulator(unseen="prior").fit(synthetic).calibrate(synthetic, n_folds=6)
    np.testing.assert_array_equal(default.calibration_residuals_, five.calibration_residuals_)
    assert not np.array_equal(default.calibration_residuals_, six.calibration_residuals_)


def test_calibrate_keeps_a_fit_made_on_other_runs(synthetic: RunSet) -> None:
    """A fitted simulator is calibrated as it is: `calibrate` fits only an unfitted one."""
    first, rest = synthetic.split(4)
    sim = AdditiveSimulator(unseen="prior").fit(first)
    fitted = {k: v.copy() for k, v in vars(sim).items() if isinstance(v, np.ndarray)}
    sim.calibrate(rest)
    for name, value in fitted.items():
        np.testing.assert_array_equal(getattr(sim, name), value, err_msg=name)
    unfitted = AdditiveSimulator(unseen="prior").calibrate(rest)
    assert unfitted.test_ids_ == rest.test_ids


def test_calibration_needs_two_runs_and_two_folds_and_no_more(synthetic: RunSet) -> None:
    two = synthetic.subset(synthetic.run_ids[:2])
    sim = AdditiveSimulator(unseen="prior").fit(two).calibrate(two, n_folds=2)
    assert sim.calibration_residuals_.shape[0] == 2
    for runs, folds in [(two, 1), (synthetic.subset(synthetic.run_ids[:1]), 2)]:
        with pytest.raises(SimfluenceError, match="at least 2 runs and 2 folds"):
            AdditiveSimulator(unseen="prior").fit(synthetic).calibrate(runs, n_folds=folds)


def test_bands_are_learned_once_per_level_from_float64_residuals(synthetic: RunSet) -> None:
    sim = AdditiveSimulator(unseen="prior").fit(synthetic).calibrate(synthetic)
    bands = sim._bands(0.8)
    assert sim._bands(0.8) is bands and sim._bands(0.9) is not bands
    by_hand = Bands.learn(
        sim.calibration_residuals_.astype(np.float64),
        sim.calibration_scale_.astype(np.float64),
        0.8,
    )
    for name, value in vars(by_hand).items():
        np.testing.assert_array_equal(getattr(bands, name), value, err_msg=name)
    sim.calibrate(synthetic.subset(synthetic.run_ids[:5]))  # new residuals: new bands
    assert sim._bands(0.8) is not bands


def test_objective_interval_is_the_mean_loss_interval_of_the_last_step(
    synthetic: RunSet,
) -> None:
    sim = AdditiveSimulator(unseen="prior").fit(synthetic).calibrate(synthetic)
    run = synthetic.runs[0]
    rollout = sim.simulate(run.curriculum, run.initial_loss)
    columns = np.array([0, 2])
    last = len(rollout) - 1
    value = float(rollout[-1, columns].mean())
    for level in (0.5, 0.8):
        expected = sim.mean_loss_interval(value, columns, last, level)
        assert sim.objective_interval(rollout, columns, level) == expected
        others = {sim.mean_loss_interval(value, columns, s, level) for s in (last - 1, last - 2)}
        assert expected not in others  # the step matters, so the test above can see it
    shorter = sim.simulate(run.curriculum[:-2], run.initial_loss)  # its step + 1 is calibrated
    assert sim.objective_interval(shorter, columns, 0.8) == sim.mean_loss_interval(
        float(shorter[-1, columns].mean()), columns, len(shorter) - 1, 0.8
    )
    assert sim.objective_interval(rollout, columns) == sim.objective_interval(rollout, columns, 0.9)
    assert sim.mean_loss_interval(value, columns, last) == sim.mean_loss_interval(
        value, columns, last, 0.9
    )
    assert sim.objective_offsets(columns, last) == sim.objective_offsets(columns, last, 0.9)


def test_objective_offsets_use_the_float64_residuals(synthetic: RunSet) -> None:
    from simfluence.simulators.intervals import aggregate_offsets

    sim = AdditiveSimulator(unseen="prior").fit(synthetic).calibrate(synthetic)
    columns = np.array([1, 2])
    residuals = sim.calibration_residuals_.astype(np.float64)
    assert sim.objective_offsets(columns, 3, 0.8) == aggregate_offsets(residuals, columns, 3, 0.8)


# -- simulating and saving ----------------------------------------------------------------------
def test_simulate_many_names_the_bad_curriculum_and_takes_integer_losses(
    synthetic: RunSet,
) -> None:
    good = synthetic.runs[0].curriculum
    with pytest.raises(CurriculumError, match=r"curriculum #1: step 2: empty batch"):
        AdditiveSimulator(unseen="prior").fit(synthetic).simulate_many(
            [good, [good[0], []]], synthetic.runs[0].initial_loss
        )
    for sim in (AdditiveSimulator(unseen="prior"), PersistenceSimulator()):
        sim.fit(synthetic)
        as_ints = sim.simulate_many([good], np.array([[2, 1, 3]]))[0]
        as_floats = sim.simulate_many([good], np.array([[2.0, 1.0, 3.0]]))[0]
        assert as_ints.dtype == np.float64
        np.testing.assert_array_equal(as_ints, as_floats)


def test_saved_file_keeps_numpy_scalars_and_only_learned_attributes(
    synthetic: RunSet, tmp_path
) -> None:
    sim = AdditiveSimulator(unseen="prior").fit(synthetic)
    sim.steps_seen_ = np.int64(7)
    sim.ratio_ = np.float32(0.5)
    path = tmp_path / "model.npz"
    sim.save(path)
    meta = json.loads(str(np.load(path)["__meta__"]))
    assert meta["learned"]["steps_seen_"] == 7 and meta["learned"]["ratio_"] == 0.5
    assert all(k.endswith("_") for k in meta["learned"])  # parameters live under "params"
    assert meta["params"]["unseen"] == "prior"
    loaded = load_simulator(path)
    assert loaded.steps_seen_ == 7
    run = synthetic.runs[1]
    np.testing.assert_array_equal(
        loaded.simulate(run.curriculum, run.initial_loss),
        sim.simulate(run.curriculum, run.initial_loss),
    )
