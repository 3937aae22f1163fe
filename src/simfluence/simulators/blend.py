"""Simfluence-Linear on the loss, on its log, and the curriculum-blind mean, blended per test
example by cross-validation.

Simfluence-Linear fits ``L_t = alpha_t L_{t-1} + beta_t`` by least squares on the loss itself,
so the steps where the loss is large dominate the fit; where the loss is small (late training,
examples already learned) its rollouts are noisy, even negative, and the order of the test
examples' final losses is mostly lost there. The same model fitted on ``log L`` weighs every
loss level alike and stays positive; the curriculum-blind mean trajectory (`mean`) carries each
test example's typical level, which alone ranks final losses well. `BlendSimulator` fits all
three and predicts, for each test example ``j``,

    L_t(j) = w_j1 * linear_t(j) + w_j2 * exp(log-linear_t(j)) + w_j3 * mean_t(j),

``w_j`` on the simplex (non-negative, summing to 1), chosen to minimize the all-steps squared
error of free-running rollouts of held-out training runs (run-wise cross-validation; each linear
side at the ``l2`` its own cross-validation chose). It is stacking: model selection by the
protocol's own error, per test example. Curriculum effects are those of the two linear sides,
shrunk by ``1 - w_j3``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import AnyCurriculum, RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.baselines import MeanTrajectorySimulator
from simfluence.simulators.linear import DEFAULT_L2_GRID, LinearSimulator, run_folds

#: the log side's floor, as a share of the smallest positive recorded loss
LOG_FLOOR_SHARE = 0.1


def log_runs(runs: RunSet, floor: float) -> RunSet:
    """`runs` with every loss replaced by ``log(max(L, floor))``."""
    logged = [replace(r, losses=np.log(np.maximum(r.losses, floor))) for r in runs.runs]
    return RunSet(runs.train_ids, runs.test_ids, logged, runs.metadata, runs.source, runs.features)


#: resolution of the weight search on the simplex
WEIGHT_STEP = 0.02


def blend_moments(sides: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per test example, the moments of the least-squares blend of `sides` toward `true`.

    Args:
        sides: ``(K, R, T + 1, M)``, K rollouts of R runs; step 0 is ignored.
        true: ``(R, T + 1, M)``.

    Returns:
        ``Q`` ``(M, K, K)`` and ``q`` ``(M, K)``: the squared error of weights ``w`` is
        ``w Q w - 2 q w`` plus a constant.
    """
    x, y = sides[:, :, 1:], true[:, 1:]
    return np.einsum("artm,brtm->mab", x, x), np.einsum("artm,rtm->ma", x, y)


def simplex_weights(Q: np.ndarray, q: np.ndarray, step: float = WEIGHT_STEP) -> np.ndarray:
    """``(M, K)``: per test example, the weights on a grid of the simplex (spacing `step`)
    that minimize ``w Q w - 2 q w``."""
    n = round(1 / step)
    K = q.shape[1]
    grid = np.array(
        [c for c in itertools.product(range(n + 1), repeat=K - 1) if sum(c) <= n], dtype=float
    )
    grid = np.hstack([grid, n - grid.sum(axis=1, keepdims=True)]) / n  # (G, K)
    loss = np.einsum("ga,mab,gb->mg", grid, Q, grid) - 2 * q @ grid.T
    return grid[np.argmin(loss, axis=1)]


class BlendSimulator(Simulator):
    """Per test example, a cross-validated blend of Simfluence-Linear on the loss, on its log,
    and the curriculum-blind mean trajectory.

    Parameters: as `LinearSimulator` (``l2`` None: each side chooses its own by run-wise
    cross-validation; a number: both use it).

    Learned attributes:
        A_loss_, B_loss_, A_log_, B_log_: ``(M, P)``, each side's parameters (the log side's
            act on ``log L``).
        seen_: ``(P,)`` bool; batch_size_: ``b``.
        mean_change_: ``(T_max + 1, M)``, the mean side (see `MeanTrajectorySimulator`).
        weight_: ``(M, 3)``, each test example's weights of the loss, log and mean sides
            (non-negative, summing to 1).
        log_floor_: losses below it are raised to it before taking the log.
        l2_loss_, l2_log_: each side's ridge strength.
    """

    name = "linear-blend"

    def __init__(
        self,
        l2: float | None = None,
        l2_grid: Sequence[float] = DEFAULT_L2_GRID,
        cv_folds: int = 4,
        unseen: str = "error",
        batch_weighting: str = "mean",
    ) -> None:
        self.l2 = l2
        self.l2_grid = list(l2_grid)
        self.cv_folds = cv_folds
        self.unseen = unseen
        self.batch_weighting = batch_weighting

    def _side(self, l2: float | None) -> LinearSimulator:
        return LinearSimulator(
            l2=l2,
            l2_grid=self.l2_grid,
            cv_folds=self.cv_folds,
            unseen=self.unseen,
            batch_weighting=self.batch_weighting,
        )

    def _fit(self, runs: RunSet) -> None:
        if len(runs.runs) < 2:
            raise SimfluenceError(
                f"{self.name}: blending needs at least 2 training runs (got {len(runs.runs)})"
            )
        positive = [r.losses[r.losses > 0] for r in runs.runs]
        if not any(p.size for p in positive):
            raise SimfluenceError(f"{self.name}: no positive loss to take the log of")
        self.log_floor_ = LOG_FLOOR_SHARE * float(min(p.min() for p in positive if p.size))
        on_loss = self._side(self.l2).fit(runs)
        on_log = self._side(self.l2).fit(log_runs(runs, self.log_floor_))
        self.l2_loss_, self.l2_log_ = on_loss.l2_, on_log.l2_
        self.A_loss_, self.B_loss_ = on_loss.A_, on_loss.B_
        self.A_log_, self.B_log_ = on_log.A_, on_log.B_
        self.seen_, self.batch_size_ = on_loss.seen_, on_loss.batch_size_
        self.mean_change_ = MeanTrajectorySimulator().fit(runs).mean_change_
        self.weight_ = self._cross_validated_weights(runs)

    def _cross_validated_weights(self, runs: RunSet) -> np.ndarray:
        n_tests = len(runs.test_ids)
        Q, q = np.zeros((n_tests, 3, 3)), np.zeros((n_tests, 3))
        for train, valid in run_folds(runs, min(self.cv_folds, len(runs.runs))):
            curricula = [r.curriculum for r in valid.runs]
            initial = np.stack([r.initial_loss for r in valid.runs])
            on_loss = self._side(self.l2_loss_).fit(train)
            on_log = self._side(self.l2_log_).fit(log_runs(train, self.log_floor_))
            on_log.floor_ = -np.inf  # log losses have no floor; the blend floors its output
            mean = MeanTrajectorySimulator().fit(train)
            sides = np.stack(
                [
                    np.stack(on_loss.simulate_many(curricula, initial)),
                    np.exp(np.stack(on_log.simulate_many(curricula, self._log(initial)))),
                    np.stack(mean.simulate_many(curricula, initial)),
                ]
            )
            fold_Q, fold_q = blend_moments(sides, np.stack([r.losses for r in valid.runs]))
            Q, q = Q + fold_Q, q + fold_q
        return simplex_weights(Q, q)

    def _log(self, losses: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(losses, self.log_floor_))

    def sides(self) -> tuple[LinearSimulator, LinearSimulator, MeanTrajectorySimulator]:
        """The fitted loss-space and log-space simulators (the log side simulates ``log L``)
        and the mean trajectory."""
        self._check_fitted()
        out: list[Simulator] = []
        for A, B, l2 in ((self.A_loss_, self.B_loss_, self.l2_loss_),
                         (self.A_log_, self.B_log_, self.l2_log_)):  # fmt: skip
            side = self._side(l2)
            side.A_, side.B_, side.seen_ = A, B, self.seen_
            side.batch_size_, side.l2_ = self.batch_size_, l2
            out.append(side)
        out.append(MeanTrajectorySimulator())
        out[2].mean_change_ = self.mean_change_
        for side in out:
            side.train_ids_, side.test_ids_ = self.train_ids_, self.test_ids_
            side.initial_loss_ = self.initial_loss_
            side.floor_, side.floor_width_ = self.floor_, self.floor_width_
        out[1].floor_ = -np.inf  # log losses have no floor; the blend floors its output
        return out[0], out[1], out[2]  # type: ignore[return-value]

    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        on_loss, on_log, mean = self.sides()
        w = self.weight_.T[:, None, :]  # (3, 1, M)
        out = []
        for k, (a, b, c) in enumerate(
            zip(
                on_loss.simulate_many(curricula, initial),
                on_log.simulate_many(curricula, self._log(initial)),
                mean.simulate_many(curricula, initial),
                strict=True,
            )
        ):
            traj = w[0] * a + w[1] * np.exp(b) + w[2] * c
            traj[0] = initial[k]  # exactly, even below the log side's floor
            out.append(traj)
        return out
