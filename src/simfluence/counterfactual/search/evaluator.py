"""The search's objective: many layouts rolled out at once (`_Evaluator`), confined to the trust
region, the recorded per-step lowest losses (`trust_region_rollouts`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simfluence.counterfactual.attribution.rollouts import _initial
from simfluence.simulators.base import Simulator, soft_floor
from simfluence.simulators.dynamics import DynamicsSimulator, step_times

#: floats gathered per evaluation chunk (bounds memory at about 16 bytes each)
_CHUNK_FLOATS = 4_000_000


TRUST_REGION = (
    "candidates consumed in the fitted runs, each once per epoch (the recorded protocol); at "
    "every step no test example's simulated loss may go below the lowest loss recorded for it "
    "at that step in any fitted run (gains beyond that are not credited)"
)


class _Evaluator:
    """Objective of many layouts ``(N, E, K)`` at once: ``(N,)`` mean final loss of `columns`
    plus `offset` (the pessimistic objective), every step floored at the simulator's floor and,
    given an `envelope` ``(T_max + 1, M)``, at the trust region's per-step lowest loss.

    Dynamics simulators are rolled out directly from the layouts (a gather of the parameters
    of every position, summed per batch, then ``T`` vectorized steps), the same arithmetic as
    `rollout`; other simulators go through `simulate_many`.
    """

    def __init__(
        self,
        simulator: Simulator,
        columns: np.ndarray,
        initial: np.ndarray,
        batch_size: int,
        envelope: np.ndarray | None = None,
        offset: float = 0.0,
    ) -> None:
        self.simulator = simulator
        self.columns = columns
        self.initial = initial
        self.batch_size = batch_size
        self.count = 0
        self.envelope = None if envelope is None else envelope[:, columns]
        self.offset = offset
        if isinstance(simulator, DynamicsSimulator):
            self.AT = None if simulator.A_ is None else simulator.A_[columns].T.copy()
            self.BT = simulator.B_[columns].T.copy()
            self.floor = tuple(
                np.broadcast_to(np.asarray(f, dtype=np.float64), initial.shape)[columns].copy()
                for f in (simulator.floor_, simulator.floor_width_)
            )
            self.slopes = None  # time-varying effects: A' and B' of `columns`, transposed
            if simulator.B_slope_ is not None:
                A1 = simulator.A_slope_
                self.slopes = (
                    None if A1 is None else A1[columns].T.copy(),
                    simulator.B_slope_[columns].T.copy(),
                )

    def curriculum(self, layout: np.ndarray) -> list[list[str]]:
        ids = self.simulator.train_ids_
        b = self.batch_size
        return [[ids[i] for i in row[s : s + b]] for row in layout for s in range(0, row.size, b)]

    def __call__(self, layouts: np.ndarray) -> np.ndarray:
        return self.predict(layouts) + self.offset

    def predict(self, layouts: np.ndarray) -> np.ndarray:
        """``(N,)`` mean final loss of `columns` inside the trust region (no offset)."""
        self.count += len(layouts)
        if not isinstance(self.simulator, DynamicsSimulator):
            curricula = [self.curriculum(layout) for layout in layouts]
            if self.envelope is None:
                trajs = self.simulator.simulate_many(curricula, self.initial)
            else:
                trajs = trust_region_rollouts(self.simulator, curricula, self.initial)
            return np.array([t[-1, self.columns].mean() for t in trajs])
        n, epochs, size = layouts.shape
        step = max(1, _CHUNK_FLOATS // (epochs * size * len(self.columns)))
        return np.concatenate([self._dynamics(layouts[s : s + step]) for s in range(0, n, step)])

    def _dynamics(self, layouts: np.ndarray) -> np.ndarray:
        sim = self.simulator
        size = layouts.shape[2]
        starts = np.arange(0, size, self.batch_size)
        counts = np.diff(np.append(starts, size))
        weight = sim.batch_size_ / counts if sim.batch_weighting == "mean" else np.ones(len(starts))
        weight = weight[None, None, :, None]
        n = len(layouts)

        def per_step(table: np.ndarray) -> np.ndarray:  # (n, T, m): batch sums of each step
            sums = np.add.reduceat(table[layouts], starts, axis=2) * weight
            return sums.reshape(n, -1, table.shape[1])

        beta = per_step(self.BT)
        tau = None
        if self.slopes is not None:
            tau = step_times(beta.shape[1], sim.time_scale_)[None, :, None]
            beta += tau * per_step(self.slopes[1])
        loss = np.broadcast_to(self.initial[self.columns], (n, len(self.columns))).copy()
        alpha = None
        if self.AT is not None:
            alpha = per_step(self.AT)
            if tau is not None and self.slopes[0] is not None:
                alpha += tau * per_step(self.slopes[0])
        for t in range(beta.shape[1]):  # `rollout`'s arithmetic, floor included
            if alpha is not None:
                loss *= alpha[:, t]
            loss += beta[:, t]
            if self.envelope is not None:
                np.maximum(loss, self.envelope[min(t + 1, len(self.envelope) - 1)], out=loss)
        return soft_floor(loss, *self.floor).mean(axis=1)  # as `simulate_many` reports it


def trust_region_rollouts(
    simulator: Simulator,
    curricula: Sequence[Sequence[Sequence[str]]],
    initial_loss: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Rollouts ``(T_c + 1, M)`` inside the search's trust region: at every step no simulated
    loss goes below the lowest loss recorded at that step (`Simulator.envelope_`), and the
    rollout continues from there; plain `simulate_many` for a simulator without an envelope."""
    initial = _initial(simulator, initial_loss)
    envelope = getattr(simulator, "envelope_", None)
    if envelope is None:
        return simulator.simulate_many(curricula, initial)
    envelope = np.asarray(envelope, dtype=np.float64)
    if isinstance(simulator, DynamicsSimulator):
        start = np.broadcast_to(initial, (len(curricula), initial.size))
        counts = simulator.encode(curricula)
        trajectories = simulator.rollout_encoded(counts, start, envelope=envelope)
        for traj in trajectories:  # as `simulate_many` reports them
            soft_floor(traj[1:], simulator.floor_, simulator.floor_width_)
        return trajectories
    out = []
    for traj in simulator.simulate_many(curricula, initial):
        rows = np.minimum(np.arange(1, traj.shape[0]), len(envelope) - 1)
        traj[1:] = np.maximum(traj[1:], envelope[rows])
        out.append(traj)
    return out
