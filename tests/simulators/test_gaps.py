"""Fits from sparsely scored runs (`simulators.gaps`), on hand-made runs of a few steps: the
interpolation and the bridge by hand, what an imputed run set keeps, when the imputation
rounds stop, and the ridge strength held during them."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from simfluence.runlog.features import ExampleFeatures
from simfluence.runlog.runs import AnyCurriculum, Run, RunSet
from simfluence.simulators import gaps
from simfluence.simulators.base import Simulator
from simfluence.simulators.baselines import MeanTrajectorySimulator

NAN = np.nan


def _one_run(losses: list[list[float]]) -> RunSet:
    """A run set of one run over the pool ``a``, ``b`` with these losses (NaN: not scored)."""
    values = np.array(losses, dtype=float)
    curriculum = [["a"] if t % 2 else ["b"] for t in range(len(values) - 1)]
    tests = [f"t{j}" for j in range(values.shape[1])]
    return RunSet(["a", "b"], tests, [Run("r0", curriculum, values, observed=~np.isnan(values))])


def test_bridge_by_hand() -> None:
    """Gaps are the rollout plus the interpolated errors of the rollout at the observations,
    and observed losses are kept exactly (no round-off from subtracting and adding back)."""
    runs = _one_run([[0.1], [NAN], [NAN], [NAN], [0.3]])
    rollout = np.array([[0.7], [2.0], [1.0], [2.0], [2.5]])
    (bridged,) = gaps.bridge(runs, [rollout]).runs
    # errors at steps 0 and 4: 0.1 - 0.7 = -0.6 and 0.3 - 2.5 = -2.2, interpolated in between
    errors = np.array([-0.6, -1.0, -1.4, -1.8, -2.2])
    expected = rollout[:, 0] + errors
    np.testing.assert_allclose(bridged.losses[1:4, 0], expected[1:4], rtol=1e-12)
    assert bridged.losses[0, 0] == 0.1 and bridged.losses[4, 0] == 0.3  # exactly
    assert (0.1 - 0.7) + 0.7 != 0.1  # (what an unkept observation would have become)
    for rollouts in ([], [rollout, rollout]):  # one rollout per run, never more or fewer
        with pytest.raises(ValueError):
            gaps.bridge(runs, rollouts)


def test_interpolate_holds_the_last_observation_and_keeps_the_observed() -> None:
    """Per test example: linear between observations, the last one held after it."""
    runs = _one_run([[1.0, 2.0], [NAN, 4.0], [3.0, NAN], [NAN, NAN]])
    (filled,) = gaps.interpolate(runs).runs
    np.testing.assert_array_equal(filled.losses, [[1.0, 2.0], [2.0, 4.0], [3.0, 4.0], [3.0, 4.0]])


def test_a_diverging_rollout_falls_back_to_interpolation_silently() -> None:
    """Where the rollout overflows or is not finite, the gap is interpolated instead, and no
    floating-point warning reaches the user."""
    runs = _one_run([[1.0, 1.0], [NAN, NAN], [NAN, NAN], [3.0, 5.0]])
    rollout = np.array([[-1e308, np.inf], [1.5e308, np.inf], [1.0, 2.0], [-1e308, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (bridged,) = gaps.bridge(runs, [rollout]).runs
    # column 0: 1e308 + 1.5e308 overflows at step 1; column 1: -inf + inf at steps 1 and 2
    np.testing.assert_allclose(bridged.losses[1], [1 + 2 / 3, 1 + 4 / 3], rtol=1e-12)
    np.testing.assert_allclose(bridged.losses[2], [1e308, 1 + 8 / 3], rtol=1e-12)


def test_imputed_runs_keep_everything_but_the_gaps() -> None:
    """The complete run set keeps the runs' seeds, rates, metadata, the set's metadata, source
    and features, and marks exactly the gaps as imputed (scores never use them)."""
    features = ExampleFeatures(np.eye(2), np.ones((1, 2)), {"source": "test"})
    run = Run(
        "r0",
        [["a"], ["b"], ["a"]],
        np.array([[1.0], [NAN], [2.0], [3.0]]),
        seed=7,
        lr=np.array([0.1, 0.2, 0.3]),
        metadata={"model": "m"},
        observed=np.array([[True], [False], [True], [True]]),
    )
    runs = RunSet(["a", "b"], ["t0"], [run], {"set": 1}, Path("somewhere"), features)
    filled = gaps.interpolate(runs)
    assert (filled.metadata, filled.source, filled.features) == (
        {"set": 1},
        Path("somewhere"),
        features,
    )
    (out,) = filled.runs
    assert out.seed == 7 and out.metadata == {"model": "m"}
    np.testing.assert_array_equal(out.lr, [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(out.imputed, [[False], [True], [False], [False]])
    np.testing.assert_array_equal(out.losses, [[1.0], [1.5], [2.0], [3.0]])
    np.testing.assert_array_equal(out.recorded_losses, [[1.0], [NAN], [2.0], [3.0]])
    with pytest.raises(ValueError):  # one loss array per run, never silently fewer
        gaps._with_losses(runs, [])


def test_observed_share_counts_the_scored_steps_after_step_0() -> None:
    """Share of the losses of steps 1..T observed, over all runs; 1 with no steps at all."""
    gappy = Run(
        "r0", [["a"]] * 3, np.ones((4, 2)), observed=np.array([[1, 1], [1, 0], [0, 0], [1, 1]])
    )
    full = Run("r1", [["b"]] * 2, np.ones((3, 2)))
    assert gaps.observed_share(RunSet(["a", "b"], ["t0", "t1"], [gappy, full])) == 0.7
    empty = Run("r2", [], np.ones((1, 2)))
    assert gaps.observed_share(RunSet(["a", "b"], ["t0", "t1"], [empty])) == 1.0


# -- the imputation rounds ---------------------------------------------------------------------


def _levels(monkeypatch: pytest.MonkeyPatch, levels: Sequence[float]) -> list[float]:
    """Make every round impute all gaps at the next of `levels`; returns the levels used."""
    it: Iterator[float] = iter(levels)
    used: list[float] = []

    def fake_bridge(runs: RunSet, simulated: list[np.ndarray]) -> RunSet:
        used.append(next(it))
        return gaps._with_losses(runs, [np.where(r.mask, r.losses, used[-1]) for r in runs.runs])

    monkeypatch.setattr(gaps, "bridge", fake_bridge)
    return used


def _rounds(runs: RunSet) -> tuple[RunSet, MeanTrajectorySimulator]:
    sim = MeanTrajectorySimulator()
    sim.gap_rounds = 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filled = gaps.fit_with_gaps(sim, runs)
    return filled, sim


#: eight observed losses, four 0s and four 2s (standard deviation exactly 1), one gap of nine
#: losses: a round that moves the gap by ``d`` changes the imputation by RMS ``d / 3``
_SPREAD_1 = [[0.0, 0.0, 2.0], [2.0, NAN, 0.0], [2.0, 0.0, 2.0]]


def test_rounds_go_on_while_the_change_does_not_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal changes in two rounds are no drift: the rounds go on until the change is small."""
    used = _levels(monkeypatch, [3.0, 6.0, 7.0, 7.0, 8.0])
    filled, sim = _rounds(_one_run(_SPREAD_1))
    assert used == [3.0, 6.0, 7.0, 7.0] and sim.gap_rounds_ == 4  # changes 1, 1, 1/3, 0
    assert filled.runs[0].losses[1, 1] == 7.0


def test_rounds_stop_at_a_change_of_the_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change of exactly the tolerance times the spread of the observed losses settles."""
    monkeypatch.setattr(gaps, "IMPUTATION_TOL", 1.0)
    used = _levels(monkeypatch, [6.0, 9.0, 9.5])
    filled, sim = _rounds(_one_run(_SPREAD_1))
    assert used == [6.0, 9.0] and sim.gap_rounds_ == 2  # changes 2, then 1 = 1.0 x 1
    assert filled.runs[0].losses[1, 1] == 9.0


def test_the_tolerance_is_a_share_of_the_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Losses spread by 2 settle at an RMS change of ``2 * IMPUTATION_TOL`` (0.005)."""
    used = _levels(monkeypatch, [12.0, 12.009, 12.009, 12.009])
    spread_2 = [[2 * v for v in row] for row in _SPREAD_1]
    filled, sim = _rounds(_one_run(spread_2))
    assert used == [12.0, 12.009] and sim.gap_rounds_ == 2  # second change: 0.003
    assert filled.runs[0].losses[1, 1] == 12.009


class _RidgeLike(Simulator):
    """A ridge-like stand-in: its "cross-validation" (``l2`` None) picks ``l2_ = 0.3``; it
    records the ``l2`` of every fit, and rolls out the initial loss unchanged."""

    name = "ridge-like"

    def __init__(self, l2: float | None = None) -> None:
        self.l2 = l2
        self.fits: list[float | None] = []

    def _fit(self, runs: RunSet) -> None:
        self.fits.append(self.l2)
        self.l2_ = 0.3 if self.l2 is None else self.l2

    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        return [np.repeat(initial[k][None, :], len(c) + 1, axis=0) for k, c in enumerate(curricula)]


def test_the_first_cross_validated_l2_is_held_during_the_rounds() -> None:
    """The rounds fit with the l2 of the first (cross-validated) fit, one last fit chooses l2
    again on the settled imputation, and the parameter is given back as None."""
    sim = _RidgeLike()
    runs = _one_run(_SPREAD_1)
    filled = gaps.fit_with_gaps(sim, runs)
    assert isinstance(filled, RunSet) and sim.gap_rounds_ >= 1
    assert sim.fits == [None, *[0.3] * sim.gap_rounds_, None]
    assert sim.l2 is None and sim.l2_ == 0.3


def test_a_given_l2_is_kept_and_fitted_once_a_round() -> None:
    """An l2 the user set stays set; no cross-validating last fit is needed."""
    sim = _RidgeLike(l2=1.0)
    gaps.fit_with_gaps(sim, _one_run(_SPREAD_1))
    assert sim.fits == [1.0] * (1 + sim.gap_rounds_) and sim.l2 == 1.0
