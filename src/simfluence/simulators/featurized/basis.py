"""The feature basis (`Basis`) and the per-test-example normal equations (`NormalEquations`)
of the featurized simulators: the linear algebra under both models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simfluence.simulators.ridge import Design

#: rows of the design processed at once when forming the per-test normal equations
_ROW_CHUNK = 512


@dataclass
class Basis:
    """Standardize, then project on principal directions: ``phi = [1, (x - mean) / scale @ W]``.

    Attributes:
        mean, scale: shape ``(d,)``.
        components: shape ``(d, k)``; column ``j`` is the ``j``-th principal direction divided
            by the standard deviation of the first projected coordinate.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray, k: int) -> Basis:
        """The basis of the ``(n, d)`` rows of `X`, keeping at most `k` directions."""
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale <= 1e-12 * max(float(scale.max()), 1e-300)] = 1.0
        Z = (X - mean) / scale
        _, singular, vt = np.linalg.svd(Z, full_matrices=False)
        keep = int(min(k, np.sum(singular > 1e-10 * singular[0]) if singular.size else 0))
        top = singular[0] / np.sqrt(len(X)) if keep else 1.0
        return cls(mean, scale, vt[:keep].T / top)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """``(n, k + 1)``: a column of ones, then the projected features of the rows of `X`."""
        Z = (np.asarray(X, dtype=np.float64) - self.mean) / self.scale @ self.components
        return np.hstack([np.ones((len(Z), 1)), Z])


@dataclass
class NormalEquations:
    """``G`` (M, 2J, 2J) and ``rhs`` (M, 2J): sums over the steps of a design of ``x x^T`` and
    ``x r`` with ``x = [L_{t-1} G_t, G_t]`` (``G_t``: ``J`` regressors of step ``t``) and ``r``
    what "no effect" leaves unexplained. Sums, so those of disjoint designs add."""

    G: np.ndarray
    rhs: np.ndarray

    @classmethod
    def of(cls, design: Design, regressors: np.ndarray, prior_a: float) -> NormalEquations:
        """From a design and its ``(n, J)`` per-step regressors."""
        F = regressors
        n, J = F.shape
        M = design.prev.shape[1]
        mass = np.asarray(design.counts.sum(axis=1))
        if design.rest is not None:  # the neutral rest of a memory kernel
            mass = mass + design.rest[:, None]
        resid = design.next - prior_a * mass * design.prev
        G = np.zeros((M, 2 * J, 2 * J))
        for start in range(0, n, _ROW_CHUNK):  # bounded memory: (chunk, J^2) at a time
            rows = slice(start, start + _ROW_CHUNK)
            outer = (F[rows, :, None] * F[rows, None, :]).reshape(-1, J * J)
            prev = design.prev[rows]
            G[:, :J, :J] += ((prev**2).T @ outer).reshape(M, J, J)
            G[:, :J, J:] += (prev.T @ outer).reshape(M, J, J)
        G[:, J:, :J] = np.transpose(G[:, :J, J:], (0, 2, 1))
        G[:, J:, J:] = F.T @ F
        rhs = np.hstack([(design.prev * resid).T @ F, resid.T @ F])
        return cls(G, rhs)

    def __sub__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.G - other.G, self.rhs - other.rhs)

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.G + other.G, self.rhs + other.rhs)

    def restrict(self, regressors: np.ndarray) -> NormalEquations:
        """The equations of a subset of the ``J`` regressors (indices into ``0..J-1``)."""
        J = self.G.shape[1] // 2
        keep = np.concatenate([regressors, J + np.asarray(regressors)])
        return NormalEquations(self.G[:, keep][:, :, keep], self.rhs[:, keep])

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """``(coef_A, coef_B)``, each ``(M, J)``: the ridge solution toward 0 at `lam`."""
        J = self.G.shape[1] // 2
        solution = np.linalg.solve(self.G + lam * np.eye(2 * J), self.rhs[:, :, None])[:, :, 0]
        return solution[:, :J], solution[:, J:]
