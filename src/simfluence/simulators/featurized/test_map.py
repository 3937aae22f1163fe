"""The map from a test example's features to its coefficients: how the featurized simulators
simulate a test example that no run recorded (ridge regression of the recorded test examples'
coefficients on their features, strength and directions by leave-one-out)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: ridge strengths tried (by leave-one-out) for the map from test features to coefficients
TEST_MAP_GRID: tuple[float, ...] = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
#: numbers of test-feature directions tried by the map to new test examples' coefficients
TEST_MAP_DIMS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def fit_test_map(
    psi: np.ndarray,
    coef: np.ndarray,
    weights: np.ndarray,
    grid: Sequence[float] = TEST_MAP_GRID,
    dims: Sequence[int] = TEST_MAP_DIMS,
) -> tuple[np.ndarray, float, float]:
    """Ridge regression of the test examples' coefficients on their features.

    The number of feature directions used (a prefix of `dims`, nested) and the ridge strength
    are chosen together by leave-one-out over test examples (closed form).

    Args:
        psi: ``(M, K')`` projected test features, first column ones (not penalized).
        coef: ``(M, C)`` coefficients of the recorded test examples.
        weights: ``(C,)``: how much an error in each coefficient matters (the variance of the
            feature it multiplies, so errors are measured in effect space).

    Returns:
        ``(map (K', C), chosen strength, leave-one-out error relative to predicting the mean)``;
        the rows of directions left out are zero.
    """
    M = len(psi)
    if M < 3 or psi.shape[1] == 1:
        return ridge_map(psi, coef, weights, 0, np.inf), np.inf, 1.0
    scaled = coef * np.sqrt(weights)
    center = scaled.mean(axis=0)
    Y = scaled - center
    baseline = float((Y**2).sum()) * (M / (M - 1)) ** 2  # LOO error of predicting the mean
    best = (baseline, 0, np.inf)
    for dim in sorted({min(d, psi.shape[1] - 1) for d in dims}):
        X = psi[:, 1 : dim + 1] - psi[:, 1 : dim + 1].mean(axis=0)
        U, s, _ = np.linalg.svd(X, full_matrices=False)
        for gamma in grid:
            shrink = s**2 / (s**2 + gamma)
            fitted = U @ (shrink[:, None] * (U.T @ Y))
            leverage = (U**2 @ shrink) + 1.0 / M  # the intercept's leverage included
            loo = float((((Y - fitted) / (1.0 - leverage)[:, None]) ** 2).sum())
            best = min(best, (loo, dim, gamma))
    error, dim, gamma = best
    return ridge_map(psi, coef, weights, dim, gamma), float(gamma), error / max(baseline, 1e-300)


def ridge_map(
    psi: np.ndarray, coef: np.ndarray, weights: np.ndarray, dim: int, gamma: float
) -> np.ndarray:
    """The ``(K', C)`` map of `fit_test_map` for a given number of directions `dim` and ridge
    strength `gamma` (0 directions: every test example gets the average coefficients)."""
    W = np.zeros((psi.shape[1], coef.shape[1]))
    W[0] = coef.mean(axis=0)
    if dim and np.isfinite(gamma):
        scaled = coef * np.sqrt(weights)
        center = scaled.mean(axis=0)
        means = psi[:, 1 : dim + 1].mean(axis=0)
        X = psi[:, 1 : dim + 1] - means
        slope = np.linalg.solve(X.T @ X + gamma * np.eye(dim), X.T @ (scaled - center))
        W[1 : dim + 1] = slope / np.sqrt(weights)
        W[0] = (center - means @ slope) / np.sqrt(weights)
    return W


def map_directions(W: np.ndarray) -> int:
    """The number of feature directions a map of `fit_test_map` uses (its nonzero rows)."""
    used = np.flatnonzero(np.any(W[1:] != 0, axis=1))
    return int(used[-1]) + 1 if used.size else 0


def leave_one_out_coefficients(
    psi: np.ndarray, coef: np.ndarray, weights: np.ndarray, dim: int, gamma: float
) -> np.ndarray:
    """``(M, C)``: each test example's coefficients as `ridge_map` predicts them from the
    other test examples (the same `dim` and `gamma`): how a test example that no run recorded
    would be simulated."""
    everyone = np.arange(len(psi))
    out = np.empty_like(coef)
    for j in everyone:
        others = everyone != j
        out[j] = psi[j] @ ridge_map(psi[others], coef[others], weights, dim, gamma)
    return out
