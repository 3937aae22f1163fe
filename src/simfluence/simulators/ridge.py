"""Closed-form ridge regressions behind Simfluence-Linear and Simfluence-Additive.

Teacher forcing makes the model linear in its parameters. With the runs' steps stacked into
``n`` rows, ``N`` the ``(n, P)`` batch count matrix, ``L_prev``/``L_next`` the ``(n, M)``
observed losses before/after each step, test example ``j`` is the ridge problem

    min_theta || X_j theta - L_next[:, j] ||^2 + lam || theta - theta_0 ||^2,
    X_j = [diag(L_prev[:, j]) N,  N],   theta = [A_.j ; B_.j],   theta_0 = [1/b ; 0],

i.e. shrinkage toward "no effect". Its normal equations ``(X_j^T X_j + lam I) delta = X_j^T r_j``
(``delta = theta - theta_0``) differ per test example, so all ``M`` are solved together by
conjugate gradients with an exact 2x2 block-Jacobi preconditioner (one block per training
example and test example). Every product touches only the ``n * b`` non-zeros of ``N``: a
matrix-vector product for all ``M`` systems costs ``O(n b M)``, never ``O(P^2 M)`` memory.

The additive model (``alpha = 1``) shares ``X = N`` across test examples, so one eigen-
decomposition of ``N^T N`` solves every test example for every ``lam`` at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from simfluence.runlog.runs import RunSet
from simfluence.simulators.encoding import encode_runs


@dataclass
class Design:
    """Teacher-forced regression data, stacked over runs.

    Attributes:
        counts: ``(n, P)`` sparse batch counts, one row per step of every run, each row
            scaled by its batch weight.
        prev: ``(n, M)`` observed loss before each step.
        next: ``(n, M)`` observed loss after each step.
        step: ``(n,)`` the step of each row within its run, 0-based (step ``t`` is row
            ``t - 1`` of its run).
        rest: ``(n,)`` mass of a neutral pseudo-example (``A = 1/b``, ``B = 0``) in each row,
            part of the prior (an optimizer-memory kernel with learning-rate scaling, see
            `simulators.memory`); None: none.
        factors: ``(lag, raw)`` with ``counts == lag @ raw`` (a memory kernel's banded
            ``(n, n)`` lag matrix and the sparser counts it smooths): products go through them,
            cheaper than through the denser `counts`; None: through `counts`.
    """

    counts: sparse.csr_matrix
    prev: np.ndarray
    next: np.ndarray
    step: np.ndarray | None = None
    rest: np.ndarray | None = None
    factors: tuple[sparse.csr_matrix, sparse.csr_matrix] | None = None

    @classmethod
    def from_runs(cls, runs: RunSet, batch_size: float, weighting: str) -> Design:
        """Stack the steps of every run; batches weighted as in rollouts (see dynamics)."""
        counts = sparse.vstack(encode_runs(runs, batch_size, weighting), format="csr")
        prev = np.concatenate([r.losses[:-1] for r in runs.runs])
        nxt = np.concatenate([r.losses[1:] for r in runs.runs])
        step = np.concatenate([np.arange(r.n_steps) for r in runs.runs])
        return cls(counts, prev, nxt, step)

    @property
    def seen(self) -> np.ndarray:
        """``(P,)`` bool: consumed at least once."""
        return np.asarray(self.counts.sum(axis=0)).ravel() > 0

    @staticmethod
    def seen_of(counts: list[sparse.csr_matrix]) -> np.ndarray:
        """``(P,)`` bool: consumed at least once in any of these ``(T_r, P)`` count matrices."""
        return np.asarray(sum(np.asarray(c.sum(axis=0)).ravel() for c in counts)) > 0


def loss_weights(prev: np.ndarray, power: float, floor: float = 0.1) -> np.ndarray:
    """Row weights ``(n, M)`` proportional to ``(|L_prev| + floor * s)^-power`` per test
    example, ``s`` its median ``|L_prev|`` over rows, scaled to mean 1 over its rows.

    ``power = 0`` is ordinary least squares; ``1`` treats the noise variance of a step as
    proportional to the loss before it; ``2`` fits relative errors. The floor keeps a loss near
    zero from taking all the weight. A test example whose loss is exactly 0 at half of the
    steps or more (learned by heart) has ``s = 0``: its mean ``|L_prev|`` stands in (and where
    every loss is 0, all rows weigh alike), so no weight is infinite.
    """
    magnitude = np.abs(prev)
    scale = np.median(magnitude, axis=0)  # (M,), broadcast over the rows
    scale = np.where(scale > 0, scale, magnitude.mean(axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    # divided by `s` first: the same weights after normalizing, at most floor^-power apart
    weights = (magnitude / scale + floor) ** -power
    return weights / weights.mean(axis=0)


@dataclass
class LinearSolution:
    """``delta_A``, ``delta_B``: shape ``(P, M)``, the departures from the prior."""

    delta_A: np.ndarray
    delta_B: np.ndarray
    iterations: int
    max_relative_residual: float


class LinearRidgeProblem:
    """The ``M`` normal-equation systems of Simfluence-Linear for one design, any ``lam``.

    The solution is the departure ``delta`` from a prior ``theta_0``: "no effect" by default
    (``A = prior_a = 1/b``, ``B = 0``), or any prior given by its teacher-forced predictions
    `prior_prediction` ``(n, M)`` of ``L_next`` (a featurized prior, which may vary per pair and
    per step).
    """

    def __init__(
        self,
        design: Design,
        prior_a: float,
        weights: np.ndarray | None = None,
        prior_prediction: np.ndarray | None = None,
    ) -> None:
        self.N = design.counts
        self.NT = design.counts.T.tocsr()
        self.factors = None  # (lag, raw, lag^T, raw^T): N = lag @ raw, applied in two products
        if design.factors is not None:
            lag, raw = design.factors
            self.factors = (lag, raw, lag.T.tocsr(), raw.T.tocsr())
        self.prev = design.prev
        # per-row, per-test weights (n, M) of the squared errors; None weighs every row alike
        self.weights = weights
        w = 1.0 if weights is None else weights
        # residual of the prior: L_next - (sum_{i in batch} w_t / b) * L_prev, or its own
        if prior_prediction is None:
            mass = np.asarray(self.N.sum(axis=1))
            if design.rest is not None:  # the neutral rest of a memory kernel
                mass = mass + design.rest[:, None]
            prior_prediction = prior_a * mass * design.prev
        resid = design.next - prior_prediction
        self.rhs_A = self.NT @ (w * self.prev * resid)
        self.rhs_B = self.NT @ (w * resid)
        # exact diagonal 2x2 blocks of X_j^T W_j X_j, for all (example, test) pairs: (P, M) each
        squared = self.NT.multiply(self.NT).tocsr()  # sum_t N_ti^2 (weights included)
        self.s2 = squared @ (w * self.prev**2)
        self.s1 = squared @ (w * self.prev)
        # (P, 1) shared by all test examples when unweighted
        self.s0 = np.asarray(squared.sum(axis=1)) if weights is None else squared @ weights

    def matvec(self, vA: np.ndarray, vB: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
        if self.factors is not None:
            lag, raw, lagT, rawT = self.factors
            u = self.prev * (lag @ (raw @ vA)) + lag @ (raw @ vB)
            if self.weights is not None:
                u = self.weights * u
            return rawT @ (lagT @ (self.prev * u)) + lam * vA, rawT @ (lagT @ u) + lam * vB
        u = self.prev * (self.N @ vA) + self.N @ vB
        if self.weights is not None:
            u = self.weights * u
        return self.NT @ (self.prev * u) + lam * vA, self.NT @ u + lam * vB

    def solve(
        self,
        lam: float,
        start: LinearSolution | None = None,
        tol: float = 1e-8,
        max_iter: int = 1000,
    ) -> LinearSolution:
        """Preconditioned conjugate gradients for all test examples at once.

        Stops when every system's residual is below ``tol`` times its right-hand side's norm.
        """
        d2, d1, d0 = self.s2 + lam, self.s1, self.s0 + lam
        det = d2 * d0 - d1 * d1

        def precondition(rA: np.ndarray, rB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return (d0 * rA - d1 * rB) / det, (d2 * rB - d1 * rA) / det

        xA = np.zeros_like(self.rhs_A) if start is None else start.delta_A.copy()
        xB = np.zeros_like(self.rhs_B) if start is None else start.delta_B.copy()
        qA, qB = self.matvec(xA, xB, lam)
        rA, rB = self.rhs_A - qA, self.rhs_B - qB
        rhs_norm = np.sqrt((self.rhs_A**2).sum(0) + (self.rhs_B**2).sum(0))
        rhs_norm[rhs_norm == 0] = 1.0
        zA, zB = precondition(rA, rB)
        pA, pB = zA.copy(), zB.copy()
        rz = (rA * zA).sum(0) + (rB * zB).sum(0)
        relative = np.sqrt((rA**2).sum(0) + (rB**2).sum(0)) / rhs_norm
        iteration = 0
        while relative.max() > tol and iteration < max_iter:
            qA, qB = self.matvec(pA, pB, lam)
            curvature = (pA * qA).sum(0) + (pB * qB).sum(0)
            step = np.divide(rz, curvature, out=np.zeros_like(rz), where=curvature > 0)
            xA += step * pA
            xB += step * pB
            rA -= step * qA
            rB -= step * qB
            zA, zB = precondition(rA, rB)
            rz_new = (rA * zA).sum(0) + (rB * zB).sum(0)
            beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
            pA = zA + beta * pA
            pB = zB + beta * pB
            rz = rz_new
            relative = np.sqrt((rA**2).sum(0) + (rB**2).sum(0)) / rhs_norm
            iteration += 1
        return LinearSolution(xA, xB, iteration, float(relative.max()))


class AdditiveRidgeProblem:
    """Simfluence-Additive, all test examples: ``argmin_B ||N B - (L_next - L_prev)||^2 +
    lam ||B||^2``."""

    def __init__(self, design: Design) -> None:
        gram = (design.counts.T @ design.counts).toarray()
        self.eigenvalues, self.eigenvectors = np.linalg.eigh(gram)
        # project the targets once; each lam is then a diagonal rescaling
        self.projected = self.eigenvectors.T @ (design.counts.T @ (design.next - design.prev))

    def solve(self, lam: float) -> np.ndarray:
        """``B^T``, shape ``(P, M)``."""
        scale = 1.0 / np.maximum(self.eigenvalues + lam, np.finfo(float).tiny)
        return self.eigenvectors @ (scale[:, None] * self.projected)
