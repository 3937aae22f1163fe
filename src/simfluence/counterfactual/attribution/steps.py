"""Where in training the objective moved: the per-step change of the simulated loss and its
exact decomposition into per-example contributions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simfluence.counterfactual.attribution.rollouts import _prepare, _rollouts
from simfluence.runlog.runs import AnyCurriculum
from simfluence.simulators.base import Simulator
from simfluence.simulators.dynamics import DynamicsSimulator, step_times

SIMULATED_CHANGE = "simulated loss change L_t - L_{t-1}"


@dataclass
class StepContributions:
    """Where in training the objective moved.

    Attributes:
        test_ids: the test examples averaged.
        trajectory: shape ``(T + 1,)``, the simulated objective after each step (0 = start);
            for a replayed run (`unit` says so), the recorded one.
        change: shape ``(T,)``, ``L_t - L_{t-1}`` for steps ``t = 1..T``; negative = the
            step lowered the loss. For a replayed run: each step's first-order effect on the
            *final* loss (the metagradients of its consumptions; see `unit`).
        contributions: for dynamics simulators, one dict per step ``{train_id: contribution}``
            whose values sum exactly to that step's change (an id repeated in a batch is
            summed); where the loss floor bent a step (`soft_floor`), an entry ``"(floor)"``
            holds what it added; None for simulators without a per-example decomposition.
        unit: what `change` and `contributions` measure.
    """

    test_ids: list[str]
    trajectory: np.ndarray
    change: np.ndarray
    contributions: list[dict[str, float]] | None
    unit: str = SIMULATED_CHANGE

    def top_steps(self, k: int) -> list[int]:
        """The `k` steps (1-based) with the largest ``|L_t - L_{t-1}|``, largest first."""
        order = np.argsort(-np.abs(self.change), kind="stable")[:k]
        return [int(t) + 1 for t in order]

    def top_examples(self, step: int, k: int) -> list[tuple[str, float]]:
        """The `k` largest-magnitude contributions ``(id, contribution)`` at `step` (1-based)."""
        if self.contributions is None:
            return []
        items = sorted(self.contributions[step - 1].items(), key=lambda kv: -abs(kv[1]))
        return items[:k]

    def to_json(self, top: int = 10, per_step: int = 5) -> dict[str, Any]:
        return {
            "test_ids": self.test_ids,
            "unit": self.unit,
            "trajectory": self.trajectory.tolist(),
            "change": self.change.tolist(),
            "top_steps": [
                {
                    "step": t,
                    "change": float(self.change[t - 1]),
                    "top_examples": [
                        {"train_id": i, "contribution": c}
                        for i, c in self.top_examples(t, per_step)
                    ],
                }
                for t in self.top_steps(top)
            ],
        }


def step_contributions(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial_loss: np.ndarray | None,
    test_ids: str | Sequence[str],
) -> StepContributions:
    """Per-step change of the simulated objective and, for dynamics simulators, its exact
    decomposition into per-example contributions.

    With ``w_t`` the batch weight (``b / |c_t|`` for ``batch_weighting="mean"``, 1 for
    ``"sum"``) and ``n_ti`` the times ``i`` is in batch ``t``, the rollout's step is
    ``L_t = sum_i n_ti w_t (A_i L_{t-1} + B_i)``, so

        L_t - L_{t-1} = sum_{i in c_t} n_ti [w_t (A_i L_{t-1} + B_i) - L_{t-1} / |c_t|],

    which for "mean" weighting is ``sum_i n_ti w_t ((A_i - 1/b) L_{t-1} + B_i)``: each example
    is credited with its departure from "no effect" (``A = 1/b``, ``B = 0``). Additive
    simulators (``A_`` None, alpha = 1): contribution ``n_ti w_t B_i``. Negative = the example
    lowered the loss at that step. Contributions are averaged over `test_ids` like the loss.
    """
    batches, initial, columns, ids = _prepare(simulator, curriculum, initial_loss, test_ids)
    traj = _rollouts(simulator, [batches], initial, columns)[0]
    objective = traj.mean(axis=1)
    change = np.diff(objective)
    contributions = None
    if isinstance(simulator, DynamicsSimulator):
        contributions = _decompose(simulator, batches, traj, columns)
        for step, delta in zip(contributions, change, strict=True):
            floor = delta - sum(step.values())
            if abs(floor) > 1e-12 * max(1.0, abs(delta)):
                step[FLOOR_KEY] = float(floor)
    return StepContributions(ids, objective, change, contributions)


#: the pseudo training id of what the loss floor added to a step (`step_contributions`)
FLOOR_KEY = "(floor)"


def _decompose(
    simulator: DynamicsSimulator,
    batches: list[list[str]],
    traj: np.ndarray,
    columns: np.ndarray,
) -> list[dict[str, float]]:
    W = simulator.encode([batches])[0].tocsr()  # (T, P): n_ti * w_t
    W.sum_duplicates()
    rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))
    cols, w = W.indices, W.data
    size = simulator.row_mass(W)  # w_t |c_t|, so n_ti / |c_t| = W_ti / size_t
    prev = traj[rows]  # (nnz, m): L_{t-1} of the step each entry belongs to
    B = simulator.B_[columns][:, cols].T
    tau = None
    if simulator.B_slope_ is not None:  # time-varying effects: those of each entry's step
        tau = step_times(W.shape[0], simulator.time_scale_)[rows][:, None]
        B = B + tau * simulator.B_slope_[columns][:, cols].T
    if simulator.A_ is None:
        per = w[:, None] * B
    else:
        A = simulator.A_[columns][:, cols].T
        if tau is not None:
            A = A + tau * simulator.A_slope_[columns][:, cols].T
        per = w[:, None] * (A * prev + B) - (w / size[rows])[:, None] * prev
    values = per.mean(axis=1)
    out: list[dict[str, float]] = [{} for _ in batches]
    for t, col, v in zip(rows, cols, values, strict=True):
        out[t][simulator.train_ids_[col]] = float(v)
    return out
