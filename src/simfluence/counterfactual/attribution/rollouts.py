"""Shared helpers of the attribution views: test columns, the starting loss, and vectorized
rollouts of only the test examples a view is about."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simfluence.errors import CurriculumError, SimfluenceError
from simfluence.runlog.runs import AnyCurriculum, normalize_curriculum
from simfluence.simulators.base import Simulator, soft_floor
from simfluence.simulators.dynamics import DynamicsSimulator


def test_columns(simulator: Simulator, test_ids: str | Sequence[str]) -> np.ndarray:
    """Column indices of `test_ids` in the simulator's rollouts; `SimfluenceError` for unknown."""
    simulator._check_fitted()
    ids = [test_ids] if isinstance(test_ids, str) else [str(t) for t in test_ids]
    if not ids:
        raise SimfluenceError("no test ids given")
    index = {t: j for j, t in enumerate(simulator.test_ids_)}
    unknown = [t for t in ids if t not in index]
    if unknown:
        known = ", ".join(repr(t) for t in simulator.test_ids_[:5])
        raise SimfluenceError(
            f"unknown test id {unknown[0]!r}: this model predicts {len(index)} test examples "
            f"({known}{', ...' if len(index) > 5 else ''})"
        )
    return np.array([index[t] for t in ids], dtype=np.int64)


def _initial(simulator: Simulator, initial_loss: np.ndarray | None) -> np.ndarray:
    initial = simulator.initial_loss_ if initial_loss is None else initial_loss
    initial = np.asarray(initial, dtype=np.float64)
    if initial.shape != (len(simulator.test_ids_),):
        raise CurriculumError(
            f"initial loss has shape {initial.shape}, expected ({len(simulator.test_ids_)},)"
        )
    return initial


def _rollouts(
    simulator: Simulator,
    curricula: Sequence[AnyCurriculum],
    initial: np.ndarray,
    columns: np.ndarray,
) -> list[np.ndarray]:
    """Rollouts of the `columns` only, each ``(T_c + 1, len(columns))``; one vectorized call.
    Dynamics simulators roll out just those test examples' parameters."""
    if isinstance(simulator, DynamicsSimulator):
        counts = simulator.encode(curricula)
        start = np.broadcast_to(initial[columns], (len(curricula), len(columns)))
        trajectories = simulator.rollout_encoded(counts, np.ascontiguousarray(start), columns)
        floor, width = (
            np.broadcast_to(np.asarray(f, dtype=np.float64), initial.shape)[columns]
            for f in (simulator.floor_, simulator.floor_width_)
        )
        for traj in trajectories:  # as `simulate_many` reports them
            soft_floor(traj[1:], floor, width)
        return trajectories
    return [t[:, columns] for t in simulator.simulate_many(curricula, initial)]


def final_objective(
    simulator: Simulator,
    curricula: Sequence[AnyCurriculum],
    initial: np.ndarray,
    columns: np.ndarray,
) -> np.ndarray:
    """Shape ``(C,)``: the simulated final loss of each curriculum, averaged over `columns`.

    A curriculum with no steps (``[]``) ends where it starts: its value is the initial loss.
    """
    out = np.full(len(curricula), float(initial[columns].mean()))
    busy = [k for k, c in enumerate(curricula) if len(c)]
    if busy:
        trajs = _rollouts(simulator, [curricula[k] for k in busy], initial, columns)
        out[busy] = [traj[-1].mean() for traj in trajs]
    return out


def _prepare(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial_loss: np.ndarray | None,
    test_ids: str | Sequence[str],
) -> tuple[list[list[str]], np.ndarray, np.ndarray, list[str]]:
    columns = test_columns(simulator, test_ids)
    batches = normalize_curriculum(curriculum)
    ids = [simulator.test_ids_[j] for j in columns]
    return batches, _initial(simulator, initial_loss), columns, ids
