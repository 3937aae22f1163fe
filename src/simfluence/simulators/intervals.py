"""Predictive intervals for simulated trajectories, calibrated on held-out rollouts of whole runs.

A simulator's error on a curriculum it never saw has two parts: the uncertainty of its fitted
parameters and the process noise (what no per-example model can see) that a free-running
rollout accumulates step after step. Both show up, together and at their true size, in the
residuals ``L_t(z) - simulated L_t(z)`` of rollouts of *held-out* runs. So the default
construction (split-conformal prediction, with the folds over whole runs):

1. cross-fit: split the fitted runs into K folds of whole runs (`run_folds`); for each fold, fit
   an unfitted copy of the simulator on the other folds and roll out the fold's runs from their
   recorded step-0 loss. Every run then has a held-out residual for every step and test
   example: shape ``(R, T + 1, M)`` (`residual_table`).
2. normalize: divide each residual by its *scale*, the mean absolute residual of that test
   example over the runs, at that step and its neighbours (`scales`): some examples are much
   harder to predict than others, and errors grow along a rollout at their own pace.
3. per step ``t`` (steps differ: errors grow along a rollout), pool the normalized residuals of
   all runs and test examples and take their ``(1 - level) / 2`` and ``(1 + level) / 2``
   quantiles, with the split-conformal finite-sample correction (`step_quantiles`).
4. the interval of a new rollout is ``simulated + scale * quantile`` at every step and test
   example, clipped below at the floor (`bounds`).

Chosen by measurement (`benchmarks/bench_intervals.py`, README): against one additive band per
step, bands in log space, per-point quantiles over runs, CV+ and a bootstrap over runs with
simulated process noise, it is calibrated on every run set measured, and has the best
interval score (width plus a penalty for misses) on every real one.

It covers held-out points of the *recorded protocol* at about `level` (measured in the README,
on every run set); it says nothing about curricula unlike any recorded run (for example, ones
found by a search that exploits the simulator), which is why the search also keeps to a trust
region. The residuals are stored with the simulator (arrays only: no pickle), so any level and
any aggregate (the mean loss of a group of test examples, `aggregate_bounds`) can be asked for
later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet

#: pool normalized residuals over this many neighbouring steps at least when one step holds
#: fewer than `MIN_POOLED` values (few runs and test examples)
MIN_POOLED = 200


@dataclass(frozen=True)
class Interval:
    """A predictive interval of one rollout.

    Attributes:
        lower, upper: shape ``(T + 1, M)``, like the rollout; row 0 is the given initial loss
            (no uncertainty), ``lower <= upper`` everywhere.
        level: the nominal coverage, e.g. 0.9: about that share of the true losses of curricula
            drawn like the recorded runs fall inside.
    """

    lower: np.ndarray
    upper: np.ndarray
    level: float

    @property
    def width(self) -> np.ndarray:
        """``upper - lower``, shape ``(T + 1, M)``."""
        return self.upper - self.lower

    def contains(self, losses: np.ndarray) -> np.ndarray:
        """Bool array of the shape of `losses` (``(T + 1, M)``): inside ``[lower, upper]``."""
        return (losses >= self.lower) & (losses <= self.upper)


class NotCalibratedError(SimfluenceError):
    """`simulate_interval` was called on a simulator that has no calibration."""


def check_level(level: float) -> float:
    """`level` as a float in (0, 1), or `SimfluenceError` naming it."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise SimfluenceError(f"interval level {level!r}: expected a number in (0, 1)") from None
    if not 0.0 < value < 1.0:
        raise SimfluenceError(f"interval level {level!r}: must be strictly between 0 and 1")
    return value


def run_folds(runs: RunSet, n_folds: int) -> list[tuple[RunSet, RunSet]]:
    """``(train, validation)`` pairs over whole runs; the k-th run by id validates in fold k % K."""
    ordered = sorted(runs.run_ids)
    folds = []
    for fold in range(n_folds):
        held = [r for k, r in enumerate(ordered) if k % n_folds == fold]
        kept = [r for r in ordered if r not in set(held)]
        folds.append((runs.subset(kept), runs.subset(held)))
    return folds


def residual_table(true: Sequence[np.ndarray], simulated: Sequence[np.ndarray]) -> np.ndarray:
    """Signed residuals ``true - simulated`` of ``R`` runs, shape ``(R, T_max + 1, M)``.

    Runs shorter than the longest are padded with NaN; a non-finite rollout (an exploding
    simulator) gives infinite residuals, which widen the interval to infinity at that step.
    Positive = the true loss was higher than simulated.
    """
    if not true:
        raise SimfluenceError("calibration needs at least one held-out rollout")
    longest = max(t.shape[0] for t in true)
    out = np.full((len(true), longest, true[0].shape[1]), np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        for r, (t, p) in enumerate(zip(true, simulated, strict=True)):
            residual = t - p
            out[r, : t.shape[0]] = np.where(np.isfinite(residual), residual, np.inf)
    return out


def test_scales(residuals: np.ndarray) -> np.ndarray:
    """Shape ``(M,)``: each test example's mean absolute residual over runs and steps 1..T.

    An example that is never mispredicted (scale 0), or whose residuals are all missing, gets
    the smallest positive scale among the others (1 if none), so that its interval is not
    empty by construction.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        values = np.abs(residuals[:, 1:])
        finite = np.where(np.isfinite(values), values, np.nan)
        counts = np.sum(np.isfinite(finite), axis=(0, 1))
        total = np.nansum(finite, axis=(0, 1))
    scale = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    positive = scale[scale > 0]
    fallback = float(positive.min()) if positive.size else 1.0
    return np.where(scale > 0, scale, fallback)


def scales(residuals: np.ndarray) -> np.ndarray:
    """Shape ``(T + 1, M)``: the scale of each test example's residuals at each step.

    The mean absolute residual over runs at that step, smoothed over a centred window of
    steps wide enough to average about `MIN_POOLED` values (9 steps for 27 runs), and never
    below 5% of the example's overall scale (`test_scales`): errors grow along a rollout, and
    not at the same pace for every test example.
    """
    n_runs = residuals.shape[0]
    with np.errstate(invalid="ignore"):
        values = np.abs(residuals)
        values = np.where(np.isfinite(values), values, np.nan)
    total = np.nansum(values, axis=0)  # (T + 1, M)
    counts = np.sum(~np.isnan(values), axis=0).astype(np.float64)
    half = max(1, math.ceil((MIN_POOLED / max(n_runs, 1) - 1) / 2))
    smoothed_counts = _window_sums(counts, half)
    per_step = np.divide(
        _window_sums(total, half),
        smoothed_counts,
        out=np.zeros_like(total),
        where=smoothed_counts > 0,
    )
    return np.maximum(per_step, 0.05 * test_scales(residuals)[None, :])


def _window_sums(values: np.ndarray, half: int) -> np.ndarray:
    """Sums over rows ``t - half .. t + half`` (clipped at the edges) of a ``(T, M)`` array."""
    n = values.shape[0]
    cumulative = np.vstack([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
    rows = np.arange(n)
    return cumulative[np.minimum(rows + half + 1, n)] - cumulative[np.maximum(rows - half, 0)]


def conformal_quantile(values: np.ndarray, prob: float, axis: int = -1) -> np.ndarray:
    """The split-conformal quantile of `values` along `axis` (NaN ignored).

    For an upper quantile (``prob > 0.5``) the ``ceil((n + 1) prob)``-th smallest of ``n``
    values (infinite when that exceeds ``n``); for a lower one, symmetrically the
    ``floor((n + 1) prob)``-th (minus infinity when 0). With exchangeable runs this covers a
    new value with probability at least ``prob`` (resp. ``1 - prob``).
    """
    ordered = np.sort(values, axis=axis)  # NaN last
    n = np.sum(~np.isnan(values), axis=axis, keepdims=True)
    if prob > 0.5:
        rank = np.ceil((n + 1) * prob).astype(np.int64)
        missing = rank > n
    else:
        rank = np.floor((n + 1) * prob).astype(np.int64)
        missing = rank < 1
    index = np.clip(rank - 1, 0, ordered.shape[axis] - 1)
    picked = np.take_along_axis(ordered, index, axis=axis)
    picked = np.where(missing, np.inf if prob > 0.5 else -np.inf, picked)
    return np.squeeze(picked, axis=axis)


def step_quantiles(normalized: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-step lower and upper conformal quantiles of normalized residuals.

    Args:
        normalized: shape ``(R, T + 1, M)``; NaN where a run had ended.
        level: nominal coverage.

    Returns:
        two arrays of shape ``(T + 1,)``; row 0 is 0 (no uncertainty before training). A step
        with fewer than `MIN_POOLED` values pools its neighbours (a centred window).
    """
    n_rows = normalized.shape[1]
    per_step = np.sum(~np.isnan(normalized), axis=(0, 2))
    half = 0
    typical = max(int(np.median(per_step[1:])) if n_rows > 1 else 1, 1)
    if typical < MIN_POOLED:
        half = min(math.ceil((MIN_POOLED / typical - 1) / 2), n_rows)
    lower = np.zeros(n_rows)
    upper = np.zeros(n_rows)
    alpha = (1.0 - level) / 2
    for t in range(1, n_rows):
        window = normalized[:, max(1, t - half) : t + half + 1].reshape(-1)
        lower[t] = conformal_quantile(window, alpha)
        upper[t] = conformal_quantile(window, 1.0 - alpha)
    return np.minimum(lower, 0.0), np.maximum(upper, 0.0)


@dataclass(frozen=True)
class Bands:
    """What the bounds of any rollout need, computed once per level: per-step quantiles
    ``(T_max + 1,)`` of the normalized residuals and the scales ``(T_max + 1, M)``."""

    lower_q: np.ndarray
    upper_q: np.ndarray
    scale: np.ndarray

    @classmethod
    def learn(cls, residuals: np.ndarray, scale: np.ndarray, level: float) -> Bands:
        """Args: `residuals` ``(R, T_max + 1, M)``; `scale` ``(T_max + 1, M)`` (`scales`) or
        ``(M,)`` (one per test example)."""
        scale = np.broadcast_to(scale, residuals.shape[1:]) if scale.ndim == 1 else scale
        with np.errstate(invalid="ignore", divide="ignore"):
            lower_q, upper_q = step_quantiles(residuals / scale[None], level)
        return cls(lower_q, upper_q, scale)

    def bounds(
        self, simulated: np.ndarray, floor: np.ndarray | float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds ``(T + 1, M)`` of one rollout (see the module docstring);
        steps beyond the longest calibration run use its last step's quantiles and scales."""
        rows = np.minimum(np.arange(simulated.shape[0]), self.lower_q.size - 1)
        with np.errstate(invalid="ignore"):
            lower = simulated + self.lower_q[rows, None] * self.scale[rows]
            upper = simulated + self.upper_q[rows, None] * self.scale[rows]
        lower = np.maximum(lower, floor)
        upper = np.maximum(upper, lower)
        lower[0] = upper[0] = simulated[0]
        return lower, upper


def bounds(
    simulated: np.ndarray,
    residuals: np.ndarray,
    scale: np.ndarray,
    level: float,
    floor: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds ``(T + 1, M)`` of one rollout: `Bands.learn` then `Bands.bounds`
    (learn the bands once to bound many rollouts)."""
    return Bands.learn(residuals, scale, level).bounds(simulated, floor)


def aggregate_offsets(
    residuals: np.ndarray, columns: np.ndarray, step: int, level: float
) -> tuple[float, float]:
    """``(low, high)``, ``low <= 0 <= high``: the conformal quantiles of the residual of the
    mean loss of test examples `columns` after `step`, over the calibration runs (their own last
    step when they are shorter). Errors of test examples in one run are correlated, so the
    mean's interval is not the mean of the per-example intervals.

    Args:
        residuals: shape ``(R, T_max + 1, M)``, from `residual_table`.
        columns: the test examples averaged.
    """
    lengths = np.sum(~np.isnan(residuals[:, :, 0]), axis=1) - 1
    rows = np.minimum(step, lengths)
    mean_residual = residuals[np.arange(len(rows)), rows][:, columns].mean(axis=1)
    alpha = (1.0 - level) / 2
    low = conformal_quantile(mean_residual, alpha)
    high = conformal_quantile(mean_residual, 1.0 - alpha)
    # fewer runs than the level needs (2 / (1 - level) - 1, e.g. 19 for 0.9): the extreme
    # residuals, an interval that promises a little less than `level`, rather than infinity
    finite = mean_residual[np.isfinite(mean_residual)]
    if finite.size and not np.isfinite(low) and low < 0:
        low = finite.min()
    if finite.size and not np.isfinite(high) and high > 0:
        high = finite.max()
    return min(float(low), 0.0), max(float(high), 0.0)


def aggregate_bounds(
    value: float, offsets: tuple[float, float], floor: float
) -> tuple[float, float]:
    """``value + offsets``, clipped below at `floor`."""
    low = max(value + offsets[0], floor)
    return low, max(value + offsets[1], low)
