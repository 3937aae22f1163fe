"""The ridge problems behind Simfluence-Linear, called directly on tiny hand-made run sets.

The stacked design by hand, and the conjugate-gradient solver's contract: the answer of a dense
solve, the iteration count and relative residual it reports, its tolerance, iteration cap and
warm starts, and test examples whose loss never moves. Each test calls `Design` and
`LinearRidgeProblem` and nothing else of the library, in milliseconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from simfluence.runlog import Run, RunSet
from simfluence.simulators.ridge import Design, LinearRidgeProblem, LinearSolution

POOL = [f"e{i}" for i in range(6)]


def tiny_runs(batch: int, tests: int = 3, seed: int = 0) -> RunSet:
    """3 runs of 8 steps over a pool of 6, batches of `batch` distinct ids, losses that fall
    by a random factor each step (so no two steps or test examples look alike)."""
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(3):
        curriculum = [list(rng.choice(POOL, batch, replace=False)) for _ in range(8)]
        factors = rng.uniform(0.8, 1.0, size=(8, tests))
        start = rng.uniform(1.0, 2.0, size=(1, tests))
        losses = np.vstack([start, start * np.cumprod(factors, axis=0)])
        runs.append(Run(f"r{r}", curriculum, losses))
    return RunSet(POOL, [f"t{j}" for j in range(tests)], runs)


def dense_systems(design: Design, lam: float, prior_a: float) -> list[tuple[np.ndarray, ...]]:
    """Per test example, the normal equations of the departure from the prior, densely:
    ``(X^T X + lam I, X^T (L_next - X theta_0))`` with ``X = [diag(L_prev) N, N]``."""
    N = design.counts.toarray()
    P = N.shape[1]
    theta0 = np.concatenate([np.full(P, prior_a), np.zeros(P)])
    out = []
    for j in range(design.prev.shape[1]):
        X = np.hstack([design.prev[:, [j]] * N, N])
        out.append((X.T @ X + lam * np.eye(2 * P), X.T @ (design.next[:, j] - X @ theta0)))
    return out


def dense_solution(design: Design, lam: float, prior_a: float) -> tuple[np.ndarray, np.ndarray]:
    """``(delta_A, delta_B)``, each ``(P, M)``, by numpy's dense solve."""
    P = design.counts.shape[1]
    delta = np.column_stack([np.linalg.solve(G, b) for G, b in dense_systems(design, lam, prior_a)])
    return delta[:P], delta[P:]


def relative_residual(design: Design, lam: float, prior_a: float, sol: LinearSolution) -> float:
    """The worst test example's ``||G delta - b|| / ||b||``, densely."""
    worst = 0.0
    for j, (G, b) in enumerate(dense_systems(design, lam, prior_a)):
        delta = np.concatenate([sol.delta_A[:, j], sol.delta_B[:, j]])
        worst = max(worst, np.linalg.norm(G @ delta - b) / np.linalg.norm(b))
    return worst


def test_design_stacks_every_step_of_every_run_by_hand() -> None:
    """Rows are the steps of the runs in order; a batch of 1 weighs twice under "mean"
    weighting with ``b = 2`` and once under "sum"; `step` restarts at 0 in every run."""
    runs = RunSet(
        ["a", "b", "c"],
        ["t"],
        [
            Run("r1", [["a", "b"], ["c"]], [[1.0], [0.8], [0.7]]),
            Run("r2", [["b"]], [[2.0], [1.5]]),
        ],
    )
    mean = Design.from_runs(runs, 2, "mean")
    np.testing.assert_array_equal(mean.counts.toarray(), [[1, 1, 0], [0, 0, 2], [0, 2, 0]])
    np.testing.assert_array_equal(mean.prev, [[1.0], [0.8], [2.0]])
    np.testing.assert_array_equal(mean.next, [[0.8], [0.7], [1.5]])
    np.testing.assert_array_equal(mean.step, [0, 1, 0])
    summed = Design.from_runs(runs, 2, "sum")
    np.testing.assert_array_equal(summed.counts.toarray(), [[1, 1, 0], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(summed.step, [0, 1, 0])


@pytest.mark.parametrize("lam", [0.1, 3.0])
def test_one_iteration_when_the_preconditioner_is_exact(lam: float) -> None:
    """Batches of one id: no step couples two training examples, so the normal equations are
    block diagonal with one 2x2 block per training example, exactly the block-Jacobi
    preconditioner; preconditioned CG then solves them in one iteration (a wrong block, a
    wrong determinant or a wrong diagonal needs more, or gives another answer)."""
    design = Design.from_runs(tiny_runs(batch=1), 1, "mean")
    solution = LinearRidgeProblem(design, 1.0).solve(lam)
    assert solution.iterations == 1
    assert solution.max_relative_residual <= 1e-12
    delta_A, delta_B = dense_solution(design, lam, 1.0)
    np.testing.assert_allclose(solution.delta_A, delta_A, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(solution.delta_B, delta_B, rtol=1e-10, atol=1e-12)


def test_conjugate_gradients_report_their_iterations_and_true_residual() -> None:
    """From a zero start the residual is the right-hand side (relative residual 1, nothing
    done); each iteration counts once and `max_iter` stops exactly there; the reported
    residual is the worst test example's relative residual of the returned solution; the
    default tolerance 1e-8 is met at about the dimension (2P = 12) of the systems."""
    design = Design.from_runs(tiny_runs(batch=2), 2, "mean")
    problem = LinearRidgeProblem(design, 0.5)
    nothing = problem.solve(0.3, max_iter=0)
    assert nothing.iterations == 0 and nothing.max_relative_residual == pytest.approx(1.0)
    assert not nothing.delta_A.any() and not nothing.delta_B.any()
    for cap in (1, 2, 3):
        capped = problem.solve(0.3, max_iter=cap)
        assert capped.iterations == cap and capped.max_relative_residual > 1e-3
        assert capped.max_relative_residual == pytest.approx(
            relative_residual(design, 0.3, 0.5, capped), rel=1e-9
        )
    solution = problem.solve(0.3)
    assert 3 < solution.iterations <= 14  # 12 in exact arithmetic
    assert solution.max_relative_residual <= 1e-8
    assert solution.max_relative_residual == pytest.approx(
        relative_residual(design, 0.3, 0.5, solution), rel=1e-3
    )
    delta_A, delta_B = dense_solution(design, 0.3, 0.5)
    np.testing.assert_allclose(solution.delta_A, delta_A, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(solution.delta_B, delta_B, rtol=1e-7, atol=1e-9)
    # a loose tolerance stops at the first iteration that meets it
    loose = problem.solve(0.3, tol=1e-3)
    assert loose.max_relative_residual <= 1e-3
    assert problem.solve(0.3, max_iter=loose.iterations - 1).max_relative_residual > 1e-3


def test_conjugate_gradients_continue_from_a_warm_start() -> None:
    """A converged start needs no iteration and is returned as given; a partial one is
    carried on to the same answer as a cold start."""
    design = Design.from_runs(tiny_runs(batch=2), 2, "mean")
    problem = LinearRidgeProblem(design, 0.5)
    cold = problem.solve(0.3)
    warm = problem.solve(0.3, start=cold)
    assert warm.iterations == 0 and warm.max_relative_residual <= 1e-8
    np.testing.assert_array_equal(warm.delta_A, cold.delta_A)
    np.testing.assert_array_equal(warm.delta_B, cold.delta_B)
    partial = problem.solve(0.3, max_iter=2)
    resumed = problem.solve(0.3, start=partial)
    assert resumed.iterations > 0
    assert resumed.max_relative_residual <= 1e-8
    np.testing.assert_allclose(resumed.delta_A, cold.delta_A, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(resumed.delta_B, cold.delta_B, rtol=1e-6, atol=1e-9)


def test_conjugate_gradients_stop_after_1000_iterations_by_default() -> None:
    """A tolerance of 0 is never met on these systems: the default cap (1000) stops it."""
    design = Design.from_runs(tiny_runs(batch=2), 2, "mean")
    assert LinearRidgeProblem(design, 0.5).solve(0.3, tol=0.0).iterations == 1000


def test_a_test_example_whose_loss_never_moves_keeps_the_prior() -> None:
    """Its right-hand side is 0: it stays at delta = 0 without any 0/0 (no NaN, no warning)
    and does not stop the others from converging; its residual is measured absolutely."""
    runs = tiny_runs(batch=2)
    still = RunSet(
        runs.train_ids,
        [*runs.test_ids, "still"],
        [
            Run(r.run_id, r.curriculum, np.column_stack([r.losses, np.full(r.n_steps + 1, 2.0)]))
            for r in runs.runs
        ],
    )
    design = Design.from_runs(still, 2, "mean")
    problem = LinearRidgeProblem(design, 0.5)  # 0.5 * (2 ids) * L = L: "no effect" is exact
    with np.errstate(all="raise"):
        solution = problem.solve(0.3)
    assert not solution.delta_A[:, -1].any() and not solution.delta_B[:, -1].any()
    moving = Design(design.counts, design.prev[:, :-1], design.next[:, :-1])
    delta_A, delta_B = dense_solution(moving, 0.3, 0.5)
    np.testing.assert_allclose(solution.delta_A[:, :-1], delta_A, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(solution.delta_B[:, :-1], delta_B, rtol=1e-7, atol=1e-9)
    # only still test examples: solved at the start, even with a tolerance of 0
    flat = Design(design.counts, design.prev[:, -1:], design.next[:, -1:])
    flat_problem = LinearRidgeProblem(flat, 0.5)
    assert flat_problem.solve(0.3, tol=0.0).iterations == 0
    # from a non-zero start, the residual reported is its absolute norm (the rhs is 0)
    start = LinearSolution(np.ones((6, 1)), np.zeros((6, 1)), 0, 0.0)
    qA, qB = flat_problem.matvec(start.delta_A, start.delta_B, 0.3)
    stopped = flat_problem.solve(0.3, start=start, max_iter=0)
    assert stopped.max_relative_residual == pytest.approx(np.sqrt((qA**2).sum() + (qB**2).sum()))
