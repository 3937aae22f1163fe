"""`hybrid`: the choice of its memory kernel, its ridge regression toward the featurized prior
(against a dense numpy solve), and the cross-validation of its pull (against refitting on
every fold). Tiny run sets: every fit here takes milliseconds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.runlog.features import ExampleFeatures
from simfluence.runlog.runs import Run, RunSet, count_matrix
from simfluence.simulators.encoding import weight_batches
from simfluence.simulators.featurized import HybridSimulator
from simfluence.simulators.intervals import run_folds
from simfluence.simulators.memory import MemoryKernel
from simfluence.synth import random_curriculum

#: a small featurized prior: one direction, its ridge strength chosen from two by run-wise CV
#: (then held fixed while the hybrid's own pull is chosen)
PRIOR: dict[str, Any] = {"n_components": 1, "feature_l2_grid": (10.0, 0.1), "time_varying": False}
ADAM = {"name": "Adam", "betas": [0.9, 0.999]}


def momentum_runs(
    decay: float = 0.8,
    n_runs: int = 5,
    seed: int = 0,
    optimizer: dict[str, Any] | None = None,
    lr: bool = False,
) -> RunSet:
    """`n_runs` runs over a pool of 8 (batches of 2, two epochs) of a Simfluence-Linear process
    driven by the momentum-smoothed counts of decay `decay`, with random features; `optimizer`
    recorded in the run set's config, and (`lr`) a decaying learning-rate schedule."""
    rng = np.random.default_rng(seed)
    ids = [f"x{i}" for i in range(8)]
    index = {t: k for k, t in enumerate(ids)}
    A = 0.5 + 0.05 * rng.standard_normal((2, 8))
    B = -0.05 * rng.uniform(0.2, 1.0, (2, 8))
    start = rng.uniform(1.0, 2.0, 2)
    runs = []
    for r in range(n_runs):
        curriculum = random_curriculum(ids, 6, 2, 2, rng)
        raw = weight_batches(count_matrix(curriculum, index), 2, "mean")
        counts = MemoryKernel(decay).apply(raw)
        alpha, beta = np.asarray(counts @ A.T), np.asarray(counts @ B.T)
        losses = np.empty((len(curriculum) + 1, 2))
        losses[0] = start
        for t in range(len(curriculum)):
            losses[t + 1] = (alpha[t] * losses[t] + beta[t]) * np.exp(0.005 * rng.normal(size=2))
        rates = np.linspace(1.0, 0.2, len(curriculum)) if lr else None
        runs.append(Run(f"r{r}", curriculum, losses, lr=rates))
    metadata = {} if optimizer is None else {"config": {"optimizer": optimizer}}
    out = RunSet(ids, ["t0", "t1"], runs, metadata)
    out.features = ExampleFeatures(
        rng.standard_normal((8, 2)), rng.standard_normal((2, 2)), {"source": "test"}
    )
    return out


@pytest.fixture(scope="module")
def runs() -> RunSet:
    return momentum_runs(optimizer=ADAM)


def _hybrid(**params: Any) -> HybridSimulator:
    return HybridSimulator(**{**PRIOR, "l2_grid": (10.0, 1.0, 0.1), "cv_folds": 2, **params})


# -- the memory kernel -----------------------------------------------------------------------------
def test_one_kernel_is_fitted_without_a_kernel_table(runs: RunSet) -> None:
    """A single kernel (a decay given, or listed twice) is fitted as such: ``memory_`` is it,
    and there is no table of kernels (``memory_cv_`` None)."""
    sim = _hybrid(memory=0.5, l2=1.0).fit(runs)
    assert sim.memory_ == {"decay": 0.5, "lr_scale": False} and sim.memory_cv_ is None
    again = _hybrid(memory="0.5,0.5", l2=1.0).fit(runs)  # deduplicated: one kernel
    assert again.memory_cv_ is None
    np.testing.assert_array_equal(again.A_, sim.A_)


def test_the_featurized_prior_is_chosen_by_cross_validation_first(runs: RunSet) -> None:
    """The prior's ridge strength, or its number of directions (no more than the features
    have: two here), is the one with the least CV error of the feature-model search."""
    sim = _hybrid(l2=1.0).fit(runs)
    curve = sim.feature_cv_mse_ or []
    assert [row[:2] for row in curve] == [[1, 10.0], [1, 0.1]]
    assert sim.feature_l2_ == min(curve, key=lambda row: row[2])[1]
    sim = _hybrid(l2=1.0, n_components=None, component_grid=(1, 5), feature_l2=1.0).fit(runs)
    curve = sim.feature_cv_mse_ or []
    assert [row[:2] for row in curve] == [[1, 1.0], [2, 1.0]]
    assert sim.n_components_ == min(curve, key=lambda row: row[2])[0]


def test_the_generating_kernel_wins(runs: RunSet) -> None:
    """On runs driven by momentum 0.8 the CV of the pull prefers that kernel to none: its row
    of ``memory_cv_`` has the lower (finite) error and it is the kernel kept."""
    sim = _hybrid(memory="none,0.8", feature_l2=1.0, l2_grid=(1.0, 0.1)).fit(runs)
    (_, _, _, none), (_, _, _, momentum) = sim.memory_cv_ or [[0] * 4] * 2
    assert np.isfinite(momentum) and momentum < none
    assert sim.memory_ == {"decay": 0.8, "lr_scale": False}


def test_the_kernel_with_the_least_cross_validation_error_wins(runs: RunSet) -> None:
    """Each candidate kernel is a whole hybrid fit: its row of ``memory_cv_`` is ``[decay,
    lr_scale, l2, mse]`` of the hybrid fitted with that kernel alone (its chosen ``l2`` and
    least CV error), and the kernel with the least error is kept, with that fit's state."""
    sim = _hybrid(memory="none,0.8", feature_l2=1.0).fit(runs)
    alone = [_hybrid(memory=m, feature_l2=1.0).fit(runs) for m in ("none", 0.8)]
    expected = [
        [decay, 0.0, fit.l2_, min(mse for _, mse in fit.cv_mse_)]
        for decay, fit in zip((0.0, 0.8), alone, strict=True)
    ]
    assert sim.memory_cv_ == expected
    assert expected[1][3] < expected[0][3]  # the generating kernel fits better
    winner = alone[1]
    assert sim.memory_ == {"decay": 0.8, "lr_scale": False}
    assert (sim.l2_, sim.cv_mse_) == (winner.l2_, winner.cv_mse_)
    np.testing.assert_array_equal(sim.A_, winner.A_)
    np.testing.assert_array_equal(sim.B_, winner.B_)
    np.testing.assert_array_equal(sim.coef_A_, winner.coef_A_)


def test_a_tie_keeps_the_earlier_kernel() -> None:
    """Runs of one step each cannot tell momentum from none (the bias-corrected kernel is the
    identity on a first step): both kernels reach the same CV error, and the earlier, simpler
    kernel is kept."""
    rng = np.random.default_rng(0)
    ids = [f"x{i}" for i in range(6)]
    one_step = [
        Run(f"r{r}", [list(rng.choice(ids, 2, replace=False))], [[1.5, 1.2], [1.4, 1.0]])
        for r in range(6)
    ]
    runs = RunSet(ids, ["t0", "t1"], one_step, {})
    runs.features = ExampleFeatures(
        rng.standard_normal((6, 2)), rng.standard_normal((2, 2)), {"source": "test"}
    )
    sim = _hybrid(memory="none,0.8", feature_l2=1.0, l2_grid=(10.0, 1.0)).fit(runs)
    assert sim.memory_cv_ is not None and sim.memory_cv_[0][3] == sim.memory_cv_[1][3]
    assert sim.memory_ == {"decay": 0.0, "lr_scale": False}


def test_without_cross_validation_errors_the_first_kernel_is_kept(runs: RunSet) -> None:
    """A given ``l2`` leaves no CV error to compare the kernels by (rows of ``inf``): the first
    (simplest) kernel is kept, the fit of that kernel alone."""
    sim = _hybrid(memory="none,0.8", l2=1.0).fit(runs)
    assert sim.memory_cv_ == [[0.0, 0.0, 1.0, np.inf], [0.8, 0.0, 1.0, np.inf]]
    assert sim.memory_ == {"decay": 0.0, "lr_scale": False}
    alone = _hybrid(memory="none", l2=1.0).fit(runs)
    np.testing.assert_array_equal(sim.A_, alone.A_)
    np.testing.assert_array_equal(sim.B_, alone.B_)


def test_auto_tries_no_memory_0_8_and_the_recorded_decay_on_two_runs_or_more(
    runs: RunSet,
) -> None:
    """``memory="auto"`` tries the identity, decay 0.8 and the recorded optimizer's decay
    (Adam's ``beta1`` 0.9 here), not the rest of `linear`'s list (a given ``l2``: the kernels
    are listed, not compared); two training runs suffice to choose (two folds), one is
    refused."""
    two = runs.subset(runs.run_ids[:2])
    sim = _hybrid(memory="auto", l2=1.0, feature_l2=1.0).fit(two)
    assert [row[:2] for row in sim.memory_cv_ or []] == [[0.0, 0.0], [0.8, 0.0], [0.9, 0.0]]
    with pytest.raises(SimfluenceError, match="at least 2 training runs"):
        _hybrid(memory="none,0.8", l2=1.0).fit(runs.subset(runs.run_ids[:1]))


def test_learning_rate_scaling_follows_the_batch_weighting() -> None:
    """The recorded learning rates scale the kernel under "mean" batch weighting; under "sum"
    (whose rows have no fixed mass) asking for that scaling is refused."""
    scheduled = momentum_runs(n_runs=3, lr=True)
    sim = _hybrid(memory="0.8+lr", l2=1.0).fit(scheduled)
    assert sim.memory_ == {"decay": 0.8, "lr_scale": True}
    with pytest.raises(SimfluenceError, match="batch_weighting='mean'"):
        _hybrid(memory="0.8+lr", l2=1.0, batch_weighting="sum").fit(scheduled)


# -- the ridge regression toward the prior ---------------------------------------------------------
def _dense_departure(
    design: Any, lam: float, A0: np.ndarray, B0: np.ndarray, b: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(A - A0, B - B0)``, each ``(M, P)``: per test example, the ridge solution of the
    teacher-forced steps ``L_next = (rest / b + N A) L_prev + N B`` (``rest`` the neutral mass
    of a scaled kernel, 0 without) around ``(A0, B0)``, by numpy's dense solve."""
    N = design.counts.toarray()
    P = N.shape[1]
    rest = np.zeros(len(N)) if design.rest is None else design.rest
    dA, dB = np.empty_like(A0), np.empty_like(B0)
    for j in range(design.prev.shape[1]):
        prev = design.prev[:, j]
        X = np.hstack([prev[:, None] * N, N])
        target = design.next[:, j] - (rest / b + N @ A0[j]) * prev - N @ B0[j]
        delta = np.linalg.solve(X.T @ X + lam * np.eye(2 * P), X.T @ target)
        dA[j], dB[j] = delta[:P], delta[P:]
    return dA, dB


@pytest.mark.parametrize(
    ("memory", "weighting"), [("none", "sum"), ("0.8+lr", "mean")], ids=["sum", "lr-scaled"]
)
def test_the_fit_is_the_ridge_solution_around_the_featurized_prior(
    memory: str, weighting: str
) -> None:
    """With a given ``l2`` the hybrid's ``A_``, ``B_`` are the prior's effects plus the dense
    ridge departure that explains what the prior's predictions leave of the training steps
    (the prior: the hybrid with an overwhelming pull), in the hybrid's own batch weighting and
    memory kernel (an lr-scaled kernel's neutral rest included)."""
    scheduled = momentum_runs(n_runs=3, lr=True, seed=1)
    # uneven batches: "sum" and "mean" weighting differ
    scheduled.runs[0] = Run(
        "odd", [["x0"], ["x1", "x2", "x3"], ["x4"]], scheduled.runs[0].losses[:4], lr=None
    )
    if memory != "none":
        scheduled.runs.pop(0)
    params = {"memory": memory, "batch_weighting": weighting}
    prior = _hybrid(l2=1e12, **params).fit(scheduled)
    sim = _hybrid(l2=0.3, tol=1e-12, **params).fit(scheduled)
    design = sim.design(scheduled)
    dA, dB = _dense_departure(design, 0.3, prior.A_, prior.B_, sim.batch_size_)
    np.testing.assert_allclose(sim.A_, prior.A_ + dA, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sim.B_, prior.B_ + dB, rtol=1e-6, atol=1e-9)
    assert np.abs(dA).max() > 1e-3  # a departure there is to see


def test_the_solver_stops_at_its_tolerance_or_its_iteration_cap(runs: RunSet) -> None:
    """The ridge solve runs to `tol` within `max_iter` conjugate-gradient steps, and reports
    both."""
    exact = _hybrid(l2=0.3).fit(runs)
    assert exact.cg_residual_ <= 1e-8 and exact.cg_iterations_ > 2
    loose = _hybrid(l2=0.3, tol=1e-2).fit(runs)
    assert 1e-8 < loose.cg_residual_ <= 1e-2
    capped = _hybrid(l2=0.3, max_iter=2).fit(runs)
    assert capped.cg_iterations_ == 2 and capped.cg_residual_ > 1e-2


def test_the_ridge_checks_speak_as_the_hybrid(runs: RunSet) -> None:
    """The checks of the ridge inside say whose parameter failed: the hybrid's."""
    with pytest.raises(SimfluenceError, match=r"^hybrid: l2 values must be positive"):
        _hybrid(l2=-1.0).fit(runs)


@pytest.mark.parametrize("time_varying", [False, True], ids=["static", "drifting"])
def test_the_pull_is_cross_validated_against_a_prior_refitted_on_each_fold(
    time_varying: bool,
) -> None:
    """``cv_mse_`` (``cv_folds`` folds of whole runs) equals, for each ``l2``, the mean over the
    folds of the held-out rollout error of a hybrid fitted with that ``l2`` on the fold's
    training runs alone (its featurized prior refitted there too, and its drift kept)."""
    runs = momentum_runs(decay=0.0, n_runs=6, seed=2)
    common = {**PRIOR, "time_varying": time_varying, "cv_tol": 1e-12, "cv_folds": 3}
    sim = HybridSimulator(l2_grid=(10.0, 1.0, 0.1), patience=5, **common).fit(runs)
    common["feature_l2"] = sim.feature_l2_  # chosen first, then held fixed
    assert [lam for lam, _ in sim.cv_mse_] == [10.0, 1.0, 0.1]
    for lam, mse in sim.cv_mse_:
        errors = []
        for train, held in run_folds(runs, 3):
            ref = HybridSimulator(l2=lam, **common).fit(train)
            effects = (ref.A_, ref.B_, ref.A_slope_, ref.B_slope_)
            errors.append(sim._rollout_mse(held, effects))
        assert mse == pytest.approx(np.mean(errors), rel=1e-7), lam


def test_the_walk_along_the_pull_grid_stops_after_patience_rises() -> None:
    """The CV walk from strong to weak pulls stops once the error has risen `patience` times in
    a row past its minimum: here it rises at ``l2 = 1e-3`` and again at ``1e-4``."""
    runs = momentum_runs(decay=0.0, n_runs=6, seed=2)
    grid = (1.0, 0.1, 0.01, 1e-3, 1e-4)
    full = HybridSimulator(**PRIOR, l2_grid=grid, cv_folds=2, patience=5).fit(runs)
    mses = [mse for _, mse in full.cv_mse_]
    assert mses[3] > mses[2] and mses[4] > mses[2]  # the two rises
    short = HybridSimulator(**PRIOR, l2_grid=grid, cv_folds=2, patience=1).fit(runs)
    assert [mse for _, mse in short.cv_mse_] == mses[:4]
    assert short.l2_ == full.l2_ == 0.01


def test_a_drifting_prior_keeps_its_drift(runs: RunSet) -> None:
    """The featurized prior's drift over training is kept as is: with an overwhelming pull the
    hybrid's effects and drifts are the featurized simulator's."""
    from simfluence.simulators.featurized import FeaturizedSimulator

    sim = _hybrid(l2=1e12, feature_l2=1.0, time_varying=True).fit(runs)
    prior = FeaturizedSimulator(n_components=1, l2=1.0, time_varying=True).fit(runs)
    assert sim.A_slope_ is not None and sim.B_slope_ is not None
    np.testing.assert_allclose(sim.A_slope_, prior.A_slope_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sim.B_slope_, prior.B_slope_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sim.A_, prior.A_, rtol=1e-6, atol=1e-9)
