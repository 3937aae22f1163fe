"""NormalEquations.of against a dense, row-by-row reference (independent of its chunking)."""

import numpy as np
import pytest
from scipy import sparse

from simfluence.simulators.featurized import NormalEquations
from simfluence.simulators.featurized import basis as featurized_basis
from simfluence.simulators.ridge import Design


@pytest.mark.parametrize("chunk", [512, 2])
def test_normal_equations_match_dense_row_sums(chunk, monkeypatch):
    """Also with rows summed in chunks of 2 (as on long designs).
    G and rhs are sums over rows of x x^T and x r, x = [prev * F, F], r = next - a*mass*prev:
        catches a wrong block, a missing square, a transposed block or a wrong residual."""
    monkeypatch.setattr(featurized_basis, "_ROW_CHUNK", chunk)
    rng = np.random.default_rng(0)
    n, P, M, J = 5, 3, 2, 2
    counts = sparse.csr_matrix(rng.integers(0, 3, size=(n, P)).astype(float))
    prev = rng.uniform(0.5, 2.0, size=(n, M))
    nxt = rng.uniform(0.5, 2.0, size=(n, M))
    F = rng.normal(size=(n, J))
    a = 0.3
    eq = NormalEquations.of(Design(counts, prev, nxt), F, a)
    mass = np.asarray(counts.sum(axis=1)).ravel()
    G = np.zeros((M, 2 * J, 2 * J))
    rhs = np.zeros((M, 2 * J))
    for i in range(n):
        for m in range(M):
            x = np.concatenate([prev[i, m] * F[i], F[i]])
            r = nxt[i, m] - a * mass[i] * prev[i, m]
            G[m] += np.outer(x, x)
            rhs[m] += x * r
    np.testing.assert_allclose(eq.G, G, rtol=1e-12)
    np.testing.assert_allclose(eq.rhs, rhs, rtol=1e-12)


def test_normal_equations_of_disjoint_designs_add_and_subtract():
    """Sums over disjoint designs add: of(A) + of(B) == of(A u B), and (A u B) - B == A."""
    rng = np.random.default_rng(1)
    n, P, M, J = 6, 3, 2, 2
    counts = rng.integers(0, 3, size=(n, P)).astype(float)
    prev = rng.uniform(0.5, 2.0, size=(n, M))
    nxt = rng.uniform(0.5, 2.0, size=(n, M))
    F = rng.normal(size=(n, J))

    def of(rows):
        d = Design(sparse.csr_matrix(counts[rows]), prev[rows], nxt[rows])
        return NormalEquations.of(d, F[rows], 0.3)

    a, b, ab = of(slice(0, 3)), of(slice(3, 6)), of(slice(0, 6))
    np.testing.assert_allclose((a + b).G, ab.G, rtol=1e-12)
    np.testing.assert_allclose((a + b).rhs, ab.rhs, rtol=1e-12)
    np.testing.assert_allclose((ab - b).G, a.G, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose((ab - b).rhs, a.rhs, rtol=1e-9, atol=1e-12)


def test_restrict_and_solve_match_dense_ridge():
    """restrict keeps regressors' A and B rows/columns; solve is (G + lam I)^-1 rhs, split A|B."""
    rng = np.random.default_rng(2)
    M, J = 2, 3
    X = rng.normal(size=(M, 8, 2 * J))
    G = np.einsum("mni,mnj->mij", X, X)
    rhs = rng.normal(size=(M, 2 * J))
    eq = NormalEquations(G, rhs)
    sub = eq.restrict(np.array([0, 2]))
    keep = [0, 2, 3, 5]
    np.testing.assert_array_equal(sub.G, G[:, keep][:, :, keep])
    np.testing.assert_array_equal(sub.rhs, rhs[:, keep])
    lam = 0.7
    coef_a, coef_b = eq.solve(lam)
    for m in range(M):
        want = np.linalg.inv(G[m] + lam * np.eye(2 * J)) @ rhs[m]
        np.testing.assert_allclose(coef_a[m], want[:J], rtol=1e-9)
        np.testing.assert_allclose(coef_b[m], want[J:], rtol=1e-9)
