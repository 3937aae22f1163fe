"""The ridge problems behind Simfluence-Linear and the ridge simulators' choice of ``l2``, on
tiny hand-made run sets, in milliseconds.

* The stacked design by hand, and the conjugate-gradient solver's contract: the answer of a
  dense solve, the iteration count and relative residual it reports, its tolerance, iteration
  cap and warm starts, and test examples whose loss never moves (`Design` and
  `LinearRidgeProblem` called directly).
* The cross-validation of ``l2`` with scripted held-out errors (`ScriptedCV`): its walk down
  the grid, its stopping rule, its choice and fallbacks, the folds and test examples it scores,
  and the parameter checks, apart from any solve.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.runlog import Run, RunSet
from simfluence.simulators import AdditiveSimulator, LinearSimulator
from simfluence.simulators.base import floor_width, loss_floor, soft_floor
from simfluence.simulators.linear import DEFAULT_L2_GRID, rollout_mse
from simfluence.simulators.ridge import Design, LinearRidgeProblem, LinearSolution, loss_weights

POOL = [f"e{i}" for i in range(6)]


def tiny_runs(batch: int, tests: int = 3, seed: int = 0, n_runs: int = 3) -> RunSet:
    """`n_runs` runs of 8 steps over a pool of 6, batches of `batch` distinct ids, losses that
    fall by a random factor each step (so no two steps or test examples look alike)."""
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(n_runs):
        curriculum = [list(rng.choice(POOL, batch, replace=False)) for _ in range(8)]
        factors = rng.uniform(0.8, 1.0, size=(8, tests))
        start = rng.uniform(1.0, 2.0, size=(1, tests))
        losses = np.vstack([start, start * np.cumprod(factors, axis=0)])
        runs.append(Run(f"r{r}", curriculum, losses))
    return RunSet(POOL, [f"t{j}" for j in range(tests)], runs)


def dense_systems(
    design: Design, lam: float, prior_a: float, weights: np.ndarray | None = None
) -> list[tuple[np.ndarray, ...]]:
    """Per test example, the (row-weighted) normal equations of the departure from the prior,
    densely: ``(X^T W X + lam I, X^T W (L_next - X theta_0))``, ``X = [diag(L_prev) N, N]``."""
    N = design.counts.toarray()
    P = N.shape[1]
    theta0 = np.concatenate([np.full(P, prior_a), np.zeros(P)])
    out = []
    for j in range(design.prev.shape[1]):
        X = np.hstack([design.prev[:, [j]] * N, N])
        w = np.ones(len(X)) if weights is None else weights[:, j]
        gram = X.T @ (w[:, None] * X) + lam * np.eye(2 * P)
        out.append((gram, X.T @ (w * (design.next[:, j] - X @ theta0))))
    return out


def dense_solution(
    design: Design, lam: float, prior_a: float, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(delta_A, delta_B)``, each ``(P, M)``, by numpy's dense solve."""
    P = design.counts.shape[1]
    systems = dense_systems(design, lam, prior_a, weights)
    delta = np.column_stack([np.linalg.solve(G, b) for G, b in systems])
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


# -- choosing l2 by cross-validation, with scripted held-out errors ----------------------------
class ScriptedCV(AdditiveSimulator):
    """Simfluence-Additive whose held-out error at each ``l2`` is `script[l2]` on every fold,
    and whose parameters at ``l2`` all equal ``l2`` (so ``B_`` shows which ``l2`` the final
    fit used). `scored` records each validation: ``(l2, run ids, test ids, floor)``."""

    script: dict[float, float]

    def _path(self, design: Design, grid: list[float], final: bool):  # type: ignore[no-untyped-def]
        for lam in grid:
            yield None, np.full((design.prev.shape[1], design.counts.shape[1]), lam)

    def _validation_mse(self, runs: RunSet, params: Any, floor: Any) -> float:
        lam = float(params[1].flat[0])
        self.scored.append((lam, runs.run_ids, runs.test_ids, floor))
        return self.script[lam]


def scripted(script: dict[float, float], **params: Any) -> ScriptedCV:
    sim = ScriptedCV(**{"l2_grid": list(script), **params})
    sim.script, sim.scored = script, []
    return sim


GRID_SCRIPT = {100.0: np.inf, 30.0: 5.0, 10.0: 4.0, 3.0: 4.0, 1.0: 6.0, 0.3: 3.0, 0.1: 7.0}


@pytest.mark.parametrize(
    ("patience", "walked", "chosen"),
    [(None, 5, 3.0), (1, 1, 100.0), (3, 7, 0.3)],  # None: the default patience, 2
)
def test_cross_validation_walks_down_the_grid_until_patience_rises(
    patience: int | None, walked: int, chosen: float
) -> None:
    """The grid is walked from the largest ``l2`` down; an error that is not below the best so
    far (an infinite one, a tie) is a rise; the walk stops after `patience` rises in a row
    (default 2) and keeps the finite least error (the smaller ``l2`` of a tie), or the largest
    ``l2`` when none is finite. The final fit uses the choice."""
    runs = tiny_runs(batch=2, n_runs=5)
    sim = scripted(GRID_SCRIPT, **({} if patience is None else {"patience": patience}))
    sim.fit(runs)
    expected = [[lam, mse] for lam, mse in list(GRID_SCRIPT.items())[:walked]]
    assert sim.cv_mse_ == expected
    assert sim.l2_ == chosen and np.all(chosen == sim.B_) and sim.B_.shape == (3, 6)
    # default 4 folds of whole runs: run k by id validates in fold k % 4, at every l2
    folds = [["r0", "r4"], ["r1"], ["r2"], ["r3"]]
    assert [(lam, ids) for lam, ids, _, _ in sim.scored] == [
        (lam, ids) for lam, _ in expected for ids in folds
    ]


def test_cross_validation_choice_and_its_fallbacks() -> None:
    """Two grid values are already a choice; an ``l2`` given is used as is, with no
    cross-validation (``cv_mse_`` None); non-finite errors are never chosen, and when no error
    is finite the smoothest ``l2`` is kept."""
    runs = tiny_runs(batch=2)
    two = scripted({1.0: 2.0, 0.1: 1.0}).fit(runs)
    assert two.cv_mse_ == [[1.0, 2.0], [0.1, 1.0]] and two.l2_ == 0.1
    given = scripted({0.5: 1.0}, l2=0.5).fit(runs)
    assert given.cv_mse_ is None and given.l2_ == 0.5 and not given.scored
    assert np.all(given.B_ == 0.5)
    broken = scripted({100.0: np.inf, 30.0: np.nan, 10.0: 1.0, 3.0: 0.5}).fit(runs)
    assert broken.l2_ == 100.0 and len(broken.cv_mse_) == 2  # inf, NaN: two rises
    skipped = scripted({100.0: 2.0, 30.0: np.nan, 10.0: 1.0}, patience=3).fit(runs)
    assert skipped.l2_ == 10.0


def test_cross_validation_scores_a_seeded_subset_of_test_examples() -> None:
    """`cv_tests` distinct test examples, drawn with seed 0 and sorted, are scored, with the
    floors of those columns; the final fit still covers every test example. `cv_tests` at
    or above the number of test examples scores them all."""
    runs = tiny_runs(batch=2, tests=6)
    sub = scripted({1.0: 2.0, 0.1: 1.0}, cv_tests=3).fit(runs)
    columns = np.sort(np.random.default_rng(0).choice(6, 3, replace=False))
    subset = runs.select_tests(columns)
    assert sub.B_.shape == (6, 6)
    for _, _, test_ids, (level, width) in sub.scored:
        assert test_ids == subset.test_ids and len(set(test_ids)) == 3
        np.testing.assert_array_equal(level, loss_floor(subset))
        np.testing.assert_array_equal(width, floor_width(subset))
    again = scripted({1.0: 2.0, 0.1: 1.0}, cv_tests=3).fit(runs)
    assert [t for _, _, t, _ in again.scored] == [t for _, _, t, _ in sub.scored]
    every = scripted({1.0: 2.0, 0.1: 1.0}, cv_tests=6).fit(runs)
    for _, _, test_ids, (level, width) in every.scored:
        assert test_ids == runs.test_ids
        np.testing.assert_array_equal(level, loss_floor(runs))
        np.testing.assert_array_equal(width, floor_width(runs))


def test_ridge_parameter_checks() -> None:
    """Every bad setting is refused before any work, with its name; the edge values allowed
    (``cv_folds`` 2, ``cv_tests``/``test_shards`` 1, ``loss_power`` 4, one grid value on one
    run) fit."""
    runs = tiny_runs(batch=2)
    one_run = runs.subset(["r0"])
    refused = [
        ({"l2": 0.0}, runs, "l2 values must be positive"),
        ({"l2_grid": []}, runs, "l2 values must be positive"),
        ({"l2_grid": [1.0, -1.0]}, runs, "l2 values must be positive"),
        ({}, one_run, "at least 2 training runs"),
        ({"l2_grid": list(DEFAULT_L2_GRID)}, one_run, "at least 2 training runs"),
        ({"cv_folds": 1}, runs, "cv_folds must be at least 2"),
        ({"cv_tests": 0}, runs, "cv_tests must be None or >= 1, got 0"),
        ({"cv_tests": True}, runs, "cv_tests must be None or >= 1, got True"),
        ({"cv_tests": 1.5}, runs, "cv_tests must be None or >= 1, got 1.5"),
        ({"test_shards": 0}, runs, "test_shards must be None or >= 1, got 0"),
    ]
    for params, data, message in refused:
        with pytest.raises(SimfluenceError, match=message):
            scripted({1.0: 1.0, 0.1: 1.0}, **params).fit(data)
    with pytest.raises(SimfluenceError, match=r"loss_power must be between 0 and 4, got 4\.5"):
        LinearSimulator(l2=1.0, loss_power=4.5).fit(runs)
    assert scripted({1.0: 1.0, 0.1: 2.0}, cv_folds=2, cv_tests=1).fit(runs).l2_ == 1.0
    assert scripted({0.5: 1.0}).fit(one_run).l2_ == 0.5  # one value: nothing to validate
    assert LinearSimulator(l2=1.0, loss_power=4.0).fit(runs).cg_residual_ <= 1e-8


def test_documented_defaults_and_parameters_kept() -> None:
    """The defaults the docstrings state, and every parameter given kept as given (they are
    what a saved simulator is rebuilt from)."""
    ridge = {
        "l2": None,
        "l2_grid": list(DEFAULT_L2_GRID),
        "cv_folds": 4,
        "patience": 2,
        "unseen": "error",
        "batch_weighting": "mean",
        "cv_tests": None,
        "test_shards": None,
        "backend": "serial",
    }
    solver = {"tol": 1e-8, "cv_tol": 1e-4, "max_iter": 1000, "loss_power": 0.0, "memory": "none"}
    assert AdditiveSimulator().get_params() == ridge
    assert LinearSimulator().get_params() == {**ridge, **solver}
    given = {
        "l2": 0.5,
        "l2_grid": [2.0, 1.0],
        "cv_folds": 3,
        "patience": 5,
        "unseen": "prior",
        "batch_weighting": "sum",
        "cv_tests": 7,
        "test_shards": 2,
        "backend": "process:2",
    }
    assert AdditiveSimulator(**given).get_params() == given
    solver = {"tol": 1e-6, "cv_tol": 1e-2, "max_iter": 50, "loss_power": 1.0, "memory": "0.8+lr"}
    assert LinearSimulator(**given, **solver).get_params() == {**given, **solver}


def test_linear_fit_is_the_ridge_solution_around_its_prior() -> None:
    """A fixed ``l2``: ``A_ = 1/b + delta_A``, ``B_ = delta_B`` of the dense solve (``b`` the
    median batch size), solved to `tol` within `max_iter`, with the solver's statistics."""
    runs = tiny_runs(batch=2)
    sim = LinearSimulator(l2=0.3).fit(runs)
    design = Design.from_runs(runs, 2, "mean")
    delta_A, delta_B = dense_solution(design, 0.3, 0.5)
    np.testing.assert_allclose(sim.A_, 0.5 + delta_A.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(sim.B_, delta_B.T, rtol=1e-7, atol=1e-9)
    reference = LinearRidgeProblem(design, 0.5).solve(0.3)
    assert sim.cg_iterations_ == reference.iterations
    assert sim.cg_residual_ == reference.max_relative_residual <= 1e-8
    loose = LinearSimulator(l2=0.3, tol=1e-3, cv_tol=1e-12).fit(runs)
    assert 1e-8 < loose.cg_residual_ <= 1e-3
    capped = LinearSimulator(l2=0.3, max_iter=2).fit(runs)
    assert capped.cg_iterations_ == 2 and capped.cg_residual_ > 1e-3
    # loss_power: each step's squared error weighted by `loss_weights` of its loss before
    weighted = LinearSimulator(l2=0.3, loss_power=1.5).fit(runs)
    delta_A, delta_B = dense_solution(design, 0.3, 0.5, loss_weights(design.prev, 1.5))
    np.testing.assert_allclose(weighted.A_, 0.5 + delta_A.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(weighted.B_, delta_B.T, rtol=1e-7, atol=1e-9)
    assert np.abs(weighted.B_ - sim.B_).max() > 1e-3


def test_cross_validation_solves_to_its_own_tolerance() -> None:
    """`cv_tol` governs the cross-validation's solves only: a loose one moves the CV errors
    (not the final fit, solved to `tol`)."""
    runs = tiny_runs(batch=2, n_runs=4)
    params = {"l2_grid": [1.0, 0.01], "cv_folds": 2}
    exact = LinearSimulator(**params, cv_tol=1e-12).fit(runs)
    loose = LinearSimulator(**params, cv_tol=0.5).fit(runs)
    assert abs(loose.cv_mse_[1][1] - exact.cv_mse_[1][1]) > 1e-6 * exact.cv_mse_[1][1]
    assert loose.cg_residual_ <= 1e-8 and exact.cg_residual_ <= 1e-8


# -- the cross-validation error: floored rollouts of held-out runs ------------------------------
def plain_rollout_mse(
    runs: RunSet,
    A: np.ndarray | None,
    B: np.ndarray,
    b: float,
    weighting: str,
    floor: tuple[np.ndarray, np.ndarray] | None,
) -> float:
    """The reference: each run rolled out step by step (``L <- alpha L + beta``, the batch
    sums scaled by ``b / |batch|`` under "mean"), floored from step 1 on, and the squared
    error averaged over steps 1..T, then over (run, test example) pairs."""
    index = {t: i for i, t in enumerate(runs.train_ids)}
    errors = []
    for run in runs.runs:
        L = run.losses[0].astype(float)
        path = [L]
        for batch in run.curriculum:
            cols = [index[i] for i in batch]
            scale = b / len(batch) if weighting == "mean" else 1.0
            alpha = 1.0 if A is None else scale * A[:, cols].sum(1)
            L = alpha * L + scale * B[:, cols].sum(1)
            path.append(L)
        traj = np.array(path)
        if floor is not None:
            soft_floor(traj[1:], *floor)
        errors.append(((traj[1:] - run.losses[1:]) ** 2).mean(axis=0))
    return float(np.mean(errors))


def uneven_runs() -> RunSet:
    """Batches of 1 and 2 (weighting matters), losses that fall to 0.1 (a floor can bind)."""
    curricula = [[["a", "b"], ["c"], ["a"]], [["c"], ["a", "b"], ["b", "c"]], [["b"], ["c", "a"]]]
    runs = []
    for k, curriculum in enumerate(curricula):
        steps = len(curriculum) + 1
        losses = np.column_stack([np.geomspace(2.0 + k, 0.1, steps), np.linspace(1.0, 0.3, steps)])
        runs.append(Run(f"r{k}", curriculum, losses))
    return RunSet(["a", "b", "c"], ["t0", "t1"], runs)


def test_rollout_mse_is_the_floored_all_steps_error_of_a_plain_loop() -> None:
    runs = uneven_runs()
    rng = np.random.default_rng(1)
    A = rng.uniform(0.1, 0.5, size=(2, 3))
    B = rng.uniform(-1.5, -0.5, size=(2, 3))  # the loss falls below 0 from the first step
    floor = (loss_floor(runs), floor_width(runs))
    for weighting in ("mean", "sum"):
        for params in ((A, B), (None, B)):
            expected = plain_rollout_mse(runs, *params, 2.0, weighting, floor)
            assert rollout_mse(runs, *params, 2.0, weighting, floor) == pytest.approx(expected)
    # the floor binds at step 1 already: unfloored (the default), the errors are others
    unfloored = plain_rollout_mse(runs, A, B, 2.0, "mean", None)
    assert rollout_mse(runs, A, B, 2.0, "mean") == pytest.approx(unfloored)
    first_floored = plain_rollout_mse(runs.subset(["r2"]), A, B, 2.0, "mean", floor)
    first_raw = plain_rollout_mse(runs.subset(["r2"]), A, B, 2.0, "mean", None)
    assert abs(first_floored - first_raw) > 0.1


class FixedPath(AdditiveSimulator):
    """Simfluence-Additive whose parameters at ``l2`` are ``B = -l2`` for every pair, whatever
    the training runs: the held-out errors of cross-validation are then known in closed form
    (`plain_rollout_mse`) without any solve."""

    def _path(self, design: Design, grid: list[float], final: bool):  # type: ignore[no-untyped-def]
        for lam in grid:
            yield None, np.full((design.prev.shape[1], design.counts.shape[1]), -lam)


@pytest.mark.parametrize("weighting", ["mean", "sum"])
def test_cross_validation_errors_are_floored_rollouts_of_the_held_out_runs(
    weighting: str,
) -> None:
    """Each CV error is the mean over folds of the held-out runs' rollout MSE, weighted like
    the fit and floored with the fitted floor (the rollouts here go below 0)."""
    runs = uneven_runs()
    grid = [1.0, 0.5, 0.1]
    sim = FixedPath(l2_grid=grid, cv_folds=3, patience=3, batch_weighting=weighting).fit(runs)
    floor = (loss_floor(runs), floor_width(runs))
    b = 1.5  # the median batch size (four of 1, four of 2)
    assert sim.batch_size_ == b
    expected = [
        [
            lam,
            np.mean(
                [
                    plain_rollout_mse(
                        runs.subset([r]), None, np.full((2, 3), -lam), b, weighting, floor
                    )
                    for r in sorted(runs.run_ids)
                ]
            ),
        ]
        for lam in grid
    ]
    np.testing.assert_allclose(sim.cv_mse_, expected, rtol=1e-12)


@pytest.mark.parametrize("weighting", ["mean", "sum"])
def test_linear_fit_weighs_batches_as_asked(weighting: str) -> None:
    """Batches of 1 and 2 (``b = 1.5``): the fit is the dense ridge solution of the design
    weighted as asked (``b / |batch|`` under "mean", 1 under "sum")."""
    runs = uneven_runs()
    sim = LinearSimulator(l2=0.3, batch_weighting=weighting).fit(runs)
    delta_A, delta_B = dense_solution(Design.from_runs(runs, 1.5, weighting), 0.3, 1 / 1.5)
    np.testing.assert_allclose(sim.A_, 1 / 1.5 + delta_A.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(sim.B_, delta_B.T, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_factored_design_solves_the_systems_of_its_product_with_its_rest(
    weighted: bool,
) -> None:
    """A design given as ``counts = lag @ raw`` (a memory kernel's factors) with a neutral rest
    mass per row: every product goes through the factors and is the dense ``X^T W X v + lam v``
    of ``X = [diag(L_prev) N, N]``, ``N = lag @ raw``; the prior's residual counts the rest
    (``L_next - prior_a (sum_i N_ti + rest_t) L_prev``); the solve is the dense one."""
    from scipy import sparse

    plain = Design.from_runs(tiny_runs(batch=2), 2, "mean")
    n, P = plain.counts.shape
    rng = np.random.default_rng(5)
    lag = sparse.csr_matrix(np.eye(n) + np.diag(rng.uniform(0.2, 0.5, n - 1), -1))
    raw = plain.counts
    rest = rng.uniform(0.1, 0.3, n)
    design = Design(
        (lag @ raw).tocsr(), plain.prev, plain.next, plain.step, rest, (lag, raw.tocsr())
    )
    weights = loss_weights(plain.prev, 1.0) if weighted else None
    lam, prior_a = 0.7, 0.5
    problem = LinearRidgeProblem(design, prior_a, weights)
    N = (lag @ raw).toarray()
    w = np.ones_like(plain.prev) if weights is None else weights
    vA, vB = rng.normal(size=(P, 3)), rng.normal(size=(P, 3))
    qA, qB = problem.matvec(vA, vB, lam)
    target = plain.next - prior_a * (N.sum(axis=1) + rest)[:, None] * plain.prev
    delta = []
    for j in range(3):
        X = np.hstack([plain.prev[:, [j]] * N, N])
        gram = X.T @ (w[:, [j]] * X) + lam * np.eye(2 * P)
        q = gram @ np.concatenate([vA[:, j], vB[:, j]])
        np.testing.assert_allclose(qA[:, j], q[:P], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(qB[:, j], q[P:], rtol=1e-12, atol=1e-12)
        delta.append(np.linalg.solve(gram, X.T @ (w[:, j] * target[:, j])))
    solution = problem.solve(lam, tol=1e-12)
    np.testing.assert_allclose(solution.delta_A, np.column_stack(delta)[:P], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(solution.delta_B, np.column_stack(delta)[P:], rtol=1e-8, atol=1e-10)


class _ScaledPrior:
    """A prior for `LinearSimulator.fit_toward`: ``A = 0.4``, ``B = -0.01`` everywhere,
    drifting by ``A' = 0``, ``B' = -0.02`` over training (``T0 = 3``); its teacher-forced
    prediction is the static part's. Records the `final` flag of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def offset(self, design: Design, final: bool) -> Any:
        from simfluence.simulators.linear import RidgeOffset

        self.calls.append((design.counts.shape[0], final))
        M, P = design.prev.shape[1], design.counts.shape[1]
        A, B = np.full((M, P), 0.4), np.full((M, P), -0.01)
        N = design.counts
        prediction = design.prev * (N @ A.T) + N @ B.T
        return RidgeOffset(prediction, A, B, (np.zeros((M, P)), np.full((M, P), -0.02)), 3.0)


def test_a_fit_toward_a_prior_shrinks_toward_it_and_cross_validates_with_its_drift() -> None:
    """`fit_toward`: the fit is the prior's offset plus the dense ridge departure from its
    prediction; the cross-validation fits the prior on each fold's training runs (`final`
    False; True once, for all the runs) and scores every fold's rollouts under the fold's
    parameters with the prior's drift, floored at the (scalar) floor given."""
    from simfluence.simulators.linear import run_folds

    runs = tiny_runs(batch=2, n_runs=4)
    grid = [3.0, 0.3]
    floor = (0.0, 0.0)
    prior = _ScaledPrior()
    sim = LinearSimulator(l2_grid=grid, cv_folds=2, patience=5, tol=1e-12, cv_tol=1e-12)
    offset = sim.fit_toward(runs, prior, 2.0, floor)
    n_rows = 4 * 8
    assert [final for _, final in prior.calls] == [False, False, True]
    assert prior.calls[-1][0] == n_rows
    design = Design.from_runs(runs, 2.0, "mean")
    np.testing.assert_allclose(offset.prediction, prior.offset(design, True).prediction)
    # the final fit: the dense solution of the departure from the prior's prediction
    N = design.counts.toarray()
    P = N.shape[1]
    target = design.next - offset.prediction
    lam = sim.l2_
    for j in range(3):
        X = np.hstack([design.prev[:, [j]] * N, N])
        delta = np.linalg.solve(X.T @ X + lam * np.eye(2 * P), X.T @ target[:, j])
        np.testing.assert_allclose(sim.A_[j], 0.4 + delta[:P], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(sim.B_[j], -0.01 + delta[P:], rtol=1e-7, atol=1e-9)
    # the cross-validation curve, fold by fold
    expected = []
    for lam in grid:
        errors = []
        for train, valid in run_folds(runs, 2):
            fold = LinearSimulator(l2=lam, tol=1e-12)
            slopes = fold.fit_toward(train, _ScaledPrior(), 2.0, floor).slopes
            errors.append(rollout_mse(valid, fold.A_, fold.B_, 2.0, "mean", floor, slopes, 3.0))
        expected.append([lam, float(np.mean(errors))])
    np.testing.assert_allclose(sim.cv_mse_, expected, rtol=1e-6)


def test_rollout_mse_lets_the_effects_drift_over_training() -> None:
    """With slopes ``(A', B')`` and time scale ``T0``, step ``t`` uses ``A + tau_t A'`` and
    ``B + tau_t B'``, ``tau_t = min((t - 1) / T0, 1)``: the MSE of that plain loop."""
    runs = tiny_runs(batch=2, n_runs=2)
    rng = np.random.default_rng(2)
    A, B = rng.uniform(0.4, 0.6, (3, 6)), rng.normal(0, 0.05, (3, 6))
    dA, dB = rng.normal(0, 0.05, (3, 6)), rng.normal(0, 0.05, (3, 6))
    index = {t: i for i, t in enumerate(runs.train_ids)}
    errors = []
    for run in runs.runs:
        L = run.losses[0].copy()
        path = [L]
        for t, batch in enumerate(run.curriculum):
            tau = min(t / 3.0, 1.0)
            cols = [index[i] for i in batch]
            L = (A + tau * dA)[:, cols].sum(1) * L + (B + tau * dB)[:, cols].sum(1)
            path.append(L)
        errors.append(((np.array(path)[1:] - run.losses[1:]) ** 2).mean(axis=0))
    got = rollout_mse(runs, A, B, 2.0, "sum", slopes=(dA, dB), time_scale=3.0)
    assert got == pytest.approx(float(np.mean(errors)), rel=1e-12)
    assert got != pytest.approx(rollout_mse(runs, A, B, 2.0, "sum"), rel=1e-6)
