"""The honest sanity baselines (METHOD.md): a simulator that cannot beat `mean` has learned
nothing about the curriculum."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simfluence.runlog.runs import AnyCurriculum, RunSet
from simfluence.simulators.base import Simulator


class PersistenceSimulator(Simulator):
    """``L_t = L_0``: training changes nothing."""

    name = "persistence"
    gap_rounds = 0  # reads step 0 only, which is always observed

    def __init__(self) -> None:
        pass

    def _fit(self, runs: RunSet) -> None:
        self.n_runs_ = len(runs.runs)

    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        return [np.repeat(initial[k][None, :], len(c) + 1, axis=0) for k, c in enumerate(curricula)]


class MeanTrajectorySimulator(Simulator):
    """Curriculum-blind mean: each test example's average change ``L_t - L_0`` over the training
    runs, added to the given initial loss (runs start from the same model, so this is the mean
    trajectory itself). Beyond the longest training run the last mean value is held.

    Learned attributes:
        mean_change_: shape ``(T_max + 1, M)``; row ``t`` is the mean of ``L_t - L_0`` over the
            training runs that reached step ``t``. Negative means the loss went down.
    """

    name = "mean"
    #: sparse runs: the mean of their interpolated trajectories (`simulators.gaps`)
    gap_rounds = 0

    def __init__(self) -> None:
        pass

    def _fit(self, runs: RunSet) -> None:
        longest = max(r.n_steps for r in runs.runs)
        total = np.zeros((longest + 1, len(runs.test_ids)))
        count = np.zeros((longest + 1, 1))
        for run in runs.runs:
            total[: run.n_steps + 1] += run.losses - run.losses[0]
            count[: run.n_steps + 1] += 1
        self.mean_change_ = total / count

    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        change = self.mean_change_
        out = []
        for k, curriculum in enumerate(curricula):
            rows = np.minimum(np.arange(len(curriculum) + 1), change.shape[0] - 1)
            out.append(initial[k][None, :] + change[rows])
        return out
