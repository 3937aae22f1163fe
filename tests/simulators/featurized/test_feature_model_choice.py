"""`choose_feature_model`: run-wise cross-validation of (directions, ridge strength) for the
featurized simulators, against brute force: refit a simulator with each pair on every fold's
training runs and score its free-running rollouts of the held-out runs."""

from __future__ import annotations

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.simulators.featurized import FeaturizedSimulator
from simfluence.simulators.intervals import run_folds
from simfluence.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def runs():  # type: ignore[no-untyped-def]
    runs, _ = generate(SynthConfig(pool=12, tests=3, runs=9, per_run=6, batch=2, epochs=1, seed=8))
    return runs


def _brute_force(runs, chosen, k: int, lam: float, folds: int) -> float:  # type: ignore[no-untyped-def]
    """Mean over folds of the held-out rollout MSE of a simulator refitted with (k, lam) on the
    other folds (scored with the chosen simulator's floor, as the search scores it)."""
    errors = []
    for train, held in run_folds(runs, folds):
        refit = FeaturizedSimulator(n_components=k, l2=lam, time_varying=False).fit(train)
        effects = (refit.A_, refit.B_, refit.A_slope_, refit.B_slope_)
        errors.append(chosen._rollout_mse(held, effects))
    return float(np.mean(errors))


def test_the_cross_validation_curve_equals_refitting_on_each_fold(runs) -> None:  # type: ignore[no-untyped-def]
    sim = FeaturizedSimulator(
        component_grid=(1, 3), l2_grid=(0.01, 1.0, 100.0), time_varying=False, cv_folds=3,
        patience=5,
    ).fit(runs)  # fmt: skip
    curve = sim.cv_mse_
    assert [(k, lam) for k, lam, _ in curve] == [
        (1, 100.0),
        (1, 1.0),
        (1, 0.01),
        (3, 100.0),
        (3, 1.0),
        (3, 0.01),
    ]  # fmt: skip  (strong to weak, every k)
    for k, lam, mse in curve:
        assert mse == pytest.approx(_brute_force(runs, sim, k, lam, 3), rel=1e-9), (k, lam)
    best = min(curve, key=lambda row: row[2])
    assert (sim.n_components_, sim.l2_) == (best[0], best[1])


def test_the_walk_along_the_grid_stops_after_patience_rises(runs) -> None:  # type: ignore[no-untyped-def]
    grid = (1e4, 1e3, 1e2, 10.0, 1.0, 0.1, 0.01, 1e-3)
    full = FeaturizedSimulator(
        n_components=2, l2_grid=grid, time_varying=False, cv_folds=3, patience=len(grid)
    ).fit(runs)
    mses = [mse for _, _, mse in full.cv_mse_]
    for patience in (1, 2):
        sim = FeaturizedSimulator(
            n_components=2, l2_grid=grid, time_varying=False, cv_folds=3, patience=patience
        ).fit(runs)
        best, rises, expected = np.inf, 0, 0
        for mse in mses:  # the documented rule, by hand
            expected += 1
            rises = 0 if mse < best else rises + 1
            best = min(best, mse)
            if rises >= patience:
                break
        assert len(sim.cv_mse_) == expected
        assert [row[2] for row in sim.cv_mse_] == pytest.approx(mses[:expected], rel=1e-12)


def test_given_values_and_bad_ones(runs) -> None:  # type: ignore[no-untyped-def]
    one = FeaturizedSimulator(n_components=2, l2=0.5, time_varying=False).fit(runs)
    assert one.cv_mse_ is None and (one.n_components_, one.l2_) == (2, 0.5)
    walked = FeaturizedSimulator(n_components=2, l2_grid=(0.5,), time_varying=False).fit(runs)
    assert walked.cv_mse_ is None and walked.l2_ == 0.5
    for bad in (dict(l2=0.0), dict(l2=-1.0), dict(l2_grid=(1.0, 0.0)), dict(l2_grid=())):
        with pytest.raises(SimfluenceError, match="positive"):
            FeaturizedSimulator(n_components=2, time_varying=False, **bad).fit(runs)
    with pytest.raises(SimfluenceError, match="at least 2 training runs"):
        FeaturizedSimulator(n_components=2, time_varying=False).fit(runs.subset(runs.run_ids[:1]))
    two = runs.subset(runs.run_ids[:2])
    assert FeaturizedSimulator(n_components=2, time_varying=False, cv_folds=2).fit(two).cv_mse_
    with pytest.raises(SimfluenceError, match="cv_folds must be at least 2"):
        FeaturizedSimulator(n_components=2, time_varying=False, cv_folds=1).fit(runs)


def test_hybrid_keeps_its_parameters_and_documented_defaults() -> None:
    from simfluence.simulators.featurized import HybridSimulator

    given = dict(
        l2=0.5, l2_grid=[3.0, 1.0], n_components=2, component_grid=[1, 2], time_varying=False,
        feature_l2=0.25, feature_l2_grid=[2.0], cv_folds=3, patience=4, unseen="prior",
        batch_weighting="sum", tol=1e-7, cv_tol=1e-3, max_iter=50, memory="0.8+lr",
    )  # fmt: skip
    assert HybridSimulator(**given).get_params() == given
    defaults = HybridSimulator().get_params()
    assert (defaults["l2"], defaults["n_components"], defaults["feature_l2"]) == (None,) * 3
    assert defaults["time_varying"] is True and defaults["memory"] == "none"
    assert (defaults["cv_folds"], defaults["patience"]) == (4, 2)
    assert (defaults["tol"], defaults["cv_tol"], defaults["max_iter"]) == (1e-8, 1e-4, 1000)
    assert (defaults["unseen"], defaults["batch_weighting"]) == ("error", "mean")


def test_featurized_keeps_its_parameters_and_documented_defaults(runs) -> None:  # type: ignore[no-untyped-def]
    """Every parameter given is kept as given (a saved simulator is rebuilt from them), the
    defaults are those documented, and the feature search's curve is reported under both of
    its names (``cv_mse_``, ``feature_cv_mse_``)."""
    given = dict(
        n_components=2, component_grid=[1, 2], time_varying=False, l2=0.5, l2_grid=[2.0],
        cv_folds=3, patience=4, unseen="prior", batch_weighting="sum",
    )  # fmt: skip
    assert FeaturizedSimulator(**given).get_params() == given
    defaults = FeaturizedSimulator().get_params()
    assert (defaults["cv_folds"], defaults["patience"]) == (4, 2)
    assert (defaults["unseen"], defaults["batch_weighting"]) == ("error", "mean")
    sim = FeaturizedSimulator(n_components=2, l2_grid=(10.0, 1.0), time_varying=False).fit(runs)
    assert sim.cv_mse_ is not None and sim.feature_cv_mse_ == sim.cv_mse_


def _one_step_sse(sim, runs) -> float:  # type: ignore[no-untyped-def]
    """Teacher-forced one-step squared error on `runs`: ``L_t`` against
    ``w_t sum_i n_ti (A_i L_{t-1} + B_i)`` (``w_t = b / |c_t|``), the model the fit minimizes."""
    index = {t: k for k, t in enumerate(runs.train_ids)}
    total = 0.0
    for run in runs.runs:
        for t, batch in enumerate(run.curriculum, start=1):
            prev, weight = run.losses[t - 1], sim.batch_size_ / len(batch)
            step = sum(sim.A_[:, index[i]] * prev + sim.B_[:, index[i]] for i in batch)
            total += float(((run.losses[t] - weight * step) ** 2).sum())
    return total


def test_hybrid_departs_from_the_featurized_prior_only_to_fit_better(runs) -> None:  # type: ignore[no-untyped-def]
    """The hybrid's effects are the featurized prior plus a ridge departure: a huge pull keeps
    the prior; any pull fits the training steps at least as well as the prior (the departure
    0 is always available), and a weaker pull fits better."""
    from simfluence.simulators.featurized import HybridSimulator

    common = dict(n_components=2, feature_l2=1.0, time_varying=False)
    prior = FeaturizedSimulator(n_components=2, l2=1.0, time_varying=False).fit(runs)
    held = HybridSimulator(l2=1e12, **common).fit(runs)
    np.testing.assert_allclose(held.A_, prior.A_, atol=1e-8)
    np.testing.assert_allclose(held.B_, prior.B_, atol=1e-8)
    sse = [_one_step_sse(HybridSimulator(l2=lam, **common).fit(runs), runs) for lam in (10, 0.1)]
    assert sse[1] < sse[0] < _one_step_sse(prior, runs)


def test_cross_validation_scores_rollouts_as_the_simulator_reports_them(runs) -> None:  # type: ignore[no-untyped-def]
    """`_rollout_mse` (what cross-validation minimizes) is the all-steps MSE of the rollouts
    `simulate_many` reports: drifting effects, batch weighting and the floor included."""
    from simfluence.metrics import all_steps_mse

    for weighting in ("mean", "sum"):
        sim = FeaturizedSimulator(
            n_components=2, l2=1.0, time_varying=True, batch_weighting=weighting
        ).fit(runs)
        assert sim.B_slope_ is not None and sim.A_slope_ is not None
        middle = np.median(np.concatenate([r.losses[1:] for r in runs.runs]), axis=0)
        sim.floor_, sim.floor_width_ = middle, 0.1 * np.abs(middle)  # a floor that binds
        rollouts = sim.simulate_many(
            [r.curriculum for r in runs.runs], np.stack([r.initial_loss for r in runs.runs])
        )
        expected = all_steps_mse([r.losses for r in runs.runs], rollouts).mean
        effects = (sim.A_, sim.B_, sim.A_slope_, sim.B_slope_)
        assert sim._rollout_mse(runs, effects) == pytest.approx(expected, rel=1e-12)


def test_consumed_examples_and_the_component_grid(runs) -> None:  # type: ignore[no-untyped-def]
    from simfluence.simulators.featurized.effects import _consumed

    subset = runs.subset(runs.run_ids[:2])
    used = {i for r in subset.runs for b in r.curriculum for i in b}
    mask = _consumed(subset)
    assert mask.dtype == bool
    assert [runs.train_ids[k] for k in np.flatnonzero(mask)] == sorted(
        used, key=runs.train_ids.index
    )
    assert not mask.all()  # two runs leave some of the pool unconsumed
    one = FeaturizedSimulator(n_components=1, component_grid=(5,), l2=1.0, time_varying=False)
    assert one.fit(runs).n_components_ == 1  # given: the grid is not searched
    zero = FeaturizedSimulator(component_grid=(0, 1), l2=1.0, time_varying=False).fit(runs)
    assert zero.n_components_ in (0, 1)  # no directions at all is a candidate
    for grid in [(), (-1, 2)]:
        with pytest.raises(SimfluenceError, match="n_components must be >= 0"):
            FeaturizedSimulator(component_grid=grid, l2=1.0).fit(runs)


def _scripted_errors(monkeypatch, row_errors: list[float], folds: int) -> None:  # type: ignore[no-untyped-def]
    """Make every fold's held-out rollout error of the `k`-th (k, l2) row of the search
    `row_errors[k]` (inf past the script): the selection rule, apart from the rollouts."""
    calls = iter(range(10_000))

    def scripted(self, runs, effects) -> float:  # type: ignore[no-untyped-def]
        row = next(calls) // folds
        return row_errors[row] if row < len(row_errors) else np.inf

    monkeypatch.setattr(FeaturizedSimulator, "_rollout_mse", scripted)


def test_the_search_counts_a_plateau_as_rises_and_keeps_the_least_error(runs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With `patience` 2 a walk stops after two steps that do not improve on its minimum (an
    equal error is no improvement); the pair with the least error wins, wherever it is."""
    grid = (100.0, 10.0, 1.0, 0.1, 0.01, 0.001)
    rows = [3.0, 2.0, 2.0, 2.0, 5.0, 1.0, 4.0, 6.0, 7.0, 8.0, 9.0]  # k = 1 (4 rows), 2 (4), 3 (3)
    _scripted_errors(monkeypatch, rows, 2)
    sim = FeaturizedSimulator(
        component_grid=(1, 2, 3), l2_grid=grid, time_varying=False, cv_folds=2, patience=2
    ).fit(runs)
    assert [row[:2] for row in sim.cv_mse_] == [
        [1, 100.0], [1, 10.0], [1, 1.0], [1, 0.1],
        [2, 100.0], [2, 10.0], [2, 1.0], [2, 0.1],
        [3, 100.0], [3, 10.0], [3, 1.0],
    ]  # fmt: skip
    assert (sim.n_components_, sim.l2_) == (2, 10.0)


def test_when_every_rollout_explodes_the_largest_k_and_strongest_l2_win(runs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """No finite CV error: each walk stops after `patience` errors (none is a minimum), and
    the fit falls back to the most directions and the strongest ridge of the grids."""
    _scripted_errors(monkeypatch, [], 2)
    sim = FeaturizedSimulator(
        component_grid=(1, 2, 3), l2_grid=(1.0, 10.0, 0.1), time_varying=False, cv_folds=2,
        patience=2,
    ).fit(runs)  # fmt: skip
    assert [row[:2] for row in sim.cv_mse_] == [[k, lam] for k in (1, 2, 3) for lam in (10.0, 1.0)]
    assert all(np.isinf(row[2]) for row in sim.cv_mse_)
    assert (sim.n_components_, sim.l2_) == (3, 10.0)


def test_a_zero_l2_is_refused_by_name(runs) -> None:  # type: ignore[no-untyped-def]
    """``l2=0`` is refused as the given value it is (not as a grid of values)."""
    with pytest.raises(SimfluenceError, match=r"^featurized: l2 must be positive, got 0\.0$"):
        FeaturizedSimulator(n_components=2, l2=0.0, time_varying=False).fit(runs)


def test_the_chosen_pair_is_the_model_fitted_with_it_given(runs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A search that picks fewer directions than its largest candidate keeps exactly that many
    (on both sides: training and test features) and gives the model fitted with the pair
    given: calibration's fold copies rely on it."""
    _scripted_errors(monkeypatch, [2.0, 1.0, 3.0, 4.0, 5.0, 6.0], 2)
    sim = FeaturizedSimulator(
        component_grid=(1, 3), l2_grid=(10.0, 1.0, 0.1), time_varying=False, cv_folds=2
    ).fit(runs)
    monkeypatch.undo()
    assert (sim.n_components_, sim.l2_) == (1, 1.0)
    assert sim.features_.shape[1] == sim.test_features_.shape[1] == 2
    given = FeaturizedSimulator(n_components=1, l2=1.0, time_varying=False).fit(runs)
    np.testing.assert_allclose(sim.A_, given.A_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sim.test_map_, given.test_map_, rtol=1e-10, atol=1e-12)


def test_the_drifting_cross_validation_curve_equals_refitting_on_each_fold(runs) -> None:  # type: ignore[no-untyped-def]
    """With drift the regressors of ``k`` directions are ``[F_k, tau F_k]``, a sub-block of the
    largest ``k``'s: the curve still equals refitting every pair on every fold."""
    sim = FeaturizedSimulator(
        component_grid=(1, 2), l2_grid=(1.0, 0.01), time_varying=True, cv_folds=2, patience=5
    ).fit(runs)
    for k, lam, mse in sim.cv_mse_:
        errors = []
        for train, held in run_folds(runs, 2):
            refit = FeaturizedSimulator(n_components=k, l2=lam, time_varying=True).fit(train)
            errors.append(
                sim._rollout_mse(held, (refit.A_, refit.B_, refit.A_slope_, refit.B_slope_))
            )
        assert mse == pytest.approx(np.mean(errors), rel=1e-9), (k, lam)
