"""Leave-one-out: each distinct training id's simulated effect on the final loss, with its
interval from the calibration refits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simfluence.counterfactual.attribution.removal import SIGN_CONVENTION, removal_effects
from simfluence.counterfactual.attribution.rollouts import _prepare, final_objective
from simfluence.runlog.runs import AnyCurriculum
from simfluence.simulators.base import Simulator
from simfluence.simulators.dynamics import DynamicsSimulator


@dataclass
class LeaveOneOut:
    """Simulated leave-one-out of every distinct training id of a curriculum.

    Attributes:
        test_ids: the test examples whose mean final loss is the objective.
        final_loss: the objective with the full curriculum, ``L_T(with)``.
        train_ids: the ``N`` distinct training ids, most helpful first (ascending effect).
        counts: shape ``(N,)``, how many times each was consumed in the curriculum.
        effects: shape ``(N,)``, ``L_T(with) - L_T(without it)``; negative = helpful.
        lower, upper: shape ``(N,)``, each effect's interval at `level` (`effect_intervals`),
            or None when the simulator has no fold copies (not calibrated, or not a dynamics
            simulator).
        level: the nominal level of the intervals, or None.
        removal: what "without it" means (`REMOVALS`).
        method: what computed the effects when not a simulator's rollouts (``"unrolled"``...).
    """

    test_ids: list[str]
    final_loss: float
    train_ids: list[str]
    counts: np.ndarray
    effects: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    level: float | None = None
    removal: str = "renormalize"
    method: str | None = None

    def uncertain(self) -> np.ndarray:
        """Shape ``(N,)`` bool: the effect's interval includes 0 (its sign is not established);
        all False without intervals."""
        if self.lower is None or self.upper is None:
            return np.zeros(len(self.effects), dtype=bool)
        return (self.lower <= 0) & (self.upper >= 0)

    def helpful(self, k: int) -> list[tuple[str, int, float]]:
        """Up to `k` rows ``(id, count, effect)`` with negative effect, most helpful first."""
        rows = [r for r in self.rows() if r[2] < 0]
        return rows[:k]

    def harmful(self, k: int) -> list[tuple[str, int, float]]:
        """Up to `k` rows with positive effect, most harmful first."""
        rows = [r for r in reversed(self.rows()) if r[2] > 0]
        return rows[:k]

    def rows(self) -> list[tuple[str, int, float]]:
        return [
            (i, int(c), float(e))
            for i, c, e in zip(self.train_ids, self.counts, self.effects, strict=True)
        ]

    def to_json(self) -> dict[str, Any]:
        effects: list[dict[str, Any]] = [
            {"train_id": i, "count": c, "effect": e} for i, c, e in self.rows()
        ]
        if self.lower is not None and self.upper is not None:
            for row, lo, hi, zero in zip(
                effects, self.lower, self.upper, self.uncertain(), strict=True
            ):
                row |= {
                    "lower": float(lo),
                    "upper": float(hi),
                    "interval_includes_zero": bool(zero),
                }
        return {
            "sign_convention": SIGN_CONVENTION,
            "removal": self.removal,
            "test_ids": self.test_ids,
            "final_loss": self.final_loss,
            "interval_level": self.level,
            "interval": None if self.level is None else INTERVAL_NOTE,
            "effects": effects,
        }


def leave_one_out(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial_loss: np.ndarray | None,
    test_ids: str | Sequence[str],
    level: float | None = 0.9,
    removal: str = "renormalize",
) -> LeaveOneOut:
    """Each distinct training id's effect on the final loss by simulated leave-one-out.

    For every distinct id ``i`` of `curriculum`, every occurrence is removed (batches left
    empty are dropped) and the curriculum re-simulated; all ``N`` counterfactuals are rolled
    out in one vectorized call. ``effect_i = L_T(with) - L_T(without i)``, averaged over
    `test_ids`: **negative = consuming i lowered the final loss (helpful)**.

    Args:
        initial_loss: shape ``(M,)`` (all test examples of the model), or None for the
            simulator's mean recorded one.
        level: the level of each effect's interval (`effect_intervals`; only for calibrated
            dynamics simulators), or None for none.
        removal: ``"renormalize"`` (drop it, re-average its batches) or ``"zero-weight"``
            (keep it in its batches with weight 0); see `removal_effects`.
    """
    batches, initial, columns, ids = _prepare(simulator, curriculum, initial_loss, test_ids)
    distinct, counts = np.unique([i for b in batches for i in b], return_counts=True)
    final = float(final_objective(simulator, [batches], initial, columns)[0])
    groups = [[str(i)] for i in distinct]
    effects = removal_effects(simulator, batches, initial, columns, groups, removal).mean(axis=1)
    order = np.argsort(effects, kind="stable")
    result = LeaveOneOut(
        ids,
        final,
        [str(distinct[k]) for k in order],
        counts[order],
        effects[order],
        removal=removal,
    )
    folds = simulator.fold_simulators() if isinstance(simulator, DynamicsSimulator) else []
    if level is not None and folds:
        per_fold = []
        for fold in folds:
            fold_effects = removal_effects(fold, batches, initial, columns, groups, removal)
            per_fold.append(fold_effects.mean(axis=1))
        lower, upper = effect_intervals(effects, np.stack(per_fold), level)
        result.lower, result.upper, result.level = lower[order], upper[order], float(level)
    return result


INTERVAL_NOTE = (
    "effect +- t(K-1) * jackknife standard error over the K calibration refits, each without "
    "one fold of runs: how much the effect depends on which runs were recorded"
)


def effect_intervals(
    effects: np.ndarray, per_fold: np.ndarray, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Intervals of simulated effects from the ``K`` fold refits (delete-a-group jackknife).

    Args:
        effects: shape ``(N,)``, under the simulator fitted on all runs.
        per_fold: shape ``(K, N)``, the same effects under each refit without one fold.
        level: nominal level, e.g. 0.9.

    Returns:
        ``(lower, upper)``, each ``(N,)``: ``effects -+ t * se`` with the jackknife standard
        error ``se = sqrt((K - 1) / K * sum_k (e_k - mean_k e)^2)`` and ``t`` the Student
        quantile with ``K - 1`` degrees of freedom. It measures the parameters' dependence on
        the recorded runs, not the run-to-run noise of one real retraining.
    """
    from scipy import stats

    k = per_fold.shape[0]
    spread = per_fold - per_fold.mean(axis=0)
    se = np.sqrt((k - 1) / k * np.sum(spread**2, axis=0))
    half = float(stats.t.ppf(0.5 + level / 2, df=k - 1)) * se
    return effects - half, effects + half
