"""The featurized simulator fitted to sparsely scored runs by its multi-step predictions."""

from __future__ import annotations

import numpy as np

from simfluence.runlog import Run, RunSet
from simfluence.simulators import gaps, make_simulator
from simfluence.simulators.featurized import NormalEquations
from simfluence.simulators.featurized.multistep import ObservedRuns, gauss_newton
from tests.simulators.featurized.test_featurized import featurized_runset


def _every(runs: RunSet, k: int) -> RunSet:
    out = []
    for r in runs.runs:
        seen = np.zeros(r.losses.shape, dtype=bool)
        seen[::k] = True
        seen[-1] = True
        out.append(Run(r.run_id, r.curriculum, r.losses, r.seed, r.lr, r.metadata, seen))
    return RunSet(runs.train_ids, runs.test_ids, out, runs.metadata, features=runs.features)


def _heldout_mse(simulator, held: RunSet) -> float:
    initial = np.stack([r.initial_loss for r in held.runs])
    simulated = simulator.simulate_many([r.curriculum for r in held.runs], initial)
    pairs = zip(simulated, held.runs, strict=True)
    return float(np.mean([(s - r.losses)[1:] ** 2 for s, r in pairs]))


def test_on_complete_runs_one_step_lands_on_the_closed_form_ridge() -> None:
    runs, _ = featurized_runset(runs=6, noise=1e-3)
    sim = make_simulator("featurized", n_components=3, l2=0.5).fit(runs)
    phi = sim.features_
    design = sim.design(runs)
    closed = NormalEquations.of(design, sim._regressors(design, phi), 1 / sim.batch_size_)
    expected = np.hstack(closed.solve(0.5))
    data = ObservedRuns.of(sim, runs, phi)
    # teacher forcing at every step: the objective is quadratic, Gauss-Newton exact at once
    coef, iterations = gauss_newton(data, np.zeros_like(expected), 0.5, 1 / sim.batch_size_)
    np.testing.assert_allclose(coef, expected, rtol=1e-7, atol=1e-10)
    assert iterations <= 2


def test_from_every_third_step_a_noiseless_model_is_recovered_exactly() -> None:
    runs, truth = featurized_runset(runs=16, seed=3)
    train, held = runs.split(4)
    sparse = _every(train, 3)
    params = {"n_components": 3, "l2": 1e-6, "time_varying": False}
    fitted = make_simulator("featurized", **params).fit(sparse)
    assert fitted.gap_rounds_ >= 2  # Gauss-Newton iterations
    np.testing.assert_allclose(fitted.A_, truth["A"], atol=1e-5)
    np.testing.assert_allclose(fitted.B_, truth["B"], atol=1e-5)
    # the imputation alone (the fit on interpolated losses) is far off
    interpolated = make_simulator("featurized", **params)
    interpolated._fit_complete(gaps.interpolate(sparse))
    interpolated._set_floor(sparse)
    assert _heldout_mse(fitted, held) < 1e-9 < 1e-3 * _heldout_mse(interpolated, held)


def test_gappy_noisy_runs_fit_better_than_by_imputation_rounds(monkeypatch) -> None:
    runs, _ = featurized_runset(runs=18, seed=5, noise=0.01)
    train, held = runs.split(4)
    sparse = _every(train, 4)
    direct = make_simulator("featurized", time_varying=False).fit(sparse)
    monkeypatch.delattr(type(direct), "fit_observed")  # the imputation rounds instead
    imputed = make_simulator("featurized", time_varying=False).fit(sparse)
    assert imputed.gap_rounds_ >= 1
    assert _heldout_mse(direct, held) < 0.9 * _heldout_mse(imputed, held)


def test_the_gradient_is_that_of_the_squared_errors_across_gaps() -> None:
    from simfluence.simulators.featurized.multistep import _normal_equations

    runs, _ = featurized_runset(runs=5, seed=2, noise=0.01)
    sparse = _every(runs, 3)
    sim = make_simulator("featurized", n_components=2, l2=1.0).fit(sparse)
    data = ObservedRuns.of(sim, sparse, sim.features_)
    coef = np.hstack([sim.coef_A_, sim.coef_B_])
    coef = coef + 0.01 * np.random.default_rng(0).standard_normal(coef.shape)
    H, g, _ = _normal_equations(data, coef, 1 / sim.batch_size_)
    numeric = np.zeros_like(coef)
    h = 1e-6
    for j in range(coef.shape[1]):  # every test example at once: their errors are separate
        up, down = coef.copy(), coef.copy()
        up[:, j] += h
        down[:, j] -= h
        plus = _normal_equations(data, up, 1 / sim.batch_size_)[2]
        minus = _normal_equations(data, down, 1 / sim.batch_size_)[2]
        numeric[:, j] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(-2 * g, numeric, rtol=1e-5, atol=1e-9)
    # H is the Gauss-Newton matrix: symmetric, positive semi-definite
    np.testing.assert_allclose(H, np.transpose(H, (0, 2, 1)))
    assert np.linalg.eigvalsh(H).min() > -1e-9


def test_auto_has_featurized_among_its_candidates_for_sparse_runs() -> None:
    runs, _ = featurized_runset(runs=12, seed=7, noise=0.01)
    train, held = runs.split(3)
    sparse = _every(train, 4)
    candidates = ["linear", "mean", "featurized"]
    auto = make_simulator("auto", candidates=candidates, cv_folds=3).fit(sparse)
    alone = make_simulator("featurized").fit(sparse)
    scores = auto.choice()["cv_all_steps_mse"]
    assert scores["featurized"] < scores["linear"]
    assert _heldout_mse(auto, held) <= 1.05 * _heldout_mse(alone, held)


def test_a_test_example_whose_rollout_diverges_keeps_its_coefficients() -> None:
    runs, _ = featurized_runset(runs=6, seed=4, noise=0.01)
    sparse = _every(runs, 3)
    sim = make_simulator("featurized", n_components=2, l2=1.0, time_varying=False).fit(sparse)
    data = ObservedRuns.of(sim, sparse, sim.features_)
    start = np.hstack([sim.coef_A_, sim.coef_B_])
    start[0, 0] = 1e120  # test example 0: alpha far above 1, its rollout overflows
    with np.errstate(all="raise"):  # no floating-point warning escapes either
        coef, iterations = gauss_newton(data, start.copy(), 1.0, 1 / sim.batch_size_)
    np.testing.assert_array_equal(coef[0], start[0])
    assert np.isfinite(coef).all() and iterations < 20
    assert not np.allclose(coef[1:], start[1:])  # the others moved
