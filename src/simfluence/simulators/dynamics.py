"""Simulators of the Simfluence-Linear family and their shared, vectorized rollout.

Every member predicts, for each test example ``z`` independently,

    L_t(z) = alpha_t(z) * L_{t-1}(z) + beta_t(z),
    alpha_t(z) = sum_{i in c_t} A_i(z),   beta_t(z) = sum_{i in c_t} B_i(z),

with the batch a multiset (a repeated id counts twice). Purely additive members (Simfluence-
Additive, TracIn, influence functions) have ``alpha_t = 1``.

Batch weighting. Training minimizes the *mean* loss over a batch, so an example in a batch of 3
pulls harder than one in a batch of 4. With ``batch_weighting="mean"`` (the default) both sums
are scaled by ``b / |c_t|``, ``b`` the typical (median) batch size of the fitted runs: a batch
of neutral examples (``A_i = 1/b``, ``B_i = 0``) then leaves the loss unchanged whatever its
size, and removing an example from a batch does not by itself shrink the loss by a quarter.
For batches of size ``b`` this is exactly the paper's model; ``batch_weighting="sum"`` is the
paper's raw sum for every batch size.

Signs: a negative ``B_i(z)`` lowers test example ``z``'s loss each time ``i`` is consumed;
``A_i(z) < 1/b`` (``b`` the batch size) shrinks the loss multiplicatively.

Time-varying members (the featurized simulators) let an example's effects drift linearly over
training: consumed at step ``t`` (1-based), example ``i`` acts with ``A_i + tau_t A'_i`` and
``B_i + tau_t B'_i``, ``tau_t = min((t - 1) / time_scale, 1)`` (``A'``, ``B'``: ``A_slope_``,
``B_slope_``; ``time_scale_`` the typical run length). A rollout then sees a time-augmented count
matrix ``[N, diag(tau) N]`` and the stacked parameters ``[A, A']``: the same arithmetic.
"""

from __future__ import annotations

import copy
import os
from abc import abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import sparse

from simfluence.errors import CurriculumError, SimfluenceError
from simfluence.runlog.runs import AnyCurriculum, RunSet, count_matrix
from simfluence.simulators.base import Simulator, soft_floor
from simfluence.simulators.encoding import BATCH_WEIGHTINGS, encode_runs, weight_batches
from simfluence.simulators.ridge import Design

#: curricula rolled out together; bounds memory at about chunk * T * 2M * 8 bytes per thread
ROLLOUT_CHUNK = 64


def _rollout_block(
    block: Sequence[sparse.csr_matrix],
    coef_matrix: np.ndarray,
    multiplicative: bool,
    initial: np.ndarray,
    envelope: np.ndarray | None,  # (S, M)
) -> list[np.ndarray]:
    n_tests = initial.shape[1]
    n_steps = max(c.shape[0] for c in block)
    padded = [
        c
        if c.shape[0] == n_steps
        else sparse.vstack([c, sparse.csr_matrix((n_steps - c.shape[0], c.shape[1]))])
        for c in block
    ]
    # one sparse product gives alpha and beta of every step of every curriculum in the block
    coef = np.asarray(sparse.vstack(padded, format="csr") @ coef_matrix)
    coef = coef.reshape(len(block), n_steps, -1)
    traj = np.empty((len(block), n_steps + 1, n_tests))
    traj[:, 0] = initial
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(n_steps):
            if multiplicative:
                np.multiply(coef[:, t, :n_tests], traj[:, t], out=traj[:, t + 1])
                traj[:, t + 1] += coef[:, t, n_tests:]
            else:
                np.add(traj[:, t], coef[:, t], out=traj[:, t + 1])
            if envelope is not None:  # inside the recursion: the next step starts from it
                row = envelope[min(t + 1, len(envelope) - 1)]
                np.maximum(traj[:, t + 1], row, out=traj[:, t + 1])
    return [traj[k, : c.shape[0] + 1] for k, c in enumerate(block)]


def rollout(
    counts: Sequence[sparse.csr_matrix],
    A: np.ndarray | None,
    B: np.ndarray,
    initial: np.ndarray,
    chunk: int = ROLLOUT_CHUNK,
    threads: int | None = None,
    envelope: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Free-running rollouts of many curricula, vectorized across curricula and test examples.

    Args:
        counts: ``C`` count matrices, the ``c``-th of shape ``(T_c, P)``.
        A: shape ``(M, P)``, multiplicative parameters, or None for ``alpha = 1``.
        B: shape ``(M, P)``, additive parameters.
        initial: shape ``(C, M)``, losses at step 0.
        envelope: shape ``(S, M)``: a hard lower bound per step (row ``t`` for step ``t``, the
            last row beyond ``S``), e.g. the search's trust region; None: none.
        chunk: curricula per block; blocks run on `threads` threads (default: all cores; scipy's
            sparse products and numpy's arithmetic release the GIL).

    Returns:
        ``C`` arrays of shape ``(T_c + 1, M)``.
    """
    coef_matrix = B.T if A is None else np.hstack([A.T, B.T])
    starts = range(0, len(counts), chunk)
    jobs = [
        (counts[s : s + chunk], coef_matrix, A is not None, initial[s : s + chunk], envelope)
        for s in starts
    ]
    workers = min(len(jobs), threads or os.cpu_count() or 1)
    if workers <= 1:
        blocks = [_rollout_block(*job) for job in jobs]
    else:
        with ThreadPoolExecutor(workers) as pool:
            blocks = list(pool.map(lambda job: _rollout_block(*job), jobs))
    return [traj for block in blocks for traj in block]


def step_times(n_steps: int, time_scale: float) -> np.ndarray:
    """``tau_t`` of steps ``t = 1..n_steps``: ``min((t - 1) / time_scale, 1)``, shape ``(T,)``."""
    return np.minimum(np.arange(n_steps) / time_scale, 1.0)


def time_augmented(counts: sparse.csr_matrix, time_scale: float) -> sparse.csr_matrix:
    """``[N, diag(tau) N]``, shape ``(T, 2P)``, for a ``(T, P)`` count matrix ``N``."""
    tau = sparse.diags(step_times(counts.shape[0], time_scale))
    return sparse.hstack([counts, tau @ counts], format="csr")


def rollout_drifting(
    counts: Sequence[sparse.csr_matrix],
    A: np.ndarray | None,
    B: np.ndarray,
    slopes: tuple[np.ndarray | None, np.ndarray] | None,
    time_scale: float,
    initial: np.ndarray,
    envelope: np.ndarray | None = None,
) -> list[np.ndarray]:
    """`rollout` with effects that drift over training: ``(A + tau_t A', B + tau_t B')`` at
    step ``t`` (`slopes` = ``(A', B')``, each ``(M, P)`` or None for A'; None: static);
    `envelope` as for `rollout`."""
    if slopes is not None:
        counts = [time_augmented(c, time_scale) for c in counts]
        A = None if A is None else np.hstack([A, slopes[0]])
        B = np.hstack([B, slopes[1]])
    return rollout(counts, A, B, initial, envelope=envelope)


class DynamicsSimulator(Simulator):
    """Base of the Simfluence-Linear family: holds ``A_`` (or None) and ``B_``, and rolls out.

    Learned attributes:
        A_: shape ``(M, P)`` or None (purely additive: ``alpha = 1``).
        B_: shape ``(M, P)``.
        seen_: shape ``(P,)`` bool, training examples that the fitted runs consumed at least
            once. Parameters of unseen examples carry no information.
        batch_size_: ``b``, the median batch size of the fitted runs.
        fold_A_, fold_B_: shape ``(K, M, P)`` float32, set by `calibrate`: the parameters of
            the ``K`` copies fitted without one fold of runs each (`fold_simulators`); no
            ``fold_A_`` for additive simulators (and ``fold_A_slope_``, ``fold_B_slope_`` for
            time-varying ones).
        A_slope_, B_slope_, time_scale_: time-varying members only (module docstring); None,
            None, 0 otherwise.

    Parameters:
        unseen: ``"error"`` (default): simulating a training id absent from the fitted runs is
            an error; ``"prior"``: such an id has no effect (``A = 1/b``, ``B = 0``).
        batch_weighting: ``"mean"`` (default) or ``"sum"``, see the module docstring.
    """

    A_: np.ndarray | None
    B_: np.ndarray
    seen_: np.ndarray

    batch_size_: float
    A_slope_: np.ndarray | None = None
    B_slope_: np.ndarray | None = None
    time_scale_: float = 0.0

    def __init__(self, unseen: str = "error", batch_weighting: str = "mean") -> None:
        self.unseen = unseen
        self.batch_weighting = batch_weighting

    def _check_policies(self) -> None:
        if self.unseen not in ("error", "prior"):
            raise SimfluenceError(f"unseen={self.unseen!r}: must be 'error' or 'prior'")
        if self.batch_weighting not in BATCH_WEIGHTINGS:
            raise SimfluenceError(
                f"batch_weighting={self.batch_weighting!r}: must be one of {BATCH_WEIGHTINGS}"
            )

    def _fit(self, runs: RunSet) -> None:
        self._check_policies()
        sizes = np.concatenate([[len(b) for b in r.curriculum] for r in runs.runs])
        self.batch_size_ = float(np.median(sizes))
        self._fit_parameters(runs)

    @abstractmethod
    def _fit_parameters(self, runs: RunSet) -> None:
        """Set ``A_``, ``B_``, ``seen_`` (``batch_size_`` is already set)."""

    # -- the fold copies of `calibrate` --------------------------------------------------------
    def _keep_fold_copies(self, copies: list[Simulator]) -> None:
        usable = [c for c in copies if isinstance(c, DynamicsSimulator)]
        if len(usable) < 2:
            return
        # float32: they measure spread, and K copies of (M, P) add up
        self.fold_B_ = np.stack([c.B_ for c in usable]).astype(np.float32)
        if self.A_ is not None:
            self.fold_A_ = np.stack([c.A_ for c in usable]).astype(np.float32)
        if self.B_slope_ is not None:  # time-varying: the drift is part of the parameters
            self.fold_B_slope_ = np.stack([c.B_slope_ for c in usable]).astype(np.float32)
            if self.A_slope_ is not None:
                self.fold_A_slope_ = np.stack([c.A_slope_ for c in usable]).astype(np.float32)

    def fold_simulators(self) -> list[DynamicsSimulator]:
        """The ``K`` simulators fitted by `calibrate`, each without one fold of the runs (same
        ids, floor and batch weighting; empty when not calibrated). Their spread measures how
        much the fitted parameters depend on which runs were recorded."""
        fold_B = getattr(self, "fold_B_", None)
        if fold_B is None:
            return []
        fold_A = getattr(self, "fold_A_", None)
        fold_slopes = getattr(self, "fold_A_slope_", None), getattr(self, "fold_B_slope_", None)
        out = []
        for k in range(len(fold_B)):
            twin = copy.copy(self)
            twin.B_ = np.asarray(fold_B[k], dtype=np.float64)
            twin.A_ = None if fold_A is None else np.asarray(fold_A[k], dtype=np.float64)
            if fold_slopes[1] is not None:
                twin.A_slope_, twin.B_slope_ = (
                    None if s is None else np.asarray(s[k], dtype=np.float64) for s in fold_slopes
                )
            out.append(twin)
        return out

    def design(self, runs: RunSet) -> Design:
        """The teacher-forced regression data of `runs`, batch-weighted like rollouts."""
        return Design.from_runs(runs, self.batch_size_, self.batch_weighting)

    def run_counts(self, runs: RunSet) -> list[sparse.csr_matrix]:
        """The encoded count matrices of recorded `runs` (as `encode` would give for their
        curricula, without its checks): what fits and their cross-validation roll out."""
        return encode_runs(runs, self.batch_size_, self.batch_weighting)

    def encode(self, curricula: Sequence[AnyCurriculum]) -> list[sparse.csr_matrix]:
        """Count matrices ``(T_c, P)`` of curricula, checked against the fitted pool.

        Encode once and call `simulate_encoded` to roll the same curricula out repeatedly.
        """
        self._check_fitted()
        self._check_policies()
        index = {train_id: col for col, train_id in enumerate(self.train_ids_)}
        counts = [count_matrix(c, index, f"curriculum #{k}") for k, c in enumerate(curricula)]
        if self.unseen == "error":
            for k, matrix in enumerate(counts):
                used = np.unique(matrix.indices)
                unseen = used[~self.seen_[used]]
                if unseen.size:
                    step = int(np.argmax(matrix[:, unseen[0]].toarray().ravel() > 0)) + 1
                    raise CurriculumError(
                        f"curriculum #{k}: step {step}: training id "
                        f"{self.train_ids_[unseen[0]]!r} never appeared in the runs this "
                        f"{self.name} simulator was fitted on, so it has no learned effect "
                        f"(pass unseen='prior' / --unseen prior to treat it as having none)"
                    )
        return [weight_batches(c, self.batch_size_, self.batch_weighting) for c in counts]

    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        return self.rollout_encoded(self.encode(curricula), initial)

    def simulate_encoded(
        self, counts: Sequence[sparse.csr_matrix], initial_losses: np.ndarray
    ) -> list[np.ndarray]:
        """`simulate_many` for curricula already encoded (and batch-weighted) by `encode`."""
        initial = np.broadcast_to(
            np.asarray(initial_losses, dtype=np.float64), (len(counts), len(self.test_ids_))
        )
        trajectories = self.rollout_encoded(counts, initial)
        for traj in trajectories:  # `simulate_many` floors through the base class
            soft_floor(traj[1:], self.floor_, self.floor_width_)
        return trajectories

    def rollout_encoded(
        self,
        counts: Sequence[sparse.csr_matrix],
        initial: np.ndarray,
        columns: np.ndarray | None = None,
        envelope: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """`rollout` of encoded curricula with this simulator's parameters (time-augmented for
        time-varying members), for all test examples or only `columns` (``initial``: ``(C, M)``
        or ``(C, len(columns))``; `envelope`, the hard per-step lower bound of `rollout`, has
        as many columns). Unfloored: callers apply `soft_floor` to what they report."""
        A, B = self.A_, self.B_
        slopes = None if self.B_slope_ is None else (self.A_slope_, self.B_slope_)
        if columns is not None:
            A = None if A is None else A[columns]
            B = B[columns]
            if slopes is not None:
                slopes = (None if slopes[0] is None else slopes[0][columns], slopes[1][columns])
        return self.rollout_params(counts, A, B, slopes, initial, envelope)

    def rollout_params(
        self,
        counts: Sequence[sparse.csr_matrix],
        A: np.ndarray | None,
        B: np.ndarray,
        slopes: tuple[np.ndarray | None, np.ndarray] | None,
        initial: np.ndarray,
        envelope: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """`rollout_drifting` of encoded count matrices (possibly edited, possibly with extra
        neutral columns) under parameters ``A``, ``B`` of this simulator's shape. Members whose
        rows carry a neutral rest (learning-rate-scaled memory kernels, `simulators.memory`)
        add it here."""
        return rollout_drifting(counts, A, B, slopes, self.time_scale_, initial, envelope)

    def row_mass(self, counts: sparse.csr_matrix) -> np.ndarray:
        """``(T,)``: the batch mass of each row of an encoded count matrix, neutral rest
        included (``b`` for every row under "mean" weighting)."""
        return np.asarray(counts.sum(axis=1)).ravel()
