"""``combined``: the run's own metagradients for what each example did, a fitted simulator's
multiplicative structure for how examples interact.

For the recorded run, the effect of removing a group ``S`` is estimated as

    unrolled(S) + [sim(S) - sum_{i in S} sim({i})],

the exact first-order effect from the run's metagradients (`simfluence.attribution.unrolled`)
plus the non-additive part (redundancy, order) that Simfluence-Linear's rollouts predict. For
single examples this is unrolled's answer; groups and pairs differ. For other curricula the
simulator answers as it is. Measured against actual retraining on digits-mlp (README), the
added interaction made group removals *worse* (LDS 0.918 vs unrolled's 0.966 under
renormalize), which is why ``attribute`` does not default to it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from simfluence.counterfactual.attribution import removal_effects
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import Run, RunSet
from simfluence.simulators.dynamics import DynamicsSimulator
from simfluence.simulators.linear import DEFAULT_L2_GRID, LinearSimulator

__all__ = ["CombinedSimulator", "simulator_interactions"]


def simulator_interactions(
    simulator: DynamicsSimulator,
    run: Run,
    test_ids: Sequence[str],
    groups: Sequence[Collection[str]],
    removal: str,
) -> np.ndarray:
    """Shape ``(M, G)``: the simulator's ``sim(S) - sum_{i in S} sim({i})`` for each group on
    `run`'s curriculum from its recorded initial loss, for the run set's `test_ids`."""
    if list(simulator.test_ids_) != list(test_ids):
        raise SimfluenceError(
            f"{simulator.name}: the simulator predicts other test examples than the run set's"
        )
    members = sorted({str(i) for g in groups for i in g})
    col = {i: k for k, i in enumerate(members)}
    columns = np.arange(len(test_ids))
    both = [[i] for i in members] + [list(map(str, g)) for g in groups]
    effects = removal_effects(simulator, run.curriculum, run.initial_loss, columns, both, removal)
    singles, joint = effects[: len(members)], effects[len(members) :]
    summed = np.stack([singles[[col[str(i)] for i in g]].sum(axis=0) for g in groups])
    return (joint - summed).T


class CombinedSimulator(LinearSimulator):
    """Simfluence-Linear for other curricula; for a recorded run, its metagradients plus this
    simulator's interactions (module docstring). Parameters: `LinearSimulator`'s, plus
    `task` (`workload`: its older name) and `checkpoints_dir` for the replay."""

    name = "combined"

    def __init__(
        self,
        l2: float | None = None,
        l2_grid: Sequence[float] = DEFAULT_L2_GRID,
        cv_folds: int = 4,
        patience: int = 2,
        unseen: str = "error",
        batch_weighting: str = "mean",
        tol: float = 1e-8,
        cv_tol: float = 1e-4,
        max_iter: int = 1000,
        loss_power: float = 0.0,
        cv_tests: int | None = None,
        test_shards: int | None = None,
        backend: str = "serial",
        workload: str | None = None,
        checkpoints_dir: str | None = None,
        task: str | None = None,
        memory: str | float = "none",
    ) -> None:
        super().__init__(
            l2,
            l2_grid,
            cv_folds,
            patience,
            unseen,
            batch_weighting,
            tol,
            cv_tol,
            max_iter,
            loss_power,
            cv_tests,
            test_shards,
            backend,
            memory,
        )
        self.workload = workload
        self.checkpoints_dir = checkpoints_dir
        self.task = task

    def run_removal_effects(
        self,
        runs: RunSet,
        run_id: str,
        groups: Sequence[Collection[str]],
        removal: str = "renormalize",
    ) -> np.ndarray:
        """Shape ``(M, G)``: unrolled's effects of the groups plus this simulator's interactions."""
        from simfluence.attribution.unrolled import UnrolledSimulator

        unrolled = UnrolledSimulator(
            workload=self.workload, checkpoints_dir=self.checkpoints_dir, task=self.task
        )
        first_order = unrolled.metagradients(runs, run_id).removal_effects(groups, removal)
        interactions = simulator_interactions(
            self, runs.run(run_id), runs.test_ids, groups, removal
        )
        return first_order + interactions
