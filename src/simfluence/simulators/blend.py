"""Simfluence-Linear in loss space and in log-loss space, blended per test example.

Simfluence-Linear fits ``L_t = alpha_t L_{t-1} + beta_t`` by least squares on the loss itself,
so the steps where the loss is large dominate the fit, and small losses (the end of training,
the examples already learned) are fitted loosely: rollouts can even go negative there. The
same model fitted on ``log L`` weighs every loss level alike and stays positive, but is less
accurate where the loss is large. Which is better differs by test example and by workload, so
`BlendSimulator` fits both and predicts, for each test example ``j``,

    L_t(j) = w_j * linear_t(j) + (1 - w_j) * exp(log-linear_t(j)),   w_j in [0, 1],

with ``w_j`` the least-squares blend weight of the two sides' free-running rollouts of held-out
training runs (run-wise cross-validation, each side at the ``l2`` its own cross-validation
chose). It is model selection by the protocol's own error, per test example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import AnyCurriculum, RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.linear import DEFAULT_L2_GRID, LinearSimulator, run_folds

#: the log side's floor, as a share of the smallest positive recorded loss
LOG_FLOOR_SHARE = 0.1


def log_runs(runs: RunSet, floor: float) -> RunSet:
    """`runs` with every loss replaced by ``log(max(L, floor))``."""
    logged = [replace(r, losses=np.log(np.maximum(r.losses, floor))) for r in runs.runs]
    return RunSet(runs.train_ids, runs.test_ids, logged, runs.metadata, runs.source)


def blend_weights(
    on_loss: np.ndarray, on_log: np.ndarray, true: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(numerator, denominator)`` of the per-test least-squares weight of `on_loss` in
    ``w * on_loss + (1 - w) * on_log ~ true``; arrays ``(..., T + 1, M)``, step 0 ignored."""
    d = (on_loss - on_log)[..., 1:, :]
    e = (true - on_log)[..., 1:, :]
    axes = tuple(range(d.ndim - 1))
    return (d * e).sum(axis=axes), (d * d).sum(axis=axes)


class BlendSimulator(Simulator):
    """Per test example, a cross-validated blend of Simfluence-Linear on the loss and on its log.

    Parameters: as `LinearSimulator` (``l2`` None: each side chooses its own by run-wise
    cross-validation; a number: both use it).

    Learned attributes:
        A_loss_, B_loss_, A_log_, B_log_: ``(M, P)``, each side's parameters (the log side's
            act on ``log L``).
        seen_: ``(P,)`` bool; batch_size_: ``b``.
        weight_: ``(M,)`` in [0, 1], the weight of the loss side for each test example.
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
        self.weight_ = self._cross_validated_weights(runs)

    def _cross_validated_weights(self, runs: RunSet) -> np.ndarray:
        numerator = denominator = np.zeros(len(runs.test_ids))
        for train, valid in run_folds(runs, min(self.cv_folds, len(runs.runs))):
            curricula = [r.curriculum for r in valid.runs]
            initial = np.stack([r.initial_loss for r in valid.runs])
            on_loss = self._side(self.l2_loss_).fit(train)
            on_log = self._side(self.l2_log_).fit(log_runs(train, self.log_floor_))
            num, den = blend_weights(
                np.stack(on_loss.simulate_many(curricula, initial)),
                np.exp(np.stack(on_log.simulate_many(curricula, self._log(initial)))),
                np.stack([r.losses for r in valid.runs]),
            )
            numerator, denominator = numerator + num, denominator + den
        # identical sides (den = 0) carry no preference: weigh them equally
        weight = np.divide(numerator, denominator, out=np.full_like(numerator, 0.5),
                           where=denominator > 0)  # fmt: skip
        return np.clip(weight, 0.0, 1.0)

    def _log(self, losses: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(losses, self.log_floor_))

    def sides(self) -> tuple[LinearSimulator, LinearSimulator]:
        """The fitted loss-space and log-space simulators (the log side simulates ``log L``)."""
        self._check_fitted()
        out = []
        for A, B, l2 in ((self.A_loss_, self.B_loss_, self.l2_loss_),
                         (self.A_log_, self.B_log_, self.l2_log_)):  # fmt: skip
            side = self._side(l2)
            side.train_ids_, side.test_ids_ = self.train_ids_, self.test_ids_
            side.initial_loss_ = self.initial_loss_
            side.A_, side.B_, side.seen_ = A, B, self.seen_
            side.batch_size_, side.l2_ = self.batch_size_, l2
            out.append(side)
        return out[0], out[1]

    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        on_loss, on_log = self.sides()
        w = self.weight_
        out = []
        for k, (a, b) in enumerate(
            zip(
                on_loss.simulate_many(curricula, initial),
                on_log.simulate_many(curricula, self._log(initial)),
                strict=True,
            )
        ):
            traj = w * a + (1.0 - w) * np.exp(b)
            traj[0] = initial[k]  # exactly, even below the log side's floor
            out.append(traj)
        return out
