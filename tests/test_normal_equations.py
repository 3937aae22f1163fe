"""NormalEquations.of against a dense, row-by-row reference (independent of its chunking)."""

import numpy as np
from scipy import sparse

from simfluence.simulators.featurized import NormalEquations
from simfluence.simulators.ridge import Design


def test_normal_equations_match_dense_row_sums():
    """G and rhs are sums over rows of x x^T and x r, x = [prev * F, F], r = next - a*mass*prev:
    catches a wrong block, a missing square, a transposed block or a wrong residual."""
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
