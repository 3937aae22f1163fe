"""Simfluence-Linear and Simfluence-Additive, fitted in closed form with run-wise CV of ``lam``.

Both shrink toward "no effect" (``A_i -> 1/b``, ``B_i -> 0``) with strength ``l2`` (in units of
observations: ``l2 = 1`` weighs the prior like one extra step that consumed the example). When
``l2`` is None it is chosen from ``l2_grid`` by K-fold cross-validation that holds out whole
training runs and scores free-running rollouts of the held-out runs by all-steps MSE, the
quantity the evaluation protocol reports (on all test examples, or on a seeded random subset of
``cv_tests`` of them: ``l2`` is one number for all, and a few hundred test examples rank it
as well as thousands at a fraction of the cost).

Large fits split over test examples (``test_shards``) and run the shards on an execution
backend (``backend``: ``serial``, ``process:N``, ``ray``...): see `simfluence.simulators.sharded`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from simfluence.backends import make_backend
from simfluence.errors import SimfluenceError
from simfluence.metrics import all_steps_mse
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import floor_width, loss_floor, soft_floor
from simfluence.simulators.dynamics import DynamicsSimulator, rollout_drifting
from simfluence.simulators.encoding import encode_runs
from simfluence.simulators.intervals import run_folds
from simfluence.simulators.memory import MemoryInputs
from simfluence.simulators.ridge import (
    AdditiveRidgeProblem,
    Design,
    LinearRidgeProblem,
    LinearSolution,
    loss_weights,
)
from simfluence.simulators.sharded import fit_in_shards

Params = tuple[np.ndarray | None, np.ndarray]
DEFAULT_L2_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def rollout_mse(
    runs: RunSet,
    A: np.ndarray | None,
    B: np.ndarray,
    batch_size: float,
    weighting: str,
    floor: tuple[np.ndarray | float, np.ndarray | float] = (-np.inf, 0.0),
    slopes: tuple[np.ndarray | None, np.ndarray] | None = None,
    time_scale: float = 0.0,
) -> float:
    """All-steps MSE of free-running rollouts of `runs` under parameters ``A``, ``B`` (M, P),
    floored (`soft_floor` with ``floor = (level, width)``) like every rollout the simulator
    reports; `slopes` ``(A', B')``: effects that drift over training (`rollout_drifting`)."""
    initial = np.stack([r.initial_loss for r in runs.runs])
    counts = encode_runs(runs, batch_size, weighting)
    simulated = rollout_drifting(counts, A, B, slopes, time_scale, initial)
    for traj in simulated:
        soft_floor(traj[1:], *floor)
    return all_steps_mse([r.recorded_losses for r in runs.runs], simulated).mean


@dataclass
class RidgeOffset:
    """What `LinearSimulator`'s ridge regression on one design starts from instead of "no
    effect" (``A = 1/b``, ``B = 0``): the fit is the offset plus a ridge departure from it.

    Attributes:
        prediction: ``(n, M)``, the teacher-forced predictions of ``L_next`` under the offset on
            the design's steps (the departure explains what they leave).
        A, B: ``(M, P)``, the offset's parameters.
        slopes: ``(A', B')``, its drift over training, kept as is in every rollout (None:
            static), with ``time_scale`` ``T0`` (`simfluence.simulators.dynamics`).
    """

    prediction: np.ndarray
    A: np.ndarray
    B: np.ndarray
    slopes: tuple[np.ndarray | None, np.ndarray] | None = None
    time_scale: float = 0.0


class RidgePrior(Protocol):
    """A prior for `LinearSimulator.fit_toward` (the hybrid's featurized effects): its offset
    on a design, fitted on the design's own runs (a cross-validation fold's training runs,
    `final` False, or all the fitted runs)."""

    def offset(self, design: Design, final: bool) -> RidgeOffset: ...


class _RidgeSimulator(DynamicsSimulator):
    """Shared CV machinery; subclasses say how to solve for every ``l2`` of a grid."""

    l2_: float
    cv_mse_: list[list[float]] | None

    def __init__(
        self,
        l2: float | None = None,
        l2_grid: Sequence[float] = DEFAULT_L2_GRID,
        cv_folds: int = 4,
        patience: int = 2,
        unseen: str = "error",
        batch_weighting: str = "mean",
        cv_tests: int | None = None,
        test_shards: int | None = None,
        backend: str = "serial",
    ) -> None:
        super().__init__(unseen=unseen, batch_weighting=batch_weighting)
        self.l2 = l2
        self.l2_grid = list(l2_grid)
        self.cv_folds = cv_folds
        self.patience = patience
        self.cv_tests = cv_tests
        self.test_shards = test_shards
        self.backend = backend

    def _calibration_params(self) -> dict[str, Any]:
        # the copies fitted in calibration keep the l2 chosen here: no nested cross-validation
        return {**super()._calibration_params(), "l2": self.l2_}

    def _validate_params(self, runs: RunSet) -> list[float]:
        grid = [float(self.l2)] if self.l2 is not None else sorted(self.l2_grid, reverse=True)
        if not grid or min(grid) <= 0:
            raise SimfluenceError(f"{self.name}: l2 values must be positive, got {grid}")
        if self.l2 is None and len(grid) > 1 and len(runs.runs) < 2:
            raise SimfluenceError(
                f"{self.name}: choosing l2 by cross-validation needs at least 2 training runs "
                f"(got {len(runs.runs)}); pass l2 explicitly"
            )
        if self.cv_folds < 2:
            raise SimfluenceError(f"{self.name}: cv_folds must be at least 2")
        for name in ("cv_tests", "test_shards"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
            ):
                raise SimfluenceError(f"{self.name}: {name} must be None or >= 1, got {value!r}")
        return grid

    def _cv_runs(self, runs: RunSet) -> RunSet:
        """The runs cross-validation scores: all test examples, or `cv_tests` of them drawn
        at random (seed 0, sorted)."""
        n_tests = len(runs.test_ids)
        if self.cv_tests is None or self.cv_tests >= n_tests:
            return runs
        columns = np.sort(np.random.default_rng(0).choice(n_tests, self.cv_tests, replace=False))
        return runs.select_tests(columns)

    def _fit_parameters(self, runs: RunSet) -> None:
        self._fit_ridge(runs)

    def _fit_ridge(self, runs: RunSet, prior: RidgePrior | None = None) -> RidgeOffset | None:
        """Choose ``l2`` and set ``A_``, ``B_``, ``seen_``, shrunk toward "no effect" or toward
        `prior`; returns the prior's offset on all of `runs` (None without a prior)."""
        grid = self._validate_params(runs)
        if self.test_shards is not None or self.backend != "serial":
            if prior is not None:
                raise SimfluenceError(f"{self.name}: a fit toward a prior is not sharded")
            make_backend(self.backend)  # a bad spec fails before any work
            self.seen_ = Design.seen_of(encode_runs(runs, self.batch_size_, self.batch_weighting))
            fit_in_shards(self, runs, self._cv_runs(runs), grid)
            return None
        self.cv_mse_ = None
        if len(grid) > 1:
            self.cv_mse_ = self._cross_validate(self._cv_runs(runs), grid, prior)
            finite = [(mse, l2) for l2, mse in self.cv_mse_ if np.isfinite(mse)]
            grid = [min(finite)[1] if finite else grid[0]]
        design = self.design(runs)
        self.l2_ = grid[0]
        offset = None if prior is None else prior.offset(design, final=True)
        self.A_, self.B_ = next(self._path_from(design, grid, True, offset))
        self.seen_ = design.seen
        return offset

    def _cross_validate(
        self, runs: RunSet, grid: list[float], prior: RidgePrior | None = None
    ) -> list[list[float]]:
        """``[[l2, mse], ...]`` in descending ``l2``: mean over folds of held-out rollout MSE.

        The folds walk the grid together, from smooth to flexible, and stop once the CV error
        has risen `patience` times in a row past its minimum: the small-``l2`` solves are the
        slow ones, and the curve is U-shaped. With a `prior`, each fold shrinks toward the
        prior fitted on the fold's training runs.
        """
        folds = run_folds(runs, min(self.cv_folds, len(runs.runs)))
        designs = [self.design(train) for train, _ in folds]
        offsets = [None if prior is None else prior.offset(d, final=False) for d in designs]
        paths = [self._path_from(d, grid, False, o) for d, o in zip(designs, offsets, strict=True)]
        floor = (self.floor_, self.floor_width_)
        if np.ndim(self.floor_) and np.shape(self.floor_)[0] != len(runs.test_ids):
            # a `cv_tests` subset of the test examples: the floors of those columns (both are
            # per test example, so this is the fitted floors restricted to them)
            floor = (loss_floor(runs), floor_width(runs))
        curve: list[list[float]] = []
        best, rises = np.inf, 0
        for lam in grid:
            mse = float(
                np.mean(
                    [
                        self._fold_mse(valid, next(path), floor, offset)
                        for path, offset, (_, valid) in zip(paths, offsets, folds, strict=True)
                    ]
                )
            )
            curve.append([lam, mse])
            rises = 0 if mse < best else rises + 1
            best = min(best, mse)
            if rises >= self.patience:
                break
        return curve

    def _path(self, design: Design, grid: list[float], final: bool) -> Iterator[Params]:
        """``(A, B)`` of shape ``(M, P)`` for each ``l2`` of `grid`, in order; `final` asks for
        full precision (cross-validation needs less)."""
        raise NotImplementedError

    def _path_toward(
        self, design: Design, grid: list[float], final: bool, offset: RidgeOffset
    ) -> Iterator[Params]:
        """`_path` shrunk toward a prior's `offset` instead of "no effect"."""
        raise SimfluenceError(f"{self.name}: cannot be fitted toward a prior")

    def _path_from(
        self, design: Design, grid: list[float], final: bool, offset: RidgeOffset | None
    ) -> Iterator[Params]:
        """`_path`, or `_path_toward` a prior's `offset` when there is one."""
        if offset is None:
            return self._path(design, grid, final=final)
        return self._path_toward(design, grid, final, offset)

    def _validation_mse(
        self,
        runs: RunSet,
        params: Params,
        floor: tuple[Any, Any],
        slopes: tuple[np.ndarray | None, np.ndarray] | None = None,
        time_scale: float = 0.0,
    ) -> float:
        """Rollout all-steps MSE of `runs` under one point of `_path`, floored as reported
        (`floor`: ``(level, width)`` of `soft_floor`); `slopes`, `time_scale`: a prior's drift."""
        return rollout_mse(
            runs, *params, self.batch_size_, self.batch_weighting, floor, slopes, time_scale
        )

    def _fold_mse(
        self, runs: RunSet, params: Params, floor: tuple[Any, Any], offset: RidgeOffset | None
    ) -> float:
        """`_validation_mse`, with the drift of a prior's `offset` when there is one."""
        if offset is None:
            return self._validation_mse(runs, params, floor)
        return self._validation_mse(runs, params, floor, offset.slopes, offset.time_scale)


class LinearSimulator(MemoryInputs, _RidgeSimulator):
    """Simfluence-Linear: per training example, a multiplicative ``A_i(z)`` and additive ``B_i(z)``.

    Parameters:
        l2: ridge strength toward "no effect"; None chooses it by run-wise cross-validation.
        l2_grid: candidates for the cross-validation.
        cv_folds: folds of whole training runs.
        unseen: ``"error"`` (default): simulating a training id absent from the fitted runs is an
            error; ``"prior"``: such an id has no effect (``A = 1/b``, ``B = 0``).
        batch_weighting: ``"mean"`` (default): each batch's sums are scaled by ``b / |c_t|``
            (training minimizes the batch mean); ``"sum"``: the paper's raw sums.
        tol: relative residual at which conjugate gradients stop.
        max_iter: conjugate-gradient iterations at most (per ``l2``).
        loss_power: weight each step's squared error by ``(L_{t-1} + c)^-loss_power`` (per test
            example, ``c`` a tenth of its median loss; see `ridge.loss_weights`). 0 (default)
            is the paper's ordinary least squares; larger values fit small losses more
            precisely (better ranking of final losses) at some cost in all-steps MSE.

        cv_tol: the same during cross-validation, where ranking ``l2`` values needs less.
        patience: cross-validation stops after this many rises of the error past its minimum.
        memory: optimizer memory (`simulators.memory`): ``"none"`` (default, the paper's
            model), ``"adam"`` (the recorded optimizer's first-moment decay), ``"lr"`` (effects
            scaled by the recorded learning rate of each step), ``"adam+lr"``, a decay ``b``,
            ``"<b>+lr"``, or ``"auto"``: chosen with ``l2`` by the same cross-validation.

    Learned attributes: ``A_``, ``B_`` (M, P), ``seen_`` (P,), ``l2_``, ``cv_mse_`` (``[l2, mse]``
    pairs in descending ``l2`` as far as the search went, or None when `l2` was given),
    ``batch_size_`` (``b``, the median batch size of the training runs),
    ``cg_iterations_`` and ``cg_residual_`` of the final solve; ``memory_``,
    ``memory_scale_``, ``memory_cv_`` (the kernel, see `memory.MemoryInputs`).
    """

    name = "linear"

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
        memory: str | float = "none",
    ) -> None:
        super().__init__(
            l2,
            l2_grid,
            cv_folds,
            patience,
            unseen,
            batch_weighting,
            cv_tests,
            test_shards,
            backend,
        )
        self.tol = tol
        self.cv_tol = cv_tol
        self.max_iter = max_iter
        self.loss_power = loss_power
        self.memory = memory

    def _validate_params(self, runs: RunSet) -> list[float]:
        if not 0 <= self.loss_power <= 4:
            raise SimfluenceError(
                f"{self.name}: loss_power must be between 0 and 4, got {self.loss_power}"
            )
        return super()._validate_params(runs)

    def fit_toward(
        self, runs: RunSet, prior: RidgePrior, batch_size: float, floor: tuple[Any, Any]
    ) -> RidgeOffset:
        """Choose ``l2`` and set ``A_``, ``B_`` shrunk toward `prior` instead of "no effect":
        the ridge regression inside a composite simulator (`hybrid`) that is fitting `runs`
        and gives its batch size ``b`` and ``(floor_, floor_width_)``. Returns the prior's
        offset on all of `runs`; ``l2_``, ``cv_mse_`` and ``cg_*`` are set as by `fit`."""
        self.batch_size_ = batch_size
        self.floor_, self.floor_width_ = floor
        offset = self._fit_ridge(runs, prior)
        assert offset is not None  # a prior gives an offset; sharding refuses one
        return offset

    def _problem(
        self, design: Design, prior_prediction: np.ndarray | None = None
    ) -> LinearRidgeProblem:
        weights = loss_weights(design.prev, self.loss_power) if self.loss_power else None
        return LinearRidgeProblem(design, 1.0 / self.batch_size_, weights, prior_prediction)

    def _solutions(
        self, problem: LinearRidgeProblem, grid: list[float], final: bool
    ) -> Iterator[LinearSolution]:
        tol = self.tol if final else self.cv_tol
        solution = None
        for lam in grid:  # descending: each solution warm-starts the next, less smooth one
            solution = problem.solve(lam, start=solution, tol=tol, max_iter=self.max_iter)
            if final:
                self.cg_iterations_ = solution.iterations
                self.cg_residual_ = solution.max_relative_residual
            yield solution

    def _path(self, design: Design, grid: list[float], final: bool) -> Iterator[Params]:
        prior_a = 1.0 / self.batch_size_
        for solution in self._solutions(self._problem(design), grid, final):
            yield (prior_a + solution.delta_A).T.copy(), solution.delta_B.T.copy()

    def _path_toward(
        self, design: Design, grid: list[float], final: bool, offset: RidgeOffset
    ) -> Iterator[Params]:
        problem = self._problem(design, offset.prediction)
        for solution in self._solutions(problem, grid, final):
            yield offset.A + solution.delta_A.T, offset.B + solution.delta_B.T


class AdditiveSimulator(_RidgeSimulator):
    """Simfluence-Additive: ``L_t = L_{t-1} + sum_{i in c_t} B_i(z)`` (``alpha = 1``, i.e.
    ``A_i = 1/b`` for batches of size ``b``), ``B`` learned by ridge regression toward 0.

    Parameters and learned attributes as `LinearSimulator`, without ``tol``/``max_iter``;
    ``A_`` is None. (Its solve is one eigendecomposition shared by all test examples, so
    sharding it over test examples repeats that work in every shard.)
    """

    name = "additive"

    def _path(self, design: Design, grid: list[float], final: bool) -> Iterator[Params]:
        problem = AdditiveRidgeProblem(design)
        for lam in grid:
            yield None, problem.solve(lam).T.copy()
