"""The featurized simulators' map from a test example's features to its coefficients
(`fit_test_map`, `ridge_map`, `map_directions`, `leave_one_out_coefficients`) against brute
force: the closed-form leave-one-out that chooses the directions and the ridge strength must
equal refitting without each test example in turn."""

from __future__ import annotations

import numpy as np
import pytest

from simfluence.simulators.featurized import (
    TEST_MAP_DIMS,
    TEST_MAP_GRID,
    Basis,
    fit_test_map,
    leave_one_out_coefficients,
    map_directions,
    ridge_map,
)


def _problem(m: int = 7, k: int = 4, c: int = 2, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    psi = np.column_stack([np.ones(m), rng.normal(size=(m, k - 1))])
    coef = psi[:, 1:3] @ rng.normal(size=(2, c)) + 0.3 * rng.normal(size=(m, c))
    weights = rng.uniform(0.5, 2.0, c)
    return psi, coef, weights


def _loo_error(psi, coef, weights, dim, gamma) -> float:  # type: ignore[no-untyped-def]
    """Sum over test examples of the weighted squared error of predicting its coefficients
    from the others (`ridge_map` refitted without it)."""
    total = 0.0
    for j in range(len(psi)):
        others = np.arange(len(psi)) != j
        predicted = psi[j] @ ridge_map(psi[others], coef[others], weights, dim, gamma)
        total += float((((coef[j] - predicted) ** 2) * weights).sum())
    return total


def test_the_chosen_map_is_the_brute_force_leave_one_out_optimum() -> None:
    psi, coef, weights = _problem()
    grid, dims = (1e-2, 0.3, 10.0, 1e3), (1, 2, 3, 8)
    W, gamma, relative = fit_test_map(psi, coef, weights, grid, dims)
    baseline = _loo_error(psi, coef, weights, 0, np.inf)
    errors = {(d, g): _loo_error(psi, coef, weights, d, g) for d in (1, 2, 3) for g in grid}
    (dim, best_gamma), best = min(errors.items(), key=lambda kv: kv[1])
    assert best < baseline  # the features help, so a map is chosen
    assert gamma == best_gamma and map_directions(W) == dim
    np.testing.assert_allclose(W, ridge_map(psi, coef, weights, dim, gamma), rtol=1e-12)
    assert relative == pytest.approx(best / baseline, rel=1e-9)


def test_useless_features_give_every_test_example_the_mean_coefficients() -> None:
    rng = np.random.default_rng(3)
    psi = np.column_stack([np.ones(6), rng.normal(size=(6, 2))])
    coef = np.array([[1.0, 0.0], [-1.0, 0.5], [1.0, 0.0], [-1.0, 0.5], [1.0, 0.0], [-1.0, 0.5]])
    psi[:, 1:] = np.array([[1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2]]) + 1e-9 * psi[:, 1:]
    W, gamma, relative = fit_test_map(psi, coef, np.ones(2), (1.0, 10.0), (1, 2))
    baseline = _loo_error(psi, coef, np.ones(2), 0, np.inf)
    assert _loo_error(psi, coef, np.ones(2), 1, 1.0) >= baseline
    assert gamma == np.inf and relative == pytest.approx(1.0)
    np.testing.assert_allclose(W[0], coef.mean(axis=0))
    assert not W[1:].any()


def test_too_few_test_examples_or_no_features_use_the_mean() -> None:
    psi, coef, weights = _problem(m=2)
    for args in [(psi, coef, weights), (psi[:, :1], coef, weights)]:
        W, gamma, relative = fit_test_map(*args)
        assert gamma == np.inf and relative == 1.0
        np.testing.assert_array_equal(W[0], args[1].mean(axis=0))
        assert not W[1:].any()
    psi, coef, weights = _problem(m=3)  # three test examples are enough to choose a map
    assert fit_test_map(psi, coef, weights, (0.1,), (1,))[1] == 0.1


def test_default_grid_and_directions() -> None:
    psi, coef, weights = _problem(m=9, k=6, seed=2)
    default = fit_test_map(psi, coef, weights)
    explicit = fit_test_map(psi, coef, weights, TEST_MAP_GRID, TEST_MAP_DIMS)
    np.testing.assert_array_equal(default[0], explicit[0])
    assert default[1:] == explicit[1:]


def test_ridge_map_by_hand() -> None:
    """Weighted ridge of the centred, weight-scaled coefficients on the first `dim` centred
    feature columns; the intercept row undoes the centring; rows past `dim` stay zero."""
    psi, coef, weights = _problem(m=6, k=4, seed=5)
    dim, gamma = 2, 0.7
    X = psi[:, 1:3] - psi[:, 1:3].mean(axis=0)
    scaled = coef * np.sqrt(weights)
    slope = np.linalg.solve(X.T @ X + gamma * np.eye(2), X.T @ (scaled - scaled.mean(axis=0)))
    W = ridge_map(psi, coef, weights, dim, gamma)
    np.testing.assert_allclose(W[1:3], slope / np.sqrt(weights), rtol=1e-12)
    assert not W[3].any()
    intercept = (scaled.mean(axis=0) - psi[:, 1:3].mean(axis=0) @ slope) / np.sqrt(weights)
    np.testing.assert_allclose(W[0], intercept, rtol=1e-12)
    np.testing.assert_allclose((psi @ W).mean(axis=0), coef.mean(axis=0), rtol=1e-12)
    assert map_directions(W) == 2 and map_directions(np.zeros((4, 2))) == 0
    assert map_directions(np.array([[1.0], [0.0], [0.0], [2.0]])) == 3


def test_leave_one_out_coefficients_refit_without_each_test_example() -> None:
    psi, coef, weights = _problem(m=5, seed=7)
    out = leave_one_out_coefficients(psi, coef, weights, 2, 0.5)
    for j in range(5):
        others = np.arange(5) != j
        expected = psi[j] @ ridge_map(psi[others], coef[others], weights, 2, 0.5)
        np.testing.assert_allclose(out[j], expected, rtol=1e-12)


def test_small_coefficients_and_a_single_direction() -> None:
    """The relative leave-one-out error is the brute-force ratio at any scale (here, effects
    of a thousandth, where the mean's error is far below 1), and one feature direction is
    enough to be used when it predicts the coefficients."""
    psi, noise, weights = _problem(m=6, k=4, seed=4)
    psi = psi[:, :2]  # the ones and one feature direction
    coef = 1e-3 * (np.outer(psi[:, 1], [2.0, -1.0]) + 0.1 * noise)
    grid = (1e-2, 1.0)
    W, gamma, relative = fit_test_map(psi, coef, weights, grid, (1,))
    baseline = _loo_error(psi, coef, weights, 0, np.inf)
    best = min(_loo_error(psi, coef, weights, 1, g) for g in grid)
    assert baseline < 1e-4 and map_directions(W) == 1 and np.isfinite(gamma)
    assert relative == pytest.approx(best / baseline, rel=1e-9) and relative < 0.1


def test_an_infinite_ridge_strength_gives_the_mean_coefficients() -> None:
    """``gamma = inf`` (infinitely strong shrinkage) is the limit of a huge one: every test
    example gets the average coefficients, however many directions are asked for."""
    psi, coef, weights = _problem(m=6, k=4, seed=5)
    W = ridge_map(psi, coef, weights, 3, np.inf)
    np.testing.assert_array_equal(W[0], coef.mean(axis=0))
    assert not W[1:].any()
    np.testing.assert_allclose(ridge_map(psi, coef, weights, 3, 1e14), W, atol=1e-12)


# -- the feature basis ------------------------------------------------------------------------
def test_basis_standardizes_then_keeps_the_principal_directions() -> None:
    """``phi = [1, (x - mean) / std @ W]``: projected columns centred and uncorrelated, the
    first with unit standard deviation and the others in decreasing proportion (the singular
    values), unchanged by rescaling a feature; a constant feature is kept unscaled (std 1)."""
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.normal(size=(8, 3)) @ rng.normal(size=(3, 3)), np.full(8, 4.0)])
    basis = Basis.fit(X, 2)
    np.testing.assert_allclose(basis.mean, X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(basis.scale, [*X[:, :3].std(axis=0), 1.0], rtol=1e-12)
    phi = basis(X)
    assert phi.shape == (8, 3) and (phi[:, 0] == 1).all()
    Z = (X - X.mean(axis=0)) / basis.scale
    singular = np.linalg.svd(Z, compute_uv=False)
    covariance = phi[:, 1:].T @ phi[:, 1:] / 8
    expected = np.diag((singular[:2] / singular[0]) ** 2)
    np.testing.assert_allclose(covariance, expected, atol=1e-12)
    np.testing.assert_allclose(phi[:, 1:].mean(axis=0), 0.0, atol=1e-12)
    rescaled = X * np.array([10.0, 1.0, 0.1, 3.0])
    np.testing.assert_allclose(np.abs(Basis.fit(rescaled, 2)(rescaled)), np.abs(phi), atol=1e-10)
    tiny = X * 1e-14  # features in tiny units are not mistaken for constants
    np.testing.assert_allclose(np.abs(Basis.fit(tiny, 2)(tiny)), np.abs(phi), atol=1e-8)


def test_basis_keeps_no_more_directions_than_the_features_have() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(6, 2)) @ np.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])  # rank 2
    assert Basis.fit(X, 5).components.shape == (3, 2)
    assert Basis.fit(X, 1).components.shape == (3, 1)
    none = Basis.fit(X, 0)
    assert none.components.shape == (3, 0) and none(X).shape == (6, 1)
    flat = Basis.fit(np.ones((4, 3)), 3)
    assert flat.components.shape == (3, 0) and (flat.scale == 1.0).all()
