"""Predictive intervals, the rollout floor and the safe search (issue 9)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from simfluence.cli.main import main
from simfluence.counterfactual import leave_one_out, optimize_curriculum
from simfluence.counterfactual.attribution import effect_intervals
from simfluence.counterfactual.search import assess_curriculum, trust_region_rollouts
from simfluence.counterfactual.search.evaluator import _Evaluator
from simfluence.counterfactual.search.starts import _random_layouts
from simfluence.errors import SimfluenceError
from simfluence.evaluation import evaluate, format_table
from simfluence.metrics import interval_coverage, interval_width
from simfluence.runlog import save_runset
from simfluence.simulators import (
    AdditiveSimulator,
    LinearSimulator,
    MeanTrajectorySimulator,
    PersistenceSimulator,
    load_simulator,
)
from simfluence.simulators.base import soft_floor
from simfluence.simulators.intervals import (
    Interval,
    NotCalibratedError,
    aggregate_bounds,
    aggregate_offsets,
    bounds,
    check_level,
    conformal_quantile,
    residual_table,
    run_folds,
    scales,
    step_quantiles,
)
from simfluence.simulators.intervals import test_scales as per_test_scales
from simfluence.synth import SynthConfig, generate, write_synthetic

CONFIG = SynthConfig(pool=50, tests=10, runs=24, per_run=40, batch=4, epochs=3, seed=5)


@pytest.fixture(scope="module")
def synthetic() -> tuple:
    runs, _ = generate(CONFIG)
    train, held = runs.split(6)
    sim = LinearSimulator(unseen="prior").fit(train).calibrate(train)
    return runs, train, held, sim


def _rollouts(sim, runs) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return sim.simulate_many(
        [r.curriculum for r in runs.runs], np.stack([r.initial_loss for r in runs.runs])
    )


# -- the pieces -------------------------------------------------------------------------------
def test_conformal_quantile_is_the_finite_sample_rank() -> None:
    values = np.arange(1.0, 20.0)  # n = 19: the 0.95 quantile is the ceil(20 * .95) = 19th
    assert conformal_quantile(values, 0.95) == 19.0
    assert conformal_quantile(values, 0.05) == 1.0  # floor(20 * .05) = 1st
    assert conformal_quantile(values, 0.9) == 18.0
    assert conformal_quantile(values[:5], 0.95) == np.inf  # too few values to promise 95%
    assert conformal_quantile(np.array([3.0, np.nan, 1.0, 2.0]), 0.5) == 2.0


def _conformal_rank_by_hand(values: np.ndarray, prob: float) -> float:
    """The documented rule on one 1-D slice: NaN dropped, the ceil((n + 1) p)-th smallest for an
    upper quantile (inf past n), the floor((n + 1) p)-th for a lower one (-inf below 1)."""
    kept = np.sort(values[~np.isnan(values)])
    n = len(kept)
    if prob > 0.5:
        rank = int(np.ceil((n + 1) * prob))
        return np.inf if rank > n else float(kept[rank - 1])
    rank = int(np.floor((n + 1) * prob))
    return -np.inf if rank < 1 else float(kept[rank - 1])


@pytest.mark.parametrize("prob", [0.05, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_conformal_quantile_works_slice_by_slice_along_any_axis(axis: int, prob: float) -> None:
    """Each slice along `axis` on its own (its own count of non-NaN values); prob 0.5 is a
    lower quantile (floor), which differs from the upper rule at an even count."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(4, 7))
    values[0, :3] = np.nan  # slices with 4, 6 and 7 values
    values[1:3, 5] = np.nan
    got = conformal_quantile(values, prob, axis=axis)
    slices = np.moveaxis(values, axis, -1)
    expected = np.array([_conformal_rank_by_hand(row, prob) for row in slices])
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_conformal_quantile_keeps_other_axes_and_has_no_rank_in_an_empty_slice() -> None:
    one_row = np.array([[4.0, 1.0, 3.0, 2.0, 5.0]])  # (1, 5): the result keeps the row axis
    assert conformal_quantile(one_row, 0.5, axis=1).shape == (1,)
    assert conformal_quantile(one_row, 0.5, axis=1)[0] == 3.0  # floor(6 * 0.5) = 3rd
    empty = np.full((2, 3), np.nan)  # no value: no rank to promise anything
    np.testing.assert_array_equal(conformal_quantile(empty, 0.5), [-np.inf, -np.inf])
    np.testing.assert_array_equal(conformal_quantile(empty, 0.95), [np.inf, np.inf])


def _scales_by_hand(residuals: np.ndarray) -> np.ndarray:
    """`scales` as documented: mean |residual| over runs and over steps t - h .. t + h (cut
    at the ends; non-finite values ignored; 0 where none), h = max(1, ceil((200 / R - 1) / 2)),
    floored at 5% of each example's overall scale."""
    runs, steps, _ = residuals.shape
    half = max(1, int(np.ceil((200 / runs - 1) / 2)))
    values = np.where(np.isfinite(residuals), np.abs(residuals), np.nan)
    out = np.zeros(residuals.shape[1:])
    for t in range(steps):
        window = values[:, max(0, t - half) : t + half + 1]
        for m in range(residuals.shape[2]):
            kept = window[:, :, m][~np.isnan(window[:, :, m])]
            out[t, m] = kept.mean() if kept.size else 0.0
    return np.maximum(out, 0.05 * per_test_scales(residuals)[None, :])


@pytest.mark.parametrize("runs", [1, 25, 100])  # windows of 100, 4 and 1 steps each side
def test_scales_average_a_window_of_steps_and_keep_a_floor(runs: int) -> None:
    rng = np.random.default_rng(runs)
    residuals = rng.normal(size=(runs, 12, 4))
    residuals[:, 4:, 1] = 0.0  # learned after step 3: the 5% floor binds late in the rollout
    residuals[:, :, 2] = np.nan  # example 2: one finite value, at run 0 and step 6
    residuals[0, 6, 2] = 3.0
    residuals[:, 9, 3] = np.inf  # a diverged step counts as missing
    expected = _scales_by_hand(residuals)
    np.testing.assert_allclose(scales(residuals), expected, rtol=1e-12)
    assert np.isfinite(expected).all()


def test_step_quantiles_per_step_when_steps_hold_enough_values() -> None:
    """200 values a step (`MIN_POOLED`): no pooling. Step 1 holds -100..99, step 2 twice
    that; at level 0.9 the conformal ranks of n = 200 are floor(201 * 0.05) = 10 and
    ceil(201 * 0.95) = 191."""
    normalized = np.zeros((100, 3, 2))
    values = (np.arange(200.0) - 100).reshape(100, 2)
    normalized[:, 1], normalized[:, 2] = values, 2 * values
    lower, upper = step_quantiles(normalized, 0.9)
    np.testing.assert_array_equal(lower, [0.0, -91.0, -182.0])
    np.testing.assert_array_equal(upper, [0.0, 90.0, 180.0])


def test_step_quantiles_pool_neighbouring_steps_when_few_values() -> None:
    """20 values a step: steps t - 5 .. t + 5 are pooled (ceil((200 / 20 - 1) / 2) = 5), cut
    at step 1 and the last step. Step t holds the value t - 10 twenty times."""
    normalized = np.broadcast_to((np.arange(20.0) - 10)[None, :, None], (10, 20, 2)).copy()
    lower, upper = step_quantiles(normalized, 0.5)
    # step 1 pools steps 1..6 (-9..-4, 120 values): ranks 30 and 91 -> -8 and -5, upper to 0
    assert (lower[1], upper[1]) == (-8.0, 0.0)
    # step 10 pools steps 5..15 (-5..5, 220 values): ranks 55 and 166 -> -3 and 3
    assert (lower[10], upper[10]) == (-3.0, 3.0)
    # step 19 pools steps 14..19 (4..9): ranks 30 and 91 -> 5 and 8, lower to 0
    assert (lower[19], upper[19]) == (0.0, 8.0)
    assert lower[0] == upper[0] == 0.0
    # wider pooling must not change it: the upper quantile of step 1 on values t**2 is 5**2
    _, upper = step_quantiles((normalized + 10) ** 2, 0.5)
    assert upper[1] == 25.0


def test_step_quantiles_of_very_few_values_and_steps() -> None:
    # one value a step: pool up to 100 steps each side; step 1 of 120 pools steps 1..101 and
    # at level 0.5 takes rank ceil(102 * 0.75) = 77 (values t)
    _, upper = step_quantiles(np.arange(121.0)[None, :, None], 0.5)
    assert upper[1] == 77.0
    # one step: it is its own window; no step at all: nothing to do
    lower, upper = step_quantiles(np.arange(-5.0, 5.0).reshape(5, 1, 2)[:, [0, 0], :], 0.5)
    assert lower.tolist() == [0.0, -4.0] and upper.tolist() == [0.0, 3.0]
    lower, upper = step_quantiles(np.zeros((3, 1, 2)), 0.9)
    assert lower.tolist() == [0.0] and upper.tolist() == [0.0]


def test_residual_table_and_scales() -> None:
    true = [np.ones((3, 2)), np.ones((2, 2))]
    pred = [np.zeros((3, 2)), np.full((2, 2), np.nan)]
    table = residual_table(true, pred)
    assert table.shape == (2, 3, 2)
    assert np.isnan(table[1, 2]).all()  # the shorter run is padded
    assert np.isinf(table[1, :2]).all()  # a non-finite rollout is an infinite residual
    scales = per_test_scales(np.array([[[0.0, 0.0], [1.0, 0.0], [-3.0, 0.0]]]))
    np.testing.assert_allclose(scales, [2.0, 2.0])  # a never-wrong example gets the smallest


def test_per_test_scales_by_hand() -> None:
    """Mean |residual| over runs and steps 1..T, non-finite values left out; an example never
    mispredicted, or never observed, takes the smallest positive scale; an overflowing one is
    infinite. No numpy warnings on the way."""
    residuals = np.full((2, 3, 5), np.nan)
    residuals[:, 0] = 100.0  # step 0 is not scored
    residuals[:, 1:, 0] = [[0.2, -0.4], [np.inf, 0.6]]  # mean of 0.2, 0.4, 0.6
    residuals[:, 1:, 1] = 0.0  # never mispredicted
    residuals[0, 1, 2] = -0.3  # a single value
    residuals[:, 1:, 4] = 1e308  # their sum overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scale = per_test_scales(residuals)
    np.testing.assert_allclose(scale, [0.4, 0.3, 0.3, 0.3, np.inf], rtol=1e-12)
    np.testing.assert_array_equal(per_test_scales(np.zeros((2, 3, 2))), [1.0, 1.0])  # none > 0


def test_scales_follow_steps_and_examples() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(31.0)
    # example 1 is 10 times harder; errors grow linearly along the rollout
    residuals = rng.standard_normal((40, 31, 2)) * steps[None, :, None] * np.array([1.0, 10.0])
    residuals[:, 0] = 0.0
    result = scales(residuals)
    assert result.shape == (31, 2)
    assert np.all(np.diff(result[5:-5, 0]) > -0.2)  # grows with the step (noisy)
    assert result[20, 0] > 3 * result[5, 0]
    np.testing.assert_allclose(result[10:20, 1] / result[10:20, 0], 10.0, rtol=0.3)


def test_bounds_of_one_rollout_by_hand() -> None:
    """Seven runs, one step, one test example of residual scale 2: the normalized residuals
    are -3..3; at level 0.5 the conformal ranks are floor(8 * 0.25) = 2 and ceil(8 * 0.75) = 6,
    quantiles -2 and 2, so a rollout at 5 gets [5 - 2 * 2, 5 + 2 * 2]."""
    residuals = np.zeros((7, 2, 1))
    residuals[:, 1, 0] = [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0]
    simulated = np.array([[1.0], [5.0]])
    lower, upper = bounds(simulated, residuals, np.array([2.0]), 0.5, 0.0)
    np.testing.assert_array_equal(lower, [[1.0], [1.0]])  # row 0 is the given initial loss
    np.testing.assert_array_equal(upper, [[1.0], [9.0]])
    # a wider level reaches further out (ranks 1 and 7: -3 and 3); the floor clips the lower
    lower, upper = bounds(simulated, residuals, np.array([2.0]), 0.75, 2.0)
    np.testing.assert_array_equal(lower, [[1.0], [2.0]])
    np.testing.assert_array_equal(upper, [[1.0], [11.0]])
    # steps beyond the calibration runs' last step keep that step's quantiles and scale
    longer = np.array([[1.0], [5.0], [5.0], [6.0]])
    lower, upper = bounds(longer, residuals, np.array([2.0]), 0.5, 0.0)
    np.testing.assert_array_equal(lower, [[1.0], [1.0], [1.0], [2.0]])
    np.testing.assert_array_equal(upper, [[1.0], [9.0], [9.0], [10.0]])


def test_interval_contains_its_end_points() -> None:
    interval = Interval(lower=np.array([[1.0, 1.0]]), upper=np.array([[2.0, 3.0]]), level=0.9)
    losses = np.array([[[1.0, 3.0]], [[0.5, 2.0]], [[2.5, 3.5]]])
    assert interval.contains(losses[0]).tolist() == [[True, True]]  # both ends are inside
    assert interval.contains(losses[1]).tolist() == [[False, True]]
    assert interval.contains(losses[2]).tolist() == [[False, False]]


def test_aggregate_offsets_by_hand() -> None:
    """The residual of the mean loss of the chosen test examples, per calibration run, at
    `step` (a shorter run's own last step); then its conformal quantiles, widened to 0."""
    residuals = np.zeros((5, 3, 3))
    residuals[:, 2, :2] = [[2.0, 4.0], [-2.0, -6.0], [0.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]
    residuals[2, 1, :2] = [0.5, 1.5]  # run 2 ends after step 1: its step-1 residual counts
    residuals[2, 2] = np.nan
    residuals[:, 2, 2] = 7.0  # a test example that is not averaged
    columns = np.array([0, 1])
    # means over columns 0, 1: [3, -4, 1, 0.5, -1]; sorted [-4, -1, 0.5, 1, 3]; with n = 5 and
    # level 0.2 the ranks are floor(6 * 0.4) = 2 and ceil(6 * 0.6) = 4: -1 and 1
    assert aggregate_offsets(residuals, columns, 2, 0.2) == (-1.0, 1.0)
    # level 0.9 needs more runs (ranks 0 and 6): the extreme residuals stand in
    assert aggregate_offsets(residuals, columns, 2, 0.9) == (-4.0, 3.0)
    # every residual above 0 (column 2 at step 2, and 0 at step 1 for run 2): low is 0
    low, high = aggregate_offsets(residuals, np.array([2]), 2, 0.2)
    assert low == 0.0 and high == 7.0
    assert aggregate_offsets(residuals, columns, 1, 0.2) == (0.0, 0.0)  # steps 1: 0, 0, 1, 0, 0
    # one test example only: [2, -2, 0.5, 0, -1] sorted [-2, -1, 0, 0.5, 2]
    assert aggregate_offsets(residuals[:, :, :1], np.array([0]), 2, 0.2) == (-1.0, 0.5)


def test_aggregate_bounds_clip_at_the_floor() -> None:
    assert aggregate_bounds(1.0, (-0.5, 0.5), 0.0) == (0.5, 1.5)
    assert aggregate_bounds(1.0, (-2.0, 3.0), 0.0) == (0.0, 4.0)
    assert aggregate_bounds(-5.0, (-1.0, 1.0), 0.0) == (0.0, 0.0)  # both at the floor


def test_check_level_takes_numbers_strictly_between_0_and_1() -> None:
    assert check_level("0.9") == 0.9 and check_level(np.float32(0.5)) == 0.5
    for bad in (0, 1, 1.5, -0.1, "high", None):
        with pytest.raises(SimfluenceError, match="interval level"):
            check_level(bad)


def test_run_folds_partition_whole_runs(synthetic: tuple) -> None:
    runs = synthetic[1]
    folds = run_folds(runs, 5)
    held = [r for _, v in folds for r in v.run_ids]
    assert sorted(held) == sorted(runs.run_ids)
    for train, valid in folds:
        assert not set(train.run_ids) & set(valid.run_ids)


# -- calibration ------------------------------------------------------------------------------
def test_linear_intervals_are_calibrated_on_held_out_runs(synthetic: tuple) -> None:
    _, train, held, sim = synthetic
    bands = sim.simulate_interval(
        [r.curriculum for r in held.runs], np.stack([r.initial_loss for r in held.runs])
    )
    true = [r.losses for r in held.runs]
    coverage = interval_coverage(true, [b.lower for b in bands], [b.upper for b in bands])
    assert 0.8 <= coverage <= 0.98  # few runs: the fold copies err a little more
    # and informative: much narrower than the curriculum-blind mean's calibrated interval
    blind = MeanTrajectorySimulator().fit(train).calibrate(train)
    blind_bands = [blind.interval_of(p) for p in _rollouts(blind, held)]
    width = interval_width([b.lower for b in bands], [b.upper for b in bands])
    assert width < 0.8 * interval_width(
        [b.lower for b in blind_bands], [b.upper for b in blind_bands]
    )
    # a lower level gives a narrower interval that covers less
    narrow = sim.interval_of(_rollouts(sim, held)[0], 0.5)
    assert (narrow.width <= bands[0].width + 1e-12).all()


def test_interval_shapes_order_and_floor(synthetic: tuple) -> None:
    _, _, held, sim = synthetic
    run = held.runs[0]
    band = sim.simulate_interval([run.curriculum], run.initial_loss, level=0.8)[0]
    point = sim.simulate(run.curriculum, run.initial_loss)
    assert band.lower.shape == band.upper.shape == point.shape
    assert (band.lower <= point + 1e-12).all() and (point <= band.upper + 1e-12).all()
    np.testing.assert_array_equal(band.lower[0], run.initial_loss)
    np.testing.assert_array_equal(band.upper[0], run.initial_loss)
    assert (band.lower >= 0).all() and band.level == 0.8
    with pytest.raises(Exception, match="strictly between 0 and 1"):
        sim.simulate_interval([run.curriculum], run.initial_loss, level=1.5)


def test_every_method_can_be_calibrated(synthetic: tuple) -> None:
    _, train, held, _ = synthetic
    for sim in (AdditiveSimulator(l2=1.0), PersistenceSimulator(), MeanTrajectorySimulator()):
        sim.fit(train).calibrate(train, n_folds=3)
        band = sim.interval_of(_rollouts(sim, held)[0])
        assert np.isfinite(band.upper[1:]).all() and (band.width[1:] > 0).any()


def test_calibration_fits_copies_with_the_chosen_l2(synthetic: tuple) -> None:
    _, train, _, sim = synthetic
    assert sim._calibration_params()["l2"] == sim.l2_
    assert sim.fold_B_.shape == (5, *sim.B_.shape) and sim.fold_A_.dtype == np.float32
    folds = sim.fold_simulators()
    assert len(folds) == 5 and folds[0].A_.dtype == np.float64
    # each copy is the fit without its fold
    train_0, _ = run_folds(train, 5)[0]
    refit = LinearSimulator(l2=sim.l2_, unseen="prior").fit(train_0)
    np.testing.assert_allclose(folds[0].B_, refit.B_, atol=1e-5)


def test_uncalibrated_and_old_files(synthetic: tuple, tmp_path: Path) -> None:
    _, train, held, sim = synthetic
    run = held.runs[0]
    plain = LinearSimulator(l2=1.0).fit(train)
    with pytest.raises(NotCalibratedError, match="calibrate"):
        plain.simulate_interval([run.curriculum], run.initial_loss)
    sim.save(tmp_path / "cal.npz")
    loaded = load_simulator(tmp_path / "cal.npz")
    a = sim.simulate_interval([run.curriculum], run.initial_loss)[0]
    b = loaded.simulate_interval([run.curriculum], run.initial_loss)[0]
    np.testing.assert_allclose(a.lower, b.lower, rtol=1e-6)
    np.testing.assert_allclose(a.upper, b.upper, rtol=1e-6)
    # a file written before floors and calibration existed still loads, with a floor of 0
    with np.load(tmp_path / "cal.npz") as data:
        old = {k: data[k] for k in data.files if not k.startswith(("calibration", "fold", "floor"))}
        meta = json.loads(str(old["__meta__"]))
    old.pop("envelope_")
    np.savez(tmp_path / "old.npz", **{**old, "__meta__": np.array(json.dumps(meta))})
    legacy = load_simulator(tmp_path / "old.npz")
    assert not legacy.is_calibrated and np.all(legacy.floor_ == 0.0)
    assert np.all(legacy.floor_width_ == 0.0)
    np.testing.assert_allclose(
        legacy.simulate(run.curriculum, run.initial_loss),
        sim.simulate(run.curriculum, run.initial_loss),
    )


def test_evaluate_reports_coverage_and_width(synthetic: tuple) -> None:
    runs = synthetic[0]
    result = evaluate(runs, {"linear": LinearSimulator(), "mean": MeanTrajectorySimulator()}, 6)
    for name in ("linear", "mean"):
        scores = result.methods[name].scores
        assert 0.75 <= scores["coverage_90"] <= 1.0
        assert scores["interval_width_90"] > 0 and scores["calibrate_seconds"] >= 0
        assert len(result.methods[name].intervals) == 6
    assert json.dumps(result.to_json())  # JSON-able
    assert "coverage 90%" in format_table(result)
    bare = evaluate(runs, {"mean": MeanTrajectorySimulator()}, 6, intervals=False)
    assert "coverage_90" not in bare.methods["mean"].scores
    assert "coverage 90%" not in format_table(bare)


# -- the floor --------------------------------------------------------------------------------
def _extrapolating(train) -> LinearSimulator:  # type: ignore[no-untyped-def]
    """A simulator whose fitted effects promise losses far below zero: every example shrinks
    the loss and subtracts a constant."""
    sim = LinearSimulator(l2=1.0).fit(train).calibrate(train, n_folds=3)
    sim.A_ = np.full_like(sim.A_, 0.8 / sim.batch_size_)
    sim.B_ = np.full_like(sim.B_, -0.3 / sim.batch_size_)
    return sim


def test_no_rollout_goes_below_the_floor(synthetic: tuple) -> None:
    _, train, held, _ = synthetic
    sim = _extrapolating(train)
    trajectories = _rollouts(sim, held)
    lowest = min(r.losses.min() for r in train.runs)
    low = min(t[1:].min() for t in trajectories)
    assert 0.0 <= low < lowest  # far below 0 without the floor; bent toward it with
    additive = AdditiveSimulator(l2=1.0).fit(train)
    additive.B_ = np.full_like(additive.B_, -1.0)
    assert min(t[1:].min() for t in _rollouts(additive, held)) >= 0.0
    blind = MeanTrajectorySimulator().fit(train)  # floored after the fact, not in a recursion
    assert min(t[1:].min() for t in _rollouts(blind, held)) >= 0.0
    loo = leave_one_out(sim, held.runs[0].curriculum, None, "test-1")
    assert loo.final_loss >= 0.0
    # the search's own vectorized rollout floors every step exactly like `rollout`
    cols = np.arange(4)
    evaluate_ = _Evaluator(sim, cols, sim.initial_loss_, 4)
    layouts = _random_layouts(np.arange(40), 8, 2, 3, np.random.default_rng(0))
    for layout, value in zip(layouts, evaluate_(layouts), strict=True):
        traj = sim.simulate(evaluate_.curriculum(layout), sim.initial_loss_)
        assert value == pytest.approx(traj[-1, cols].mean(), abs=1e-12)


def test_soft_floor_bends_without_ties() -> None:
    x = np.concatenate([[-1e6], np.linspace(-3.0, 2.0, 501)])[:, None] * np.ones((1, 2))
    y = soft_floor(x.copy(), np.array([0.0, 0.0]), np.array([0.5, 0.0]))
    assert (y[:, 0] > 0).all() and (np.diff(y[:, 0]) > 0).all()  # above the floor, no ties
    np.testing.assert_array_equal(y[x[:, 0] >= 0.5, 0], x[x[:, 0] >= 0.5, 0])  # unchanged above
    near = (x[:, 0] > 0.45) & (x[:, 0] < 0.5)  # continuous (slope 1) at the bend
    assert np.abs(y[near, 0] - x[near, 0]).max() < 6e-3
    np.testing.assert_array_equal(y[:, 1], np.maximum(x[:, 1], 0.0))  # width 0: a hard clip


def test_soft_floor_on_many_curricula_bends_each_test_example_by_its_own_floor() -> None:
    """Values ``(curricula, steps, M)``: floors and widths run along the last axis only; each
    value below its knee is ``floor + width**2 / (floor + 2 width - value)`` by hand."""
    floor, width = np.array([0.0, 1.0, 2.0]), np.array([0.5, 0.25, 0.0])
    values = np.array([[[0.2, 0.9, 1.0], [3.0, 1.5, 2.5]], [[-1.0, 1.25, 2.0], [0.5, 0.0, 5.0]]])
    by_hand = values.copy()
    for index in np.ndindex(values.shape):
        f, w, v = floor[index[-1]], width[index[-1]], values[index]
        if v < f + w:
            by_hand[index] = f + w * w / (f + 2 * w - v) if w > 0 else f
    np.testing.assert_allclose(soft_floor(values.copy(), floor, width), by_hand, rtol=1e-15)


def test_soft_floor_computes_in_float64_whatever_the_floors_dtype() -> None:
    """Floors and widths given in float32 (from a float32 run log) are used at their exact
    value, in float64 arithmetic: the same result as the same numbers given in float64."""
    floor32, width32 = np.array([0.1, 0.3], np.float32), np.array([0.7, 0.2], np.float32)
    values = np.array([[0.15, 0.31], [-2.0, 0.45]])
    expected = soft_floor(values.copy(), floor32.astype(np.float64), width32.astype(np.float64))
    np.testing.assert_array_equal(soft_floor(values.copy(), floor32, width32), expected)
    assert soft_floor(values.copy(), floor32, width32).dtype == np.float64


def test_floor_keeps_order_of_counterfactuals(synthetic: tuple) -> None:
    """Two curricula the unfloored rollout ranks keep their order (a clip would tie them)."""
    _, train, held, _ = synthetic
    sim = _extrapolating(train)
    curricula = [held.runs[0].curriculum, held.runs[0].curriculum[:-3]]
    a, b = (t[-1] for t in _rollouts_of(sim, curricula))
    assert (a >= 0).all() and (b >= 0).all() and (a < b).all()


def _rollouts_of(sim, curricula):  # type: ignore[no-untyped-def]
    return sim.simulate_many(curricula, sim.initial_loss_)


def test_floor_keeps_negative_recorded_losses(synthetic: tuple) -> None:
    runs = copy.deepcopy(synthetic[1].subset(synthetic[1].run_ids[:6]))
    for run in runs.runs:
        run.losses = run.losses - 5.0  # a loss that can be negative
    sim = LinearSimulator(l2=1.0).fit(runs)
    lowest = np.min([r.losses.min(axis=0) for r in runs.runs], axis=0)
    np.testing.assert_allclose(sim.floor_, lowest)
    traj = sim.simulate(runs.runs[0].curriculum, runs.runs[0].initial_loss)
    assert (traj[1:] >= sim.floor_ - 1e-12).all() and traj[1:].min() < 0
    np.testing.assert_array_equal(sim.floor_width_, 0.0)  # the floor is the lowest recorded


# -- the safe search --------------------------------------------------------------------------
def test_search_driven_to_extrapolate_stays_in_the_trust_region(synthetic: tuple) -> None:
    _, train, _, _ = synthetic
    sim = _extrapolating(train)
    free = optimize_curriculum(sim, 40, 4, epochs=3, seed=0, trust_region=False, n_random=8)
    assert 0.0 <= free.predicted < sim.envelope_[-1].mean()  # floored: never negative
    safe = optimize_curriculum(sim, 40, 4, epochs=3, seed=0, n_random=8)
    envelope = sim.envelope_[len(safe.curriculum)].mean()
    assert safe.predicted >= envelope - 1e-12  # no credit below the recorded envelope
    assert 0.0 <= safe.unconstrained < envelope
    low, high = safe.interval
    assert 0.0 <= low <= safe.predicted <= high == pytest.approx(safe.objective)
    traj = trust_region_rollouts(sim, [safe.curriculum])[0]
    assert traj[-1].mean() == pytest.approx(safe.predicted, abs=1e-10)
    for t in range(1, traj.shape[0]):
        assert (traj[t] >= sim.envelope_[min(t, len(sim.envelope_) - 1)] - 1e-12).all()
    assert json.dumps(safe.to_json())
    assert assess_curriculum(sim, safe.curriculum)[:2] == (
        pytest.approx(safe.predicted),
        pytest.approx(safe.interval),
    )


def test_search_falls_back_on_a_better_recorded_curriculum(synthetic: tuple) -> None:
    _, train, _, _ = synthetic
    sim = _extrapolating(train)  # it promises a lot, but the envelope caps what is credited
    sim.envelope_ = np.full_like(sim.envelope_, 50.0)  # nothing is credited below 50
    result = optimize_curriculum(sim, 40, 4, epochs=3, seed=0, n_random=8, recorded=train)
    finals = {r.run_id: r.losses[-1].mean() for r in train.runs}
    best = min(finals, key=finals.get)
    assert result.source == f"recorded {best}"
    assert result.curriculum == train.run(best).curriculum
    assert result.predicted == pytest.approx(finals[best])
    assert f"returning the curriculum of {best}" in result.statement
    assert assess_curriculum(sim, result.curriculum, recorded=train)[2] == result.source
    # another starting point: recorded outcomes do not apply
    other = optimize_curriculum(
        sim, 40, 4, epochs=3, seed=0, n_random=8, recorded=train, initial_loss=sim.initial_loss_ + 1
    )
    assert other.source == "search"


def test_search_says_when_the_gain_is_within_the_uncertainty(synthetic: tuple) -> None:
    _, train, _, sim = synthetic
    good = optimize_curriculum(sim, 40, 4, epochs=3, seed=0)
    assert good.gain_established is True and "larger than the uncertainty" in good.statement
    # effects that are pure noise: whatever it finds, the gain is within the uncertainty
    noise = LinearSimulator(l2=1.0).fit(train).calibrate(train, n_folds=3)
    rng = np.random.default_rng(0)
    noise.A_ = np.full_like(noise.A_, 1 / noise.batch_size_)
    noise.B_ = rng.normal(0, 1e-4, noise.B_.shape)
    vague = optimize_curriculum(noise, 40, 4, epochs=3, seed=0)
    assert vague.gain_established is False
    assert "no curriculum is predicted to be reliably better" in vague.statement
    uncalibrated = optimize_curriculum(LinearSimulator(l2=1.0).fit(train), 40, 4, epochs=3)
    assert uncalibrated.interval is None and uncalibrated.gain_established is None
    assert "not calibrated" in uncalibrated.statement


# -- attribution ------------------------------------------------------------------------------
def test_effect_intervals_are_the_group_jackknife() -> None:
    per_fold = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    lower, upper = effect_intervals(np.array([2.5, 0.0]), per_fold, 0.9)
    se = np.sqrt(3 / 4 * 5.0)
    from scipy import stats

    assert upper[0] - 2.5 == pytest.approx(stats.t.ppf(0.95, 3) * se)
    assert lower[1] == upper[1] == 0.0


def test_leave_one_out_carries_intervals(synthetic: tuple) -> None:
    _, train, held, sim = synthetic
    loo = leave_one_out(sim, held.runs[0].curriculum, None, ["test-0", "test-1"])
    assert loo.lower is not None and loo.level == 0.9
    assert (loo.lower <= loo.effects + 1e-12).all() and (loo.effects <= loo.upper + 1e-12).all()
    rows = loo.to_json()["effects"]
    assert {"lower", "upper", "interval_includes_zero"} <= set(rows[0])
    assert [r["interval_includes_zero"] for r in rows] == loo.uncertain().tolist()
    plain = LinearSimulator(l2=1.0).fit(train)
    assert leave_one_out(plain, held.runs[0].curriculum, None, "test-0").lower is None


# -- command line -----------------------------------------------------------------------------
def test_command_line_intervals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "runs"
    write_synthetic(directory, CONFIG)
    model = tmp_path / "linear.npz"
    assert main(["fit", str(directory), "--method", "linear", "-o", str(model)]) == 0
    assert "calibrated predictive intervals" in capsys.readouterr().out
    out = tmp_path / "pred.json"
    args = ["simulate", str(model), "--runs", str(directory), "--run", "run-0002"]
    assert main([*args, "-o", str(out), "--interval", "0.8"]) == 0
    payload = json.loads(out.read_text())
    lower, loss, upper = (np.array(payload[k]) for k in ("lower", "loss", "upper"))
    assert payload["interval_level"] == 0.8 and lower.shape == loss.shape == upper.shape
    assert (lower <= loss).all() and (loss <= upper).all()
    assert main([*args, "-o", str(tmp_path / "pred.csv"), "--interval", "0.9"]) == 0
    header = (tmp_path / "pred.csv").read_text().splitlines()[0].split(",")
    assert (
        header[:2] == ["step", "test-0"] and "lower:test-0" in header and "upper:test-9" in header
    )
    assert main([*args, "-o", str(out), "--interval", "2"]) == 2  # argparse: one line, status 2
    bare = tmp_path / "bare.npz"
    assert (
        main(["fit", str(directory), "--method", "linear", "--no-intervals", "-o", str(bare)]) == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "simulate",
                str(bare),
                "--runs",
                str(directory),
                "--run",
                "run-0002",
                "-o",
                str(out),
                "--interval",
                "0.9",
            ]
        )
        == 2
    )
    assert "no predictive intervals" in capsys.readouterr().err
    search = tmp_path / "search.json"
    best = tmp_path / "best.json"
    assert (
        main(
            [
                "optimize",
                str(model),
                "--size",
                "16",
                "--epochs",
                "2",
                "--max-seconds",
                "5",
                "-o",
                str(best),
                "--json",
                str(search),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "trust region" in text and "interval" in text
    assert {"interval", "statement", "gain_established"} <= set(json.loads(search.read_text()))
    attribution = tmp_path / "attr.json"
    assert (
        main(["attribute", str(model), "--test", "test-1", *args[2:], "--json", str(attribution)])
        == 0
    )
    effects = json.loads(attribution.read_text())["leave_one_out"]["effects"]
    assert all({"lower", "upper", "interval_includes_zero"} <= set(e) for e in effects)


def test_report_draws_bands_and_marks_uncertain_attributions(tmp_path: Path) -> None:
    directory = tmp_path / "runs"
    runs = write_synthetic(directory, CONFIG)
    save_runset(runs, directory)
    attribution = {
        "leave_one_out": {
            "effects": [
                {
                    "train_id": "a",
                    "effect": -0.2,
                    "lower": -0.3,
                    "upper": -0.1,
                    "interval_includes_zero": False,
                },
                {
                    "train_id": "b",
                    "effect": -0.01,
                    "lower": -0.05,
                    "upper": 0.03,
                    "interval_includes_zero": True,
                },
            ]
        }
    }
    (tmp_path / "attr.json").write_text(json.dumps(attribution))
    out = tmp_path / "report.html"
    args = [
        "report",
        str(directory),
        "--methods",
        "linear,mean",
        "--attribution",
        str(tmp_path / "attr.json"),
        "-o",
        str(out),
    ]
    assert main(args) == 0
    html = out.read_text()
    blob = html.split('id="simfluence-data">')[1].split("</script>")[0]
    data = json.loads(blob)
    band = data["runs"][0]["bands"]["linear"]
    recorded = data["runs"][0]["recorded"][0]
    assert len(band["lower"][0]) == len(recorded) and "band-select" in html
    assert html.count('class="uncertain"') == 1 and "coverage 90%" in html


def test_scales_of_a_single_run_pool_a_hundred_steps_each_side() -> None:
    """One run: about `MIN_POOLED` = 200 values need a window of 100 steps each side, which
    only a rollout longer than 100 steps can show."""
    rng = np.random.default_rng(4)
    residuals = rng.normal(size=(1, 260, 2)) * np.linspace(0.1, 3.0, 260)[None, :, None]
    np.testing.assert_allclose(scales(residuals), _scales_by_hand(residuals), rtol=1e-12)


def test_a_test_example_without_any_finite_residual_gets_the_smallest_other_scale() -> None:
    """Residuals all missing for a test example: its scale is the smallest positive scale of
    the others (not whatever an unset entry held)."""
    residuals = np.zeros((3, 5, 4))
    residuals[:, 1:, 0] = 2.0
    residuals[:, 1:, 1] = 0.5
    residuals[:, 1:, 2] = np.nan
    residuals[:, 1:, 3] = np.inf
    for _ in range(3):
        np.testing.assert_array_equal(per_test_scales(residuals), [2.0, 0.5, 0.5, 0.5])
