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


def _sparse(runs: RunSet) -> RunSet:
    """`runs` with steps 1 and 3 unscored for test example 1 and step 2 for all of them."""
    out = []
    for r in runs.runs:
        observed = np.ones(r.losses.shape, dtype=bool)
        observed[[1, 3], 1] = False
        observed[2] = False
        out.append(Run(r.run_id, r.curriculum, r.losses, r.seed, observed=observed))
    return RunSet(runs.train_ids, runs.test_ids, out, runs.metadata)


def test_a_sparse_fit_keeps_the_floor_and_envelope_of_the_observed_losses(
    synthetic: RunSet,
) -> None:
    """Fitted on sparsely scored runs (imputed in between), the simulator is floored and
    enveloped by the losses actually observed, not by imputed ones, and predicts."""
    sparse = _sparse(synthetic)
    assert not sparse.complete
    sim = AdditiveSimulator(unseen="prior").fit(sparse)
    np.testing.assert_array_equal(sim.floor_, loss_floor(sparse))
    np.testing.assert_array_equal(sim.floor_width_, floor_width(sparse))
    np.testing.assert_array_equal(sim.envelope_, recorded_envelope(sparse))
    assert np.isinf(sim.envelope_[2]).all()  # no loss observed at step 2
    run = sparse.runs[0]
    assert np.isfinite(sim.simulate(run.curriculum, run.initial_loss)).all()


def test_calibration_on_sparse_runs_bridges_their_gaps_with_the_model(synthetic: RunSet) -> None:
    """Sparse runs are calibrated as the complete runs whose missing losses are bridged by the
    model's own rollouts (`gaps.bridge`): the same residuals, all finite."""
    from simfluence.simulators import gaps

    sparse = _sparse(synthetic)
    sim = AdditiveSimulator(unseen="prior").fit(synthetic)
    rollouts = [sim.simulate(r.curriculum, r.initial_loss) for r in sparse.runs]
    bridged = gaps.bridge(sparse, rollouts)
    assert bridged.complete
    expected = AdditiveSimulator(unseen="prior").fit(synthetic).calibrate(bridged)
    sim.calibrate(sparse)
    assert np.isfinite(sim.calibration_residuals_).all()
    np.testing.assert_array_equal(sim.calibration_residuals_, expected.calibration_residuals_)
    np.testing.assert_array_equal(sim.calibration_scale_, expected.calibration_scale_)


def test_a_non_finite_lowest_loss_floors_at_zero_with_a_hard_clip() -> None:
    """A test example whose lowest loss held in memory is -inf (a diverged run, never
    validated) has no usable lowest value: floor 0 and width 0, as if its lowest were 0."""
    runs = _runs([[2.0, 1.0], [-np.inf, 0.5]])
    np.testing.assert_array_equal(loss_floor(runs), [0.0, 0.0])
    np.testing.assert_array_equal(floor_width(runs), [0.0, FLOOR_BEND * 0.5])


def test_calibration_copies_treat_an_id_their_folds_lack_as_no_effect() -> None:
    """A simulator that refuses unseen ids is still calibrated when a fold's copy never saw an
    id its held-out run consumes ("b", only in r1): the copies take it as "no effect", and the
    simulator keeps its own setting."""
    runs = RunSet(
        ["a", "b"],
        ["t0"],
        [
            Run("r0", [["a"], ["a"]], np.array([[1.0], [0.9], [0.8]])),
            Run("r1", [["b"], ["a"]], np.array([[1.0], [0.7], [0.6]])),
        ],
    )
    sim = AdditiveSimulator().fit(runs)
    assert sim.unseen == "error"
    sim.calibrate(runs, n_folds=2)
    assert np.isfinite(sim.calibration_residuals_).all() and sim.unseen == "error"
    assert sim._calibration_params()["unseen"] == "prior"


def test_simulate_many_names_the_bad_curriculum_on_a_tiny_fit() -> None:
    """The bad curriculum is named by its position; integer initial losses are taken as
    float64 (a persistence rollout would otherwise stay integer)."""
    sim = PersistenceSimulator().fit(_runs([[1.0, 2.0], [0.5, 1.5]]))
    with pytest.raises(CurriculumError, match=r"^curriculum #1: step 1: empty batch"):
        sim.simulate_many([[["a"]], [[]]], np.array([1.0, 2.0]))
    rollout = sim.simulate_many([[["a"]]], np.array([[2, 1]]))[0]
    assert rollout.dtype == np.float64
    np.testing.assert_array_equal(rollout, [[2.0, 1.0], [2.0, 1.0]])


def test_calibration_holds_out_five_folds_by_default_on_tiny_runs() -> None:
    """Six runs of two steps: the default calibration is the 5-fold one, not the 6-fold one
    (each fold's copy learns "a"'s effect from other runs)."""
    tables = [[[1.0, 2.0], [1.0 - 0.1 * k, 1.9], [0.9 - 0.1 * k, 1.7]] for k in range(6)]
    runs = _runs(*tables)
    default = AdditiveSimulator(l2=1.0).fit(runs).calibrate(runs)
    five = AdditiveSimulator(l2=1.0).fit(runs).calibrate(runs, n_folds=5)
    six = AdditiveSimulator(l2=1.0).fit(runs).calibrate(runs, n_folds=6)
    np.testing.assert_array_equal(default.calibration_residuals_, five.calibration_residuals_)
    assert not np.array_equal(default.calibration_residuals_, six.calibration_residuals_)
