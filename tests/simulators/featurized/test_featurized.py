"""Example features (storage, validation, import) and the featurized and hybrid simulators."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import sparse

from simfluence.cli.main import main
from simfluence.counterfactual import leave_one_out, optimize_curriculum, step_contributions
from simfluence.counterfactual.search import trust_region_rollouts
from simfluence.counterfactual.search.evaluator import _Evaluator
from simfluence.counterfactual.search.starts import _random_layouts
from simfluence.curricula import random_curriculum
from simfluence.errors import SimfluenceError
from simfluence.evaluation import evaluate
from simfluence.metrics import interval_coverage, interval_width
from simfluence.runlog import Run, RunSet, load_runset, save_runset
from simfluence.runlog.features import (
    ExampleFeatures,
    FeatureError,
    align,
    load_features,
    read_feature_table,
    save_features,
)
from simfluence.simulators import load_simulator, make_simulator
from simfluence.simulators.dynamics import step_times, time_augmented
from simfluence.simulators.featurized import FeatureMissingError, fit_test_map
from simfluence.simulators.ridge import Design, LinearRidgeProblem
from simfluence.synth import SynthConfig, generate


def featurized_runset(
    pool: int = 60,
    tests: int = 6,
    dim: int = 3,
    runs: int = 14,
    per_run: int = 24,
    batch: int = 4,
    epochs: int = 2,
    reserved: int = 0,
    drift: bool = False,
    seed: int = 0,
    noise: float = 0.0,
) -> tuple[RunSet, dict[str, np.ndarray]]:
    """Runs drawn from a featurized model with known coefficients: ``A_i(z) = 1/b +
    u_z . [1, x_i] (+ tau_t u'_z . [1, x_i])``, the same for ``B``, plus Gaussian process
    noise of standard deviation `noise` at every step (0: noiseless). The last `reserved` pool
    examples are consumed only by the last two runs."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((pool, dim))
    Y = rng.standard_normal((tests, dim))
    phi = np.hstack([np.ones((pool, 1)), X])
    u = np.hstack([np.full((tests, 1), -0.02), 0.01 * rng.standard_normal((tests, dim))])
    v = 0.01 * rng.standard_normal((tests, dim + 1))
    A, B = 1.0 / batch + u @ phi.T, v @ phi.T
    A1 = (0.01 * rng.standard_normal((tests, dim + 1)) @ phi.T) if drift else 0 * A
    B1 = (0.01 * rng.standard_normal((tests, dim + 1)) @ phi.T) if drift else 0 * B
    ids = [f"x{i}" for i in range(pool)]
    index = {t: k for k, t in enumerate(ids)}
    open_ids = ids[: pool - reserved]
    out = []
    for r in range(runs):
        drawable = ids if r >= runs - 2 else open_ids
        curriculum = random_curriculum(drawable, per_run, batch, epochs, np.random.default_rng(r))
        counts = sparse.lil_matrix((len(curriculum), pool))
        for t, b in enumerate(curriculum):
            for i in b:
                counts[t, index[i]] += 1
        counts = counts.tocsr()
        tau = step_times(len(curriculum), per_run // batch * epochs)
        losses = np.empty((len(curriculum) + 1, tests))
        losses[0] = 1.0 + rng.random(tests)
        for t in range(len(curriculum)):
            row = counts[t]
            alpha = row @ (A + tau[t] * A1).T
            beta = row @ (B + tau[t] * B1).T
            losses[t + 1] = alpha * losses[t] + beta + noise * rng.standard_normal(tests)
        out.append(Run(f"run-{r:04d}", curriculum, losses, seed=r))
    features = ExampleFeatures(X, Y, {"source": "test"})
    runset = RunSet(ids, [f"z{j}" for j in range(tests)], out, {}, features=features)
    return runset, {"A": A, "B": B, "A1": A1, "B1": B1}


# -- features as data -------------------------------------------------------------------------
def test_features_round_trip_with_the_run_set(tmp_path) -> None:
    runs, _ = featurized_runset()
    save_runset(runs, tmp_path / "set")
    loaded = load_runset(tmp_path / "set")
    np.testing.assert_array_equal(loaded.features.train, runs.features.train)
    np.testing.assert_array_equal(loaded.features.test, runs.features.test)
    assert loaded.features.metadata["source"] == "test"
    train, held = loaded.split(2)
    assert train.features is loaded.features and held.features is loaded.features


def test_features_are_validated_with_one_line_errors(tmp_path) -> None:
    train_ids, test_ids = ["a", "b"], ["t"]
    with pytest.raises(FeatureError, match="no vector for id 'b'"):
        align(["a", "t"], np.ones((2, 3)), train_ids, test_ids, "f.npz")
    with pytest.raises(FeatureError, match=r"vector of id 'b' has nan"):
        align(["a", "b", "t"], [[1.0], [np.nan], [2.0]], train_ids, test_ids, "f.npz")
    with pytest.raises(FeatureError, match="appears twice"):
        align(["a", "a", "b", "t"], np.ones((4, 1)), train_ids, test_ids, "f.npz")
    with pytest.raises(FeatureError, match=r"expected \(2, d\)"):
        ExampleFeatures(np.ones((3, 2)), np.ones((1, 2))).check(2, 1)
    save_features(tmp_path, ExampleFeatures(np.ones((2, 2)), np.ones((1, 2))), train_ids, test_ids)
    with pytest.raises(FeatureError, match="train ids differ"):
        load_features(tmp_path, ["a", "c"], test_ids)


def test_feature_tables_from_npz_and_parquet(tmp_path) -> None:
    vectors = np.arange(6.0).reshape(3, 2)
    np.savez(tmp_path / "f.npz", ids=np.array(["a", "b", "t"]), vectors=vectors)
    ids, got = read_feature_table(tmp_path / "f.npz")
    assert ids == ["a", "b", "t"]
    np.testing.assert_array_equal(got, vectors)
    pq.write_table(
        pa.table({"id": ["a", "b", "t"], "vector": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]}),
        tmp_path / "list.parquet",
    )
    pq.write_table(
        pa.table({"id": ["a", "b", "t"], "x": [0.0, 2.0, 4.0], "y": [1, 3, 5]}),
        tmp_path / "cols.parquet",
    )
    for name in ("list.parquet", "cols.parquet"):
        ids, got = read_feature_table(tmp_path / name)
        np.testing.assert_array_equal(got, vectors)
    with pytest.raises(FeatureError, match="needs arrays 'ids' and 'vectors'"):
        np.savez(tmp_path / "bad.npz", x=vectors)
        read_feature_table(tmp_path / "bad.npz")


def test_cli_features_from_file_and_its_errors(tmp_path, capsys) -> None:
    runs, _ = featurized_runset()
    save_runset(RunSet(runs.train_ids, runs.test_ids, runs.runs), tmp_path / "set")
    ids = runs.train_ids + runs.test_ids
    vectors = np.vstack([runs.features.train, runs.features.test])
    np.savez(tmp_path / "f.npz", ids=np.array(ids[1:]), vectors=vectors[1:])
    assert main(["features", str(tmp_path / "set"), "--from", str(tmp_path / "f.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no vector for id 'x0'" in err
    np.savez(tmp_path / "f.npz", ids=np.array(ids), vectors=vectors)
    assert main(["features", str(tmp_path / "set"), "--from", str(tmp_path / "f.npz")]) == 0
    np.testing.assert_array_equal(load_runset(tmp_path / "set").features.train, vectors[:60])


def test_featurized_needs_features() -> None:
    runs, _ = featurized_runset()
    runs.features = None
    with pytest.raises(FeatureMissingError, match="simfluence features DIR"):
        make_simulator("featurized").fit(runs)


# -- the featurized simulator -----------------------------------------------------------------
@pytest.mark.parametrize("drift", [False, True])
def test_featurized_recovers_a_featurized_process(drift: bool) -> None:
    """Noiseless runs from known featurized effects: the fit reproduces held-out rollouts, and
    the effects of every pool example, consumed or not."""
    runs, truth = featurized_runset(reserved=10, drift=drift)
    train, held = runs.split(2)
    sim = make_simulator("featurized", n_components=3, l2=1e-8, time_varying=drift).fit(train)
    np.testing.assert_allclose(sim.A_, truth["A"], atol=1e-6)
    np.testing.assert_allclose(sim.B_, truth["B"], atol=1e-6)
    if drift:
        np.testing.assert_allclose(sim.A_slope_, truth["A1"], atol=1e-6)
    else:
        assert sim.A_slope_ is None and sim.B_slope_ is None
    initial = np.stack([r.initial_loss for r in held.runs])
    predicted = sim.simulate_many([r.curriculum for r in held.runs], initial)
    for run, traj in zip(held.runs, predicted, strict=True):
        np.testing.assert_allclose(traj[1:], run.losses[1:], atol=1e-5)


def test_featurized_and_hybrid_beat_linear_on_examples_no_training_run_consumed() -> None:
    runs, _ = featurized_runset(reserved=15, runs=16)
    result = evaluate(
        runs,
        {
            "linear": make_simulator("linear", unseen="prior"),
            "featurized": make_simulator("featurized", n_components=3, time_varying=False),
            "hybrid": make_simulator("hybrid", n_components=3, time_varying=False),
        },
        2,
    )
    assert result.unseen_fraction > 0.1
    mse = {name: m.scores["all_steps_mse"] for name, m in result.methods.items()}
    assert mse["featurized"] < 0.01 * mse["linear"]
    assert mse["hybrid"] < 0.1 * mse["linear"]
    split = result.to_json()["by_unseen_share"]["featurized"]
    assert sum(b["runs"] for b in split.values()) == 2


def test_hybrid_spans_featurized_to_linear() -> None:
    """A huge pull reproduces the featurized effects; for examples no run consumed the hybrid
    always keeps them (nothing pulls them away)."""
    runs, _ = featurized_runset(reserved=10, runs=14, seed=3)
    train, _ = runs.split(2)
    feat = make_simulator("featurized", n_components=2, l2=1.0).fit(train)
    strong = make_simulator("hybrid", n_components=2, feature_l2=1.0, l2=1e9).fit(train)
    np.testing.assert_allclose(strong.A_, feat.A_, atol=1e-6)
    np.testing.assert_allclose(strong.B_slope_, feat.B_slope_)
    weak = make_simulator("hybrid", n_components=2, feature_l2=1.0, l2=1e-3).fit(train)
    unseen = np.arange(50, 60)
    np.testing.assert_allclose(weak.A_[:, unseen], feat.A_[:, unseen], atol=1e-9)
    assert np.abs(weak.A_[:, :50] - feat.A_[:, :50]).max() > 1e-4


def test_hybrid_composes_the_ridge_regression_instead_of_inheriting_it() -> None:
    """No diamond: the hybrid is a featurized simulator (one `DynamicsSimulator` in its MRO)
    and not a `LinearSimulator`, whose ridge regression it is given its prior as an argument;
    fitting it leaves no temporary attribute behind, and the fold's priors reach the CV."""
    from simfluence.simulators.dynamics import DynamicsSimulator
    from simfluence.simulators.featurized import FeaturePrior, HybridSimulator
    from simfluence.simulators.featurized.effects import _FeatureEffects
    from simfluence.simulators.linear import LinearSimulator, RidgeOffset, _RidgeSimulator

    mro = HybridSimulator.__mro__
    assert mro.count(DynamicsSimulator) == 1
    assert issubclass(HybridSimulator, _FeatureEffects)
    assert not issubclass(HybridSimulator, LinearSimulator | _RidgeSimulator)
    runs, _ = featurized_runset(runs=8, seed=4)
    sim = HybridSimulator(n_components=2, feature_l2=1.0, l2_grid=(10.0, 1.0)).fit(runs)
    assert not {"_phi", "_slopes"} & set(vars(sim))
    assert all(k.endswith("_") or not k.startswith("_") for k in vars(sim))
    assert [row[0] for row in sim.cv_mse_] == [10.0, 1.0] and sim.l2_ in (10.0, 1.0)
    offset = FeaturePrior(sim, sim.features_).offset(sim.design(runs), final=True)
    assert isinstance(offset, RidgeOffset) and offset.slopes is not None
    np.testing.assert_array_equal(offset.slopes[1], sim.B_slope_)


def test_synthetic_features_help_only_with_per_example_detail() -> None:
    """The synthetic set's features reveal classes, not the mislabeled spikes: `hybrid` is as
    good as `linear`, and both beat `featurized` (which beats nothing per-example)."""
    runs, _ = generate(SynthConfig(pool=120, tests=20, runs=16, per_run=80))
    result = evaluate(
        runs,
        {name: make_simulator(name, unseen="prior") for name in ("linear", "hybrid", "featurized")},
        3,
    )
    mse = {name: m.scores["all_steps_mse"] for name, m in result.methods.items()}
    assert mse["hybrid"] <= 1.1 * mse["linear"]
    assert mse["featurized"] > mse["hybrid"]


def test_save_load_and_extend(tmp_path) -> None:
    runs, _ = featurized_runset(drift=True)
    train, held = runs.split(2)
    for method in ("featurized", "hybrid"):
        sim = make_simulator(method, n_components=3).fit(train)
        sim.save(tmp_path / f"{method}.npz")
        loaded = load_simulator(tmp_path / f"{method}.npz")
        run = held.runs[0]
        np.testing.assert_array_equal(
            loaded.simulate(run.curriculum, run.initial_loss),
            sim.simulate(run.curriculum, run.initial_loss),
        )
        # a new training example with x3's features acts like x3 where x3 has no own detail
        x3 = runs.features.train[3:4]
        grown = loaded.extend(["new"], x3, ["new-test"], runs.features.test[:1], [1.5])
        assert grown.A_.shape == (7, 61) and grown.A_slope_.shape == (7, 61)
        assert grown.test_ids_[-1] == "new-test" and grown.initial_loss_[-1] == 1.5
        if method == "featurized":
            np.testing.assert_allclose(grown.A_[:6, -1], sim.A_[:, 3])
            np.testing.assert_allclose(grown.B_slope_[:6, -1], sim.B_slope_[:, 3])
        curriculum = [["new", "x1"], ["x3", "x4"]]
        traj = grown.simulate(curriculum, np.r_[run.initial_loss, 1.5])
        assert traj.shape == (3, 7) and np.isfinite(traj).all()
        with pytest.raises(Exception, match="already known"):
            grown.extend(["x1"], x3)
        with pytest.raises(Exception, match=r"shape \(1, 2\), expected \(1, 3\)"):
            grown.extend(["other"], np.ones((1, 2)))


def test_test_map_predicts_coefficients_from_test_features() -> None:
    rng = np.random.default_rng(0)
    psi = np.hstack([np.ones((40, 1)), rng.standard_normal((40, 3))])
    true_map = rng.standard_normal((4, 5))
    coef = psi @ true_map + 0.01 * rng.standard_normal((40, 5))
    W, _, loo = fit_test_map(psi, coef, np.ones(5))
    np.testing.assert_allclose(W, true_map, atol=0.02)
    assert loo < 0.01
    _, _, noise_loo = fit_test_map(psi, rng.standard_normal((40, 5)), np.ones(5))
    assert noise_loo > 0.9  # features that explain nothing are not trusted


# -- time-varying effects everywhere a dynamics simulator is used --------------------------------
def _drifting_simulator():
    runs, _ = featurized_runset(drift=True)
    return make_simulator("featurized", n_components=3).fit(runs), runs


def test_time_varying_rollout_matches_a_loop() -> None:
    sim, runs = _drifting_simulator()
    run = runs.runs[0]
    index = {t: k for k, t in enumerate(sim.train_ids_)}
    loss = run.initial_loss.copy()
    tau = step_times(len(run.curriculum), sim.time_scale_)
    for t, batch in enumerate(run.curriculum):
        cols = [index[i] for i in batch]
        A = (sim.A_ + tau[t] * sim.A_slope_)[:, cols].sum(axis=1)
        B = (sim.B_ + tau[t] * sim.B_slope_)[:, cols].sum(axis=1)
        loss = A * loss + B
    np.testing.assert_allclose(sim.simulate(run.curriculum, run.initial_loss)[-1], loss)
    assert time_augmented(sparse.csr_matrix(np.ones((3, 2))), 2.0).toarray().tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0.5, 0.5],
        [1, 1, 1, 1],
    ]


def test_time_varying_effects_in_attribution_and_search() -> None:
    sim, runs = _drifting_simulator()
    run = runs.runs[0]
    steps = step_contributions(sim, run.curriculum, run.initial_loss, sim.test_ids_)
    per_step = np.array([sum(c.values()) for c in steps.contributions])
    np.testing.assert_allclose(per_step, steps.change, atol=1e-12)
    columns = np.arange(len(sim.test_ids_))
    evaluator = _Evaluator(sim, columns, run.initial_loss, 4)
    layout = np.array([[[sim.train_ids_.index(i) for b in run.curriculum[:6] for i in b]] * 2])
    curriculum = evaluator.curriculum(layout[0])
    expected = sim.simulate(curriculum, run.initial_loss)[-1].mean()
    np.testing.assert_allclose(evaluator(layout), [expected])
    result = optimize_curriculum(sim, 12, 4, 1, seed=0, max_seconds=2, max_evaluations=2000)
    assert np.isfinite(result.objective)


def test_ridge_prior_prediction_generalizes_no_effect() -> None:
    runs, _ = featurized_runset()
    design = Design.from_runs(runs, 4.0, "mean")
    default = LinearRidgeProblem(design, 0.25).solve(3.0)
    prediction = 0.25 * np.asarray(design.counts.sum(axis=1)) * design.prev
    given = LinearRidgeProblem(design, 0.25, prior_prediction=prediction).solve(3.0)
    np.testing.assert_allclose(given.delta_A, default.delta_A)
    np.testing.assert_array_equal(design.step[:3], [0, 1, 2])


# -- intervals, the floor and the safe search (issue 9) ---------------------------------------
@pytest.fixture(scope="module")
def noisy() -> tuple:
    """A featurized process with drift and process noise, 30 runs (6 held out); the last 10
    pool examples are drawn only by the last two (held-out) runs."""
    runs, _ = featurized_runset(
        pool=60, tests=8, runs=30, per_run=24, drift=True, noise=0.01, reserved=10
    )
    train, held = runs.split(6)
    fitted = {m: make_simulator(m, unseen="prior").fit(train).calibrate(train) for m in METHODS}
    return runs, train, held, fitted


METHODS = ("featurized", "hybrid")


def _extrapolating(sim):  # type: ignore[no-untyped-def]
    """A copy whose effects drive every loss far below 0 (what a search can find)."""
    sim = copy.copy(sim)
    sim.B_ = sim.B_ - 0.3 / sim.batch_size_
    return sim


@pytest.mark.parametrize("method", METHODS)
def test_featurized_intervals_are_calibrated_and_pinned(noisy: tuple, method: str) -> None:
    _, train, held, fitted = noisy
    sim = fitted[method]
    # the fold copies keep what cross-validation chose: no nested cross-validation
    params = sim._calibration_params()
    assert params["n_components"] == sim.n_components_
    assert params["l2"] == sim.l2_
    if method == "hybrid":
        assert params["feature_l2"] == sim.feature_l2_
    assert sim.fold_B_slope_.shape == (5, *sim.B_slope_.shape)
    folds = sim.fold_simulators()
    assert len(folds) == 5 and not np.array_equal(folds[0].B_slope_, sim.B_slope_)
    bands = sim.simulate_interval(
        [r.curriculum for r in held.runs], np.stack([r.initial_loss for r in held.runs])
    )
    true = [r.losses for r in held.runs]
    coverage = interval_coverage(true, [b.lower for b in bands], [b.upper for b in bands])
    assert 0.75 <= coverage <= 0.98
    # informative: narrower than the curriculum-blind mean's calibrated interval
    blind = make_simulator("mean").fit(train).calibrate(train)
    blind_bands = [
        blind.interval_of(t)
        for t in blind.simulate_many(
            [r.curriculum for r in held.runs], np.stack([r.initial_loss for r in held.runs])
        )
    ]
    assert interval_width([b.lower for b in bands], [b.upper for b in bands]) < 0.8 * (
        interval_width([b.lower for b in blind_bands], [b.upper for b in blind_bands])
    )
    # a copy: `evaluate` refits what it is given, and the fixture is shared by the module
    result = evaluate(train.subset(train.run_ids), {method: copy.deepcopy(sim)}, 6)
    assert 0.6 <= result.methods[method].scores["coverage_90"] <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_featurized_outputs_respect_the_floor(noisy: tuple, method: str) -> None:
    _, _, held, fitted = noisy
    sim = _extrapolating(fitted[method])
    curricula = [r.curriculum for r in held.runs]
    initial = np.stack([r.initial_loss for r in held.runs])
    floor = np.asarray(sim.floor_)
    for traj in sim.simulate_many(curricula, initial):  # rollouts
        assert (traj[1:] >= floor - 1e-12).all()
    raw = sim.rollout_encoded(sim.encode(curricula[:1]), initial[:1])[0]
    assert (raw[-1] < floor).any()  # without the floor these would be reported below it
    for band in sim.simulate_interval(curricula, initial):  # intervals
        assert (band.lower[1:] >= floor - 1e-12).all()
    for traj in trust_region_rollouts(sim, curricula):  # trust-region rollouts
        rows = np.minimum(np.arange(1, traj.shape[0]), len(sim.envelope_) - 1)
        assert (traj[1:] >= np.maximum(floor, sim.envelope_[rows]) - 1e-12).all()
    # attribution views (leave-one-out finals and the per-step trajectory), with intervals
    loo = leave_one_out(sim, curricula[0], None, ["z0", "z1"])
    assert loo.final_loss >= floor[:2].mean() - 1e-12 and loo.lower is not None
    steps = step_contributions(sim, curricula[0], None, ["z0", "z1"])
    assert (steps.trajectory >= floor[:2].mean() - 1e-12).all()
    # the search's vectorized evaluator is the floored, drifting rollout, exactly
    columns = np.arange(len(sim.test_ids_))
    evaluator = _Evaluator(sim, columns, sim.initial_loss_, 4)
    layouts = _random_layouts(np.arange(50), 12, 2, 3, np.random.default_rng(0))
    for layout, value in zip(layouts, evaluator(layouts), strict=True):
        traj = sim.simulate(evaluator.curriculum(layout), sim.initial_loss_)
        assert value == pytest.approx(traj[-1].mean(), abs=1e-12)
    # and the safe search: never below the floor nor the recorded envelope, with an interval
    result = optimize_curriculum(sim, 12, 4, 2, seed=0, n_random=8, max_seconds=5)
    assert result.predicted >= sim.envelope_[len(result.curriculum)].mean() - 1e-12
    assert result.unconstrained >= floor.mean() - 1e-12
    assert result.interval is not None and result.interval[0] >= floor.mean() - 1e-12
    inside = trust_region_rollouts(sim, [result.curriculum])[0]
    assert inside[-1].mean() == pytest.approx(result.predicted, abs=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_safe_search_keeps_to_consumed_examples(noisy: tuple, method: str) -> None:
    runs, train, _, fitted = noisy
    sim = fitted[method]
    reserved = set(runs.train_ids[-10:])  # drawn by no training run
    assert sim.seen_.all() and not sim.consumed_[-10:].any() and sim.consumed_[:50].all()
    result = optimize_curriculum(sim, 12, 4, 2, seed=0, max_seconds=5, recorded=train)
    assert not reserved & {i for b in result.curriculum for i in b}
    assert result.interval is not None and result.statement
    wide = optimize_curriculum(sim, 60, 4, 1, seed=0, max_seconds=2, include_unseen=True)
    assert reserved <= {i for b in wide.curriculum for i in b}


@pytest.mark.parametrize("variant", ["as-fitted", "binding-floor", "informative-map"])
@pytest.mark.parametrize("method", METHODS)
def test_new_test_scale_is_that_of_recorded_tests_simulated_as_if_never_recorded(
    noisy: tuple, method: str, variant: str
) -> None:
    """``new_test_scale_`` by its documented rule, through the simulator's public rollouts:
    in each calibration fold, every recorded test example takes the coefficients its fold
    copy's test map predicts from the *other* test examples; the fold's held-out runs are
    simulated with them (`simulate`: drift and floor as reported) and the per-step scale of
    the residuals (`intervals.scales`) is the median over test examples.

    Variants: as fitted (here the test features do not predict the coefficients, so the map
    uses no direction: every test example gets the others' average); a floor that binds
    (each test example's median recorded loss); a map that uses two feature directions with
    ridge strength 1 (its weights, directions and strength then matter)."""
    from simfluence.simulators.featurized import (
        leave_one_out_coefficients,
        map_directions,
        ridge_map,
    )
    from simfluence.simulators.intervals import residual_table, run_folds, scales

    _, train, _, fitted = noisy
    sim = fitted[method]
    J = sim.coef_A_.shape[1]
    if variant != "as-fitted":
        sim = copy.copy(sim)
        if variant == "binding-floor":
            sim.floor_ = np.median(np.concatenate([r.losses for r in train.runs]), axis=0)
        else:
            coef = np.hstack([sim.coef_A_, sim.coef_B_])
            sim.test_map_ = ridge_map(sim.test_features_, coef, sim._test_map_weights(), 2, 1.0)
            sim.test_map_l2_ = 1.0
            assert map_directions(sim.test_map_) == 2
        sim.new_test_scale_ = sim._new_test_scale(train, 5)
        assert not np.allclose(sim.new_test_scale_, fitted[method].new_test_scale_)
    folds = run_folds(train, 5)
    true, simulated = [], []
    for k, (_, held) in enumerate(folds):
        coef = leave_one_out_coefficients(
            sim.test_features_,
            np.hstack([sim.fold_coef_A_[k], sim.fold_coef_B_[k]]),
            sim._test_map_weights(),
            map_directions(sim.test_map_),
            sim.test_map_l2_,
        )
        as_new = copy.copy(sim)
        as_new._set_effects(sim._effects(coef[:, :J], coef[:, J:], sim.features_))
        assert as_new.B_slope_ is not None  # the drift is part of what is simulated
        for run in held.runs:
            simulated.append(as_new.simulate(run.curriculum, run.initial_loss))
            true.append(run.losses)
    expected = np.median(scales(residual_table(true, simulated)), axis=1)
    np.testing.assert_allclose(sim.new_test_scale_, expected, rtol=1e-10, atol=1e-12)
    if variant == "as-fitted":
        own = np.median(sim.calibration_scale_, axis=1)  # as if never recorded: less is known
        assert (sim.new_test_scale_[1:] > own[1:]).mean() > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_save_load_and_extend_with_intervals(noisy: tuple, method: str, tmp_path) -> None:
    runs, _, held, fitted = noisy
    sim = fitted[method]
    sim.save(tmp_path / "m.npz")
    loaded = load_simulator(tmp_path / "m.npz")
    run = held.runs[0]
    a = sim.simulate_interval([run.curriculum], run.initial_loss)[0]
    b = loaded.simulate_interval([run.curriculum], run.initial_loss)[0]
    np.testing.assert_array_equal(a.lower, b.lower)
    np.testing.assert_array_equal(a.upper, b.upper)
    np.testing.assert_array_equal(
        leave_one_out(sim, run.curriculum, None, "z1").upper,
        leave_one_out(loaded, run.curriculum, None, "z1").upper,
    )
    # grown by a training example with x3's features and a test example with z0's
    grown = loaded.extend(["new"], runs.features.train[3:4], ["nt"], runs.features.test[:1], [1.5])
    M, P = len(sim.test_ids_) + 1, len(sim.train_ids_) + 1
    assert grown.fold_A_.shape == grown.fold_B_slope_.shape == (5, M, P)
    assert grown.calibration_residuals_.shape[2] == M == grown.envelope_.shape[1]
    assert grown.floor_.shape == grown.floor_width_.shape == (M,) and not grown.consumed_[-1]
    if method == "featurized":  # the fold copies, too, give it x3's effects
        np.testing.assert_allclose(grown.fold_B_[:, :-1, -1], sim.fold_B_[:, :, 3], atol=1e-6)
    curriculum = [["new", "x1", "x2", "x3"], ["x3", "x4", "x5", "x6"]]
    band = grown.simulate_interval([curriculum], np.r_[run.initial_loss, 1.5])[0]
    assert np.isfinite(band.upper).all() and (band.width[1:, -1] > 0).all()
    # its scale: recorded test examples simulated as if never recorded, wider than their own
    np.testing.assert_array_equal(grown.calibration_scale_[:, -1], sim.new_test_scale_)
    assert (sim.new_test_scale_[1:] > np.median(sim.calibration_scale_[1:], axis=1)).mean() > 0.5
    loo = leave_one_out(grown, curriculum, None, "nt")
    assert "new" in loo.train_ids and (loo.lower <= loo.effects).all()
    # no residuals were recorded for "nt": the interval of a mean over it is unbounded
    assert grown.objective_interval(band.lower, np.array([M - 1]))[1] == np.inf


# -- the command line -------------------------------------------------------------------------
def test_cli_fit_simulate_new_examples(tmp_path, capsys) -> None:
    runs, _ = featurized_runset()
    save_runset(runs, tmp_path / "set")
    model = str(tmp_path / "h.npz")
    assert main(["fit", str(tmp_path / "set"), "--method", "hybrid", "-o", model]) == 0
    np.savez(tmp_path / "new.npz", ids=np.array(["n1", "nt"]), vectors=np.ones((2, 3)))
    (tmp_path / "c.json").write_text(json.dumps([["n1", "x2"], ["x5", "n1"]]))
    init = {t: 1.0 for t in runs.test_ids} | {"nt": 2.0}
    (tmp_path / "init.json").write_text(json.dumps(init))
    out = tmp_path / "p.json"
    args = ["simulate", model, "--curriculum", str(tmp_path / "c.json"), "-o", str(out)]
    assert main(args) == 2
    assert "unknown training id 'n1'" in capsys.readouterr().err
    args += ["--features", str(tmp_path / "new.npz"), "--initial-loss", str(tmp_path / "init.json")]
    assert main(args) == 0
    assert "added 1 new training and 1 new test examples" in capsys.readouterr().out
    predicted = json.loads(out.read_text())
    assert predicted["test_ids"][-1] == "nt" and predicted["loss"][0][-1] == 2.0


def test_cli_attribute_optimize_report_with_featurized_models(tmp_path, capsys) -> None:
    runs, _ = featurized_runset(reserved=10)
    save_runset(runs, tmp_path / "set")
    model = str(tmp_path / "f.npz")
    assert main(["fit", str(tmp_path / "set"), "--method", "featurized", "-o", model]) == 0
    printed = capsys.readouterr().out
    assert "feature directions" in printed and "calibrated predictive intervals" in printed
    np.savez(tmp_path / "new.npz", ids=np.array(["n1"]), vectors=np.full((1, 3), 2.0))
    (tmp_path / "c.json").write_text(json.dumps([["n1", "x2"], ["x5", "x55"]] * 3))
    json_out = tmp_path / "a.json"
    args = ["attribute", model, "--test", "z0", "--curriculum", str(tmp_path / "c.json")]
    args += ["--features", str(tmp_path / "new.npz"), "--json", str(json_out)]
    assert main(args) == 0
    effects = {
        e["train_id"]: e for e in json.loads(json_out.read_text())["leave_one_out"]["effects"]
    }
    assert {"n1", "x55"} <= set(effects)  # a new example and one no run consumed
    assert {"lower", "upper", "interval_includes_zero"} <= set(effects["n1"])  # with intervals
    best, figures = tmp_path / "best.json", tmp_path / "search.json"
    args = ["optimize", model, "--size", "12", "--max-seconds", "2", "-o", str(best)]
    args += ["--runs", str(tmp_path / "set"), "--json", str(figures)]
    assert main(args) == 0
    assert "interval" in capsys.readouterr().out
    assert len(json.loads(best.read_text())) == 3
    search = json.loads(figures.read_text())
    assert search["interval"][0] <= search["predicted"] <= search["interval"][1]
    html = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "set"), "--methods", "hybrid,mean", "-o", str(html)]) == 0
    assert "hybrid" in html.read_text()


@pytest.mark.parametrize("method", ["featurized", "hybrid"])
def test_zero_weight_removal_with_drifting_effects_makes_the_consumptions_neutral(
    method: str,
) -> None:
    """Issue 11's zero-weight removal moves the consumptions to a neutral column; with effects
    that drift over training the neutral column must not drift either."""
    from simfluence.counterfactual.attribution import removal_effects

    runs, _ = featurized_runset(drift=True, noise=0.01)
    sim = make_simulator(method).fit(runs)
    assert sim.B_slope_ is not None
    run = runs.runs[0]
    target = run.curriculum[1][2]
    columns = np.arange(len(runs.test_ids))
    effect = removal_effects(
        sim, run.curriculum, run.initial_loss, columns, [[target]], "zero-weight"
    )
    neutral = copy.deepcopy(sim)
    k = runs.train_ids.index(target)
    neutral.A_ = sim.A_.copy()
    neutral.A_[:, k] = 1.0 / sim.batch_size_
    neutral.B_ = sim.B_.copy()
    neutral.B_[:, k] = 0.0
    neutral.B_slope_ = sim.B_slope_.copy()
    neutral.B_slope_[:, k] = 0.0
    if sim.A_slope_ is not None:
        neutral.A_slope_ = sim.A_slope_.copy()
        neutral.A_slope_[:, k] = 0.0
    with_it = sim.simulate(run.curriculum, run.initial_loss)[-1]
    without = neutral.simulate(run.curriculum, run.initial_loss)[-1]
    np.testing.assert_allclose(effect[0], with_it - without, atol=1e-9)


# -- growing a fitted simulator (extend) --------------------------------------------------------
def _calibrated(drift: bool = True, test_dim: int | None = None):  # type: ignore[no-untyped-def]
    """A small calibrated featurized simulator (k and l2 given: no cross-validation), fitted
    in the test that calls it (mutation testing attributes the code to that test)."""
    runs, _ = featurized_runset(pool=20, tests=4, runs=8, per_run=12, drift=drift, noise=0.01)
    if test_dim is not None:  # test features of their own kind (another dimension)
        rng = np.random.default_rng(5)
        runs.features = ExampleFeatures(runs.features.train, rng.standard_normal((4, test_dim)))
    sim = make_simulator("featurized", n_components=3, l2=1e-3, time_varying=drift)
    return sim.fit(runs).calibrate(runs, 3), runs


_GROWN = (
    "A_", "B_", "A_slope_", "B_slope_", "coef_A_", "coef_B_", "features_", "test_features_",
    "fold_A_", "fold_B_", "fold_A_slope_", "fold_B_slope_", "fold_coef_A_", "fold_coef_B_",
    "floor_", "floor_width_", "envelope_", "initial_loss_", "calibration_scale_",
    "calibration_residuals_", "consumed_",
)  # fmt: skip


def test_extend_in_steps_equals_extend_at_once_and_keeps_what_was_there() -> None:
    """New test examples, then a new training example, then another test example: the same
    simulator as one `extend` with all of them, and the recorded part left exactly as it was
    (effects, drifts, the fold copies' effects, floors, envelope, intervals)."""
    sim, runs = _calibrated()
    M, P = sim.A_.shape
    x, y = runs.features.train[3:4], runs.features.test[[0, 2]]
    once = sim.extend(["n"], x, ["t1", "t2"], y, [1.5, -0.5])
    steps = (
        sim.extend(test_ids=["t1"], test_features=y[:1], test_initial_loss=[1.5])
        .extend(["n"], x)
        .extend(test_ids=["t2"], test_features=y[1:], test_initial_loss=[-0.5])
    )
    for name in _GROWN:
        np.testing.assert_allclose(getattr(steps, name), getattr(once, name), err_msg=name)
    assert once.train_ids_ == steps.train_ids_ and once.test_ids_ == steps.test_ids_
    for name in ("A_", "B_", "A_slope_", "B_slope_"):
        np.testing.assert_array_equal(getattr(once, name)[:M, :P], getattr(sim, name))
        folds = getattr(once, f"fold_{name}")
        np.testing.assert_array_equal(folds[:, :M, :P], getattr(sim, f"fold_{name}"))
        assert folds.dtype == np.float32  # stored as `calibrate` stores them
    # the new training example has x3's features: x3's featurized effects, in every fold copy
    np.testing.assert_allclose(once.A_slope_[:M, -1], sim.A_slope_[:, 3])
    np.testing.assert_allclose(once.fold_A_[:, :M, -1], sim.fold_A_[:, :, 3], rtol=1e-6)
    # a new test example with z0's features gets the coefficients the test map predicts for z0
    predicted = sim.test_features_[0] @ sim.test_map_  # [coef_A, coef_B] of z0, from features
    J = sim.coef_A_.shape[1]
    np.testing.assert_allclose(once.coef_A_[M], predicted[:J])
    np.testing.assert_allclose(once.coef_B_[M], predicted[J:])
    # floors at min(0, initial), no envelope, intervals with the typical scale and no residuals
    np.testing.assert_array_equal(once.floor_, np.r_[sim.floor_, 0.0, -0.5])
    np.testing.assert_array_equal(once.floor_width_[:M], sim.floor_width_)
    assert (once.envelope_[:, M:] == -np.inf).all()
    assert np.isnan(once.calibration_residuals_[:, :, M:]).all()
    assert once.calibration_residuals_.dtype == np.float32
    np.testing.assert_array_equal(once.calibration_scale_[:, M], sim.new_test_scale_)


def test_new_test_examples_get_the_typical_bend_of_the_floor() -> None:
    """Worked by hand: the bend of a new test example's floor is the median over recorded test
    examples of width / (initial loss - floor) (0 where there is no room), times its own room;
    a simulator file from before the envelope and the new-example scale existed still grows
    (no envelope; the median scale of the recorded test examples)."""
    sim, runs = _calibrated(drift=False)
    old = copy.copy(sim)
    old.floor_ = np.array([-1.0, 0.0, 0.0, -0.5])
    old.initial_loss_ = np.array([1.0, 0.0, 0.5, 0.3])  # rooms 2, 0, 0.5, 0.8
    old.floor_width_ = np.array([0.2, 0.0, 0.02, 0.04])  # ratios 0.1, 0, 0.04, 0.05
    del old.envelope_, old.new_test_scale_
    with warnings.catch_warnings():  # no division by a zero room, no uninitialized output
        warnings.simplefilter("error")
        grown = old.extend(
            test_ids=["a", "b"], test_features=runs.features.test[:2], test_initial_loss=[1.5, -0.5]
        )
    ratio = (0.04 + 0.05) / 2
    np.testing.assert_allclose(grown.floor_, [-1.0, 0.0, 0.0, -0.5, 0.0, -0.5])
    np.testing.assert_allclose(grown.floor_width_, [0.2, 0.0, 0.02, 0.04, ratio * 1.5, 0.0])
    assert not hasattr(grown, "envelope_")
    typical = np.median(sim.calibration_scale_, axis=1)
    np.testing.assert_array_equal(grown.calibration_scale_[:, 4:], np.c_[typical, typical])
    band = grown.simulate_interval([[["x1", "x2"]]], np.r_[old.initial_loss_, 1.5, -0.5])[0]
    assert (band.lower[1:, 4:] >= grown.floor_[4:] - 1e-12).all()


def test_extend_a_static_calibrated_simulator() -> None:
    """Without drift there are no slopes to extend, in the model or in its fold copies."""
    sim, runs = _calibrated(drift=False)
    M = len(sim.test_ids_)
    grown = sim.extend(["n"], runs.features.train[3:4], ["t"], runs.features.test[:1], [1.0])
    assert grown.A_slope_ is None and grown.B_slope_ is None
    assert not hasattr(grown, "fold_B_slope_")
    np.testing.assert_allclose(grown.A_[:M, -1], sim.A_[:, 3])
    np.testing.assert_allclose(grown.fold_A_[:, :M, -1], sim.fold_A_[:, :, 3], rtol=1e-6)
    np.testing.assert_allclose(grown.fold_B_[:, :M, -1], sim.fold_B_[:, :, 3], rtol=1e-6)
    np.testing.assert_array_equal(grown.fold_B_[:, :M, :-1], sim.fold_B_)


def test_extend_errors_name_the_side_and_the_argument() -> None:
    sim, runs = _calibrated(drift=False)
    x, y = runs.features.train[:2], runs.features.test[:1]
    with pytest.raises(SimfluenceError, match="training id 'n' is given twice"):
        sim.extend(["n", "n"], x)
    with pytest.raises(SimfluenceError, match="training id 'x1' is already known"):
        sim.extend(["x1"], x[:1])
    with pytest.raises(SimfluenceError, match="test id 'z0' is already known"):
        sim.extend(test_ids=["z0"], test_features=y, test_initial_loss=[1.0])
    with pytest.raises(SimfluenceError, match=r"train_features: shape \(2, 3\), expected \(1, 3"):
        sim.extend(["n"], x)
    with pytest.raises(SimfluenceError, match=r"test_features: shape \(1, 2\), expected \(1, 3"):
        sim.extend(test_ids=["t"], test_features=y[:, :2], test_initial_loss=[1.0])
    with pytest.raises(SimfluenceError, match="test_initial_loss: required for the 1 new ids"):
        sim.extend(test_ids=["t"], test_features=y)


def test_extend_projects_new_test_examples_with_the_test_features_own_basis() -> None:
    """Test features of another dimension than the training features have their own basis: a
    new test example with z1's vector is projected like z1 and gets z1's predicted effects."""
    sim, runs = _calibrated(drift=False, test_dim=2)
    assert sim.test_basis_mean_ is not None and sim.test_features_.shape[1] == 3
    grown = sim.extend(test_ids=["t"], test_features=runs.features.test[1:2], test_initial_loss=[1])
    np.testing.assert_allclose(grown.test_features_[-1], sim.test_features_[1], atol=1e-12)
    J = sim.coef_A_.shape[1]
    predicted = sim.test_features_[1] @ sim.test_map_
    np.testing.assert_allclose(grown.coef_B_[-1], predicted[J:], atol=1e-12)
    np.testing.assert_allclose(grown.B_[-1], predicted[J:] @ sim.features_.T, atol=1e-12)


# -- the feature basis and the normal equations at their edges -----------------------------------
def test_basis_drops_directions_below_its_numerical_threshold() -> None:
    """A direction whose singular value is under 1e-10 of the largest is rounding noise, not a
    feature: two columns equal up to 2e-11 give one direction, up to 1e-6 two."""
    from simfluence.simulators.featurized import Basis

    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    for eps, kept in ((2e-11, 1), (1e-6, 2)):
        X = np.column_stack([x, x + eps * rng.normal(size=50)])
        assert Basis.fit(X, 2).components.shape == (2, kept), eps


def test_basis_treats_a_negligible_spread_as_constant() -> None:
    """A feature whose spread is at most 1e-12 of the largest (here exactly) is not blown up
    to unit variance: its scale is left at 1; a basis of no rows keeps no direction."""
    from simfluence.simulators.featurized import Basis

    basis = Basis.fit(np.array([[0.0, 0.0], [2.0, 2e-12]]), 2)
    np.testing.assert_array_equal(basis.scale, [1.0, 1.0])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        empty = Basis.fit(np.empty((0, 3)), 2)
    assert empty.components.shape == (3, 0)


def test_normal_equations_count_the_neutral_rest_of_a_scaled_kernel() -> None:
    """Under an lr-scaled memory kernel each step's "no effect" prediction includes the neutral
    rest: ``r = L_next - a (sum_i N_ti + rest_t) L_prev`` (dense, row by row)."""
    from simfluence.simulators.featurized import NormalEquations

    rng = np.random.default_rng(4)
    n, P, M, J, a = 5, 3, 2, 2, 0.5
    counts = sparse.csr_matrix(rng.uniform(0.0, 1.0, size=(n, P)))
    prev, nxt = rng.uniform(0.5, 2.0, size=(n, M)), rng.uniform(0.5, 2.0, size=(n, M))
    F, rest = rng.normal(size=(n, J)), rng.uniform(0.1, 1.0, size=n)
    design = Design(counts, prev, nxt)
    design.rest = rest
    equations = NormalEquations.of(design, F, a)
    mass = np.asarray(counts.sum(axis=1)).ravel() + rest
    rhs = np.zeros((M, 2 * J))
    for i in range(n):
        for m in range(M):
            rhs[m] += np.concatenate([prev[i, m] * F[i], F[i]]) * (
                nxt[i, m] - a * mass[i] * prev[i, m]
            )
    np.testing.assert_allclose(equations.rhs, rhs, rtol=1e-12)


def test_two_fold_calibration_keeps_the_fold_copies_and_extend_grows_them() -> None:
    """Two folds are enough: the fold copies' coefficients are kept (so `new_test_scale_` is
    measured), and `extend` grows every fold copy's effects and drifts with the new training
    examples (``A'`` = the fold's drift coefficients on their projected features), and the
    trust-region envelope with an unbounded column per new test example."""
    runs, _ = featurized_runset(
        pool=10, tests=3, runs=4, per_run=8, batch=2, drift=True, noise=0.01
    )
    sim = make_simulator("featurized", n_components=2, l2=1e-3, time_varying=True).fit(runs)
    sim.calibrate(runs, 2)
    assert sim.fold_coef_A_.shape == (2, 3, 6) and sim.new_test_scale_ is not None
    x = np.random.default_rng(1).standard_normal((2, 3))
    grown = sim.extend(["new0", "new1"], x, ["t-new"], np.zeros((1, 3)), [1.0])
    phi = sim._train_basis()(x)
    for name, coef in (("A", sim.fold_coef_A_), ("B", sim.fold_coef_B_)):
        slopes = getattr(grown, f"fold_{name}_slope_")
        assert slopes.shape == (2, 4, 12), name
        for k in range(2):
            np.testing.assert_allclose(slopes[k, :3, 10:], coef[k][:, 3:] @ phi.T, rtol=1e-5)
    assert grown.envelope_.shape == (sim.envelope_.shape[0], 4)
    np.testing.assert_array_equal(grown.envelope_[:, :3], sim.envelope_)
    assert (grown.envelope_[:, 3] == -np.inf).all()
    # new_test_scale_ by its rule, through the public rollouts: each fold's held-out runs
    # simulated with every test example's coefficients predicted by the fold copy's map from
    # the other test examples (a map using two directions; a floor that binds from step 1)
    from simfluence.simulators.featurized import leave_one_out_coefficients, ridge_map
    from simfluence.simulators.intervals import residual_table, run_folds, scales

    sim = copy.copy(sim)
    weights, J = sim._test_map_weights(), sim.coef_A_.shape[1]
    sim.test_map_ = ridge_map(
        sim.test_features_, np.hstack([sim.coef_A_, sim.coef_B_]), weights, 2, 1.0
    )
    sim.test_map_l2_ = 1.0
    sim.floor_ = np.median(np.concatenate([r.losses[1:2] for r in runs.runs]), axis=0)
    true, simulated = [], []
    for k, (_, held) in enumerate(run_folds(runs, 2)):
        fold = np.hstack([sim.fold_coef_A_[k], sim.fold_coef_B_[k]])
        coef = leave_one_out_coefficients(sim.test_features_, fold, weights, 2, 1.0)
        as_new = copy.copy(sim)
        as_new._set_effects(sim._effects(coef[:, :J], coef[:, J:], sim.features_))
        for run in held.runs:
            simulated.append(as_new.simulate(run.curriculum, run.initial_loss))
            true.append(run.losses)
    expected = np.median(scales(residual_table(true, simulated)), axis=1)
    np.testing.assert_allclose(sim._new_test_scale(runs, 2), expected, rtol=1e-10, atol=1e-12)


def test_drifting_fit_is_the_dense_ridge_solution_with_the_rollouts_clock() -> None:
    """A drifting fit on runs of unequal lengths: the coefficients are the dense ridge
    solution of the teacher-forced steps with regressors ``[F_t, tau_t F_t]``, ``tau_t`` the
    rollouts' clock (`step_times`, which stops at 1 past the median run length); the test map
    weighs each coefficient's error by the variance of the feature it multiplies (1 for the
    constant)."""
    runs, truth = featurized_runset(
        pool=10, tests=6, runs=4, per_run=8, batch=2, drift=True, noise=0.01
    )
    # test features that say something of the coefficients: the map then uses them
    runs.features = ExampleFeatures(runs.features.train, truth["B"][:, :3])
    for k in (0, 1):  # two short runs: the median length is 5.5 of the longest's 8 steps
        runs.runs[k] = Run(f"short{k}", runs.runs[k].curriculum[:3], runs.runs[k].losses[:4])
    lam = 0.1
    sim = make_simulator("featurized", n_components=2, l2=lam, time_varying=True).fit(runs)
    T0 = float(np.median([r.n_steps for r in runs.runs]))
    assert sim.time_scale_ == T0 < max(r.n_steps for r in runs.runs)
    design = Design.from_runs(runs, sim.batch_size_, "mean")
    F = np.asarray(design.counts @ sim.features_)
    tau = np.concatenate([step_times(r.n_steps, T0) for r in runs.runs])
    G = np.hstack([F, tau[:, None] * F])
    J = G.shape[1]
    mass = np.asarray(design.counts.sum(axis=1)).ravel()
    for j in range(6):
        prev = design.prev[:, j]
        X = np.hstack([prev[:, None] * G, G])
        r = design.next[:, j] - mass / sim.batch_size_ * prev
        coef = np.linalg.solve(X.T @ X + lam * np.eye(2 * J), X.T @ r)
        np.testing.assert_allclose(sim.coef_A_[j], coef[:J], rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(sim.coef_B_[j], coef[J:], rtol=1e-6, atol=1e-10)
    variance = np.concatenate([[1.0], sim.features_[:, 1:].var(axis=0)])
    weights = np.tile(np.tile(variance, 2), 2)
    coef = np.hstack([sim.coef_A_, sim.coef_B_])
    W, strength, loo = fit_test_map(sim.test_features_, coef, weights)
    assert (sim.test_map_l2_, sim.test_map_loo_) == (strength, loo) and loo < 1.0
    np.testing.assert_array_equal(sim.test_map_, W)


def test_feature_errors_name_the_simulator() -> None:
    """A run set without features, or with features of the wrong shape, is refused in the
    name of the simulator being fitted."""
    runs, _ = featurized_runset(pool=10, tests=3, runs=2, per_run=4, batch=2)
    features = runs.features
    runs.features = None
    with pytest.raises(FeatureMissingError, match=r"^featurized: the run set has no example"):
        make_simulator("featurized", n_components=1, l2=1.0).fit(runs)
    runs.features = ExampleFeatures(features.train[:9], features.test)
    with pytest.raises(FeatureError, match=r"^hybrid: features: train features have shape"):
        make_simulator("hybrid", n_components=1, feature_l2=1.0, l2=1.0).fit(runs)


def test_calibration_uses_five_folds_by_default() -> None:
    """`calibrate` without `n_folds` fits five fold copies (given at least five runs)."""
    runs, _ = featurized_runset(pool=10, tests=2, runs=6, per_run=4, batch=2, noise=0.01)
    sim = make_simulator("featurized", n_components=1, l2=1.0, time_varying=False).fit(runs)
    assert sim.calibrate(runs).fold_coef_A_.shape[0] == 5


def test_a_new_test_examples_bend_counts_no_room_as_no_bend() -> None:
    """Worked by hand, on an uncalibrated simulator: the bend ratio of new test examples is the
    median over recorded ones of width / room, a recorded example with no room above its floor
    (a loss that never fell below its start) counting 0."""
    runs, _ = featurized_runset(pool=10, tests=4, runs=2, per_run=4, batch=2)
    sim = make_simulator("featurized", n_components=1, l2=1.0, time_varying=False).fit(runs)
    sim.floor_ = np.array([-1.0, 0.0, 0.0, -0.5])
    sim.initial_loss_ = np.array([-1.0, 0.0, 0.5, 0.3])  # rooms 0, 0, 0.5, 0.8
    sim.floor_width_ = np.array([0.0, 0.0, 0.02, 0.04])  # ratios 0, 0, 0.04, 0.05
    grown = sim.extend(
        test_ids=["a"], test_features=runs.features.test[:1], test_initial_loss=[2.0]
    )
    np.testing.assert_allclose(grown.floor_width_[4], (0.0 + 0.04) / 2 * 2.0)


def test_test_features_of_their_own_kind_get_their_own_basis_and_extend_uses_it() -> None:
    """Uncalibrated, test features of another dimension: the test side gets its own basis
    (truncated to the chosen directions), and `extend` projects new test examples with it and
    adds new training examples as seen (and not consumed), with no fold copies to grow."""
    runs, _ = featurized_runset(pool=10, tests=3, runs=2, per_run=4, batch=2)
    rng = np.random.default_rng(2)
    runs.features = ExampleFeatures(runs.features.train, rng.standard_normal((3, 5)))
    sim = make_simulator("featurized", n_components=1, l2=1.0, time_varying=False).fit(runs)
    assert sim.test_basis_mean_.shape == (5,) and sim.test_basis_components_.shape == (5, 1)
    y = rng.standard_normal((1, 5))
    grown = sim.extend(["new"], np.zeros((1, 3)), ["t-new"], y, [1.0])
    np.testing.assert_allclose(grown.test_features_[-1], sim._test_basis()(y)[0])
    assert grown.seen_.dtype == bool and grown.seen_.all() and len(grown.seen_) == 11
    assert not grown.consumed_[-1] and not hasattr(grown, "fold_A_")
