"""Fitting the ridge simulators in shards of test examples, on any execution backend.

Every test example of Simfluence-Linear (and -Additive) is its own regression: only the choice
of ``l2``, one value for all, ties them together. So a fit splits into shards of test examples
(`RunSet.select_tests`) in two rounds of independent work units (`simfluence.backends`):

1. **cross-validation** (when ``l2`` is not given): each shard walks the ``l2`` grid on its test
   examples (or on its part of the ``cv_tests`` subset) and returns its curve; the parent
   combines them, weighting each shard by its number of test examples, which gives exactly
   the full data's run-wise CV error (the error is a mean over (run, test example)
   trajectories). A shard stops walking the grid by the same ``patience`` rule as an unsharded
   fit, so only the ``l2`` values that every shard reached are compared;
2. **solve**: each shard solves its test examples at the chosen ``l2`` and returns its rows
   of ``A_`` and ``B_``.

Memory per unit is about that of an unsharded fit on ``M / shards`` test examples; the parent
holds the run set and the assembled ``(M, P)`` parameters. Results are the same on every
backend for the same shards (bit for bit); against an unsharded fit they agree to the
conjugate-gradient tolerance (each shard stops on its own worst residual).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simfluence.backends import shared_backend
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import floor_width, loss_floor


@dataclass
class ShardWork:
    """One shard's work: ``work((phase, grid, runs))`` for a fresh simulator of `cls` with
    `params` (unsharded, serial) and the full fit's batch size.

    ``phase == "cv"`` returns the shard's CV curve ``[[l2, mse], ...]``; ``"solve"`` returns
    ``(A, B, cg_iterations, cg_residual)`` with ``A``, ``B`` of shape ``(m, P)`` (``A`` None
    for the additive model).
    """

    cls: type
    params: dict[str, Any]
    batch_size: float

    def _simulator(self) -> Any:
        simulator = self.cls(**{**self.params, "test_shards": None, "backend": "serial"})
        simulator.batch_size_ = self.batch_size
        return simulator

    def __call__(self, job: tuple[str, list[float], RunSet]) -> Any:
        phase, grid, runs = job
        simulator = self._simulator()
        if phase == "cv":
            # cross-validation scores floored rollouts: the full fit's floors, restricted to
            # this shard's test examples (the floor of a column depends on that column only)
            simulator.floor_, simulator.floor_width_ = loss_floor(runs), floor_width(runs)
            return simulator._cross_validate(runs, grid)
        A, B = next(simulator._path(simulator.design(runs), grid, final=True))
        return (
            A,
            B,
            getattr(simulator, "cg_iterations_", None),
            getattr(simulator, "cg_residual_", None),
        )


def shard_columns(n_tests: int, shards: int) -> list[np.ndarray]:
    """``shards`` contiguous, nearly equal blocks of ``range(n_tests)`` (none empty)."""
    if isinstance(shards, bool) or not isinstance(shards, int | np.integer) or shards < 1:
        raise SimfluenceError(f"test_shards must be a whole number >= 1, got {shards!r}")
    return [c for c in np.array_split(np.arange(n_tests), min(int(shards), n_tests)) if c.size]


def combine_curves(curves: list[list[list[float]]], weights: list[int]) -> list[list[float]]:
    """The weighted mean of per-shard CV curves over the ``l2`` prefix all of them reached."""
    length = min(len(c) for c in curves)
    total = float(sum(weights))
    out = []
    for k in range(length):
        lam = curves[0][k][0]
        mse = sum(w * c[k][1] for c, w in zip(curves, weights, strict=True)) / total
        out.append([lam, float(mse)])
    return out


def fit_in_shards(simulator: Any, runs: RunSet, cv_runs: RunSet, grid: list[float]) -> None:
    """Set `simulator`'s ``A_``, ``B_``, ``l2_``, ``cv_mse_`` (and CG statistics) by the two
    rounds of the module docstring; ``batch_size_`` must already be set, ``seen_`` is set by
    the caller. `cv_runs`: the run set cross-validation uses (all or a subset of the tests)."""
    backend = shared_backend(simulator.backend)
    shards = simulator.test_shards or backend.parallelism
    work = ShardWork(type(simulator), simulator.get_params(), simulator.batch_size_)
    # a shared backend: it stays up for the next fit (calibration refits several times)
    simulator.cv_mse_ = None
    if len(grid) > 1:
        cv_blocks = shard_columns(len(cv_runs.test_ids), shards)
        jobs = [("cv", grid, cv_runs.select_tests(cols)) for cols in cv_blocks]
        curves: list[Any] = [None] * len(jobs)
        for position, curve in backend.map_unordered(work, jobs):
            curves[position] = curve
        simulator.cv_mse_ = combine_curves(curves, [len(c) for c in cv_blocks])
        finite = [(mse, lam) for lam, mse in simulator.cv_mse_ if np.isfinite(mse)]
        grid = [min(finite)[1] if finite else grid[0]]
    blocks = shard_columns(len(runs.test_ids), shards)
    jobs = [("solve", grid, runs.select_tests(cols)) for cols in blocks]
    n_tests, n_train = len(runs.test_ids), len(runs.train_ids)
    A = None
    B = np.empty((n_tests, n_train))
    iterations, residuals = [], []
    for position, (a, b, its, res) in backend.map_unordered(work, jobs):
        rows = blocks[position]
        B[rows] = b
        if a is not None:
            if A is None:
                A = np.empty((n_tests, n_train))
            A[rows] = a
        if its is not None:
            iterations.append(its)
            residuals.append(res)
    simulator.l2_ = grid[0]
    simulator.A_, simulator.B_ = A, B
    if iterations:
        simulator.cg_iterations_ = int(max(iterations))
        simulator.cg_residual_ = float(max(residuals))
