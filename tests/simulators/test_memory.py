"""Optimizer memory (`simulators.memory`) and the `auto` method (`simulators.auto`)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import Run, RunSet, count_matrix
from simfluence.simulators import LinearSimulator, load_simulator, make_simulator
from simfluence.simulators.encoding import weight_batches
from simfluence.simulators.memory import MemoryKernel, candidates, lr_profile, resolve
from simfluence.synth import SynthConfig, random_curriculum, true_parameters


def test_kernel_matrix_by_hand() -> None:
    b = 0.5
    lag = MemoryKernel(b).lag_matrix(3).toarray()
    # row t: (1 - b) b^k / (1 - b^t) at column t - k
    expected = np.array(
        [
            [1.0, 0.0, 0.0],
            [0.25 / 0.75, 0.5 / 0.75, 0.0],
            [0.125 / 0.875, 0.25 / 0.875, 0.5 / 0.875],
        ]
    )
    np.testing.assert_allclose(lag, expected)
    np.testing.assert_allclose(lag.sum(axis=1), 1.0)  # bias-corrected: mass preserved
    scaled = MemoryKernel(b, np.array([0.5, 1.0, 0.25])).lag_matrix(3).toarray()
    np.testing.assert_allclose(scaled, np.diag([0.5, 1.0, 0.25]) @ expected)
    # a longer curriculum than the stored scale extends it with its last value
    np.testing.assert_allclose(
        MemoryKernel(0.0, np.array([1.0, 0.5])).step_scale(4), [1, 0.5, 0.5, 0.5]
    )
    assert (
        MemoryKernel().is_identity
        and MemoryKernel().lag_matrix(3).toarray().tolist() == np.eye(3).tolist()
    )


def test_apply_and_rest_by_hand() -> None:
    counts = sparse.csr_matrix(np.array([[2.0, 0.0], [0.0, 2.0]]))  # batch size 2, two steps
    kernel = MemoryKernel(0.5, np.array([1.0, 0.5]))
    applied = kernel.apply(counts).toarray()
    np.testing.assert_allclose(applied, [[2.0, 0.0], [0.5 * 2 / 3, 0.5 * 4 / 3]])
    np.testing.assert_allclose(kernel.rest(counts), [0.0, 1.0])  # (1 - s_t) * 2


def test_lr_profile_and_candidates() -> None:
    runs = _runs_with(
        lr=np.linspace(1.0, 0.25, 4), optimizer={"name": "AdamW", "betas": [0.7, 0.9]}
    )
    np.testing.assert_allclose(lr_profile(runs), np.linspace(1.0, 0.25, 4))
    assert candidates("none", runs) == [MemoryKernel()]
    (adam,) = candidates("adam", runs)
    assert adam.decay == 0.7 and adam.scale is None
    (both,) = candidates("adam+lr", runs)
    assert both.decay == 0.7 and np.allclose(both.scale, np.linspace(1.0, 0.25, 4))
    found = candidates("auto", runs)
    assert found[0].is_identity
    assert sorted({k.decay for k in found}) == [0.0, 0.5, 0.7, 0.8, 0.9]
    assert sum(k.scale is not None for k in found) == 5 and len(found) == 6  # + identity
    # a list: each one's kernels, deduplicated, in order
    listed = candidates("none,0.8+lr,none", runs)
    assert [k.to_config() for k in listed] == [
        {"decay": 0.0, "lr_scale": False},
        {"decay": 0.8, "lr_scale": True},
    ]
    # a constant schedule has nothing to scale; "sum" weighting cannot scale
    constant = _runs_with(lr=np.full(4, 0.1), optimizer=None)
    assert lr_profile(constant) is None and all(
        k.scale is None for k in candidates("auto", constant)
    )
    assert all(k.scale is None for k in candidates("auto", runs, "sum"))
    with pytest.raises(SimfluenceError):
        candidates("lr", runs, "sum")
    assert resolve("0.8+lr") == (0.8, "lr") and resolve(0.5) == 0.5
    for bad in ("fast", 1.0, -0.1, True):
        with pytest.raises(SimfluenceError):
            resolve(bad)


def _runs_with(lr: np.ndarray | None, optimizer: dict | None) -> RunSet:
    ids = ["a", "b", "c"]
    runs = [
        Run(f"r{k}", [["a", "b"], ["b", "c"], ["c", "a"], ["a", "b"]], np.ones((5, 1)), lr=lr)
        for k in range(2)
    ]
    return RunSet(ids, ["z"], runs, {"config": {"optimizer": optimizer}})


def momentum_runs(decay: float, n_runs: int = 10, seed: int = 0) -> RunSet:
    """Runs of a Simfluence-Linear process whose inputs are the momentum-smoothed counts."""
    config = SynthConfig(pool=12, tests=3, runs=n_runs, per_run=8, batch=2, epochs=3, seed=seed)
    rng = np.random.default_rng(seed)
    truth = true_parameters(config, rng)
    ids = [f"train-{i}" for i in range(config.pool)]
    index = {t: k for k, t in enumerate(ids)}
    kernel = MemoryKernel(decay)
    runs = []
    for r in range(n_runs):
        curriculum = random_curriculum(ids, config.per_run, config.batch, config.epochs, rng)
        counts = kernel.apply(weight_batches(count_matrix(curriculum, index), config.batch, "mean"))
        alpha, beta = np.asarray(counts @ truth.A.T), np.asarray(counts @ truth.B.T)
        losses = np.empty((len(curriculum) + 1, config.tests))
        losses[0] = truth.initial_loss
        for t in range(len(curriculum)):
            noise = np.exp(0.005 * rng.standard_normal(config.tests))
            losses[t + 1] = (alpha[t] * losses[t] + beta[t]) * noise
        runs.append(Run(f"run-{r:02d}", curriculum, losses))
    return RunSet(ids, [f"test-{j}" for j in range(config.tests)], runs, {})


def _heldout_mse(simulator: LinearSimulator, train: RunSet, held: RunSet) -> float:
    simulator.fit(train)
    sims = simulator.simulate_many(
        [r.curriculum for r in held.runs], np.stack([r.initial_loss for r in held.runs])
    )
    return float(
        np.mean([((s - r.losses) ** 2).mean() for s, r in zip(sims, held.runs, strict=True)])
    )


@pytest.fixture(scope="module")
def momentum_data() -> tuple[RunSet, RunSet]:
    return momentum_runs(0.8).split(2)


def test_cv_picks_the_generating_kernel(momentum_data: tuple[RunSet, RunSet]) -> None:
    train, held = momentum_data
    auto = LinearSimulator(memory="auto")
    auto_mse = _heldout_mse(auto, train, held)
    assert auto.memory_ == {"decay": 0.8, "lr_scale": False}
    assert auto.memory_cv_ is not None and len({row[0] for row in auto.memory_cv_}) == 4
    none_mse = _heldout_mse(LinearSimulator(memory="none"), train, held)
    assert auto_mse < 0.5 * none_mse


def test_simulate_uses_the_kernel(momentum_data: tuple[RunSet, RunSet]) -> None:
    train, held = momentum_data
    fitted = LinearSimulator(memory=0.8, l2=0.1).fit(train)
    curriculum = held.runs[0].curriculum
    start = held.runs[0].initial_loss
    # by hand: the rollout of the kernel-smoothed counts under the fitted A, B
    counts = MemoryKernel(0.8).apply(
        weight_batches(count_matrix(curriculum, train.train_index), 2.0, "mean")
    )
    expected = [start]
    for t in range(counts.shape[0]):
        row = counts[t].toarray().ravel()
        expected.append((fitted.A_ @ row) * expected[-1] + fitted.B_ @ row)
    np.testing.assert_allclose(fitted.simulate(curriculum, start), np.array(expected), rtol=1e-10)
    assert not np.allclose(
        fitted.simulate(curriculum, start),
        LinearSimulator(memory="none", l2=0.1).fit(train).simulate(curriculum, start),
    )


def test_memory_none_is_todays_model(momentum_data: tuple[RunSet, RunSet]) -> None:
    train, _ = momentum_data
    today = LinearSimulator().fit(train)
    none = LinearSimulator(memory="none").fit(train)
    assert today.l2_ == none.l2_
    np.testing.assert_array_equal(today.A_, none.A_)
    np.testing.assert_array_equal(today.B_, none.B_)
    assert none.memory_ == {"decay": 0.0, "lr_scale": False} and none.memory_cv_ is None


def test_lr_scaled_rest_keeps_neutral_examples_neutral(
    momentum_data: tuple[RunSet, RunSet],
) -> None:
    train, _ = momentum_data
    scale = np.linspace(1.0, 0.1, train.runs[0].n_steps)
    for run in train.runs:
        run.lr = 0.01 * scale
    try:
        fitted = LinearSimulator(memory="0.8+lr", l2=1.0).fit(train)
    finally:
        for run in train.runs:
            run.lr = None
    assert fitted.memory_ == {"decay": 0.8, "lr_scale": True}
    np.testing.assert_allclose(fitted.memory_scale_, scale)
    # neutral parameters (A = 1/b, B = 0): the loss stays put at every step, whatever the rate
    fitted.A_ = np.full_like(fitted.A_, 0.5)
    fitted.B_ = np.zeros_like(fitted.B_)
    traj = fitted.simulate(train.runs[0].curriculum, np.ones(3))
    np.testing.assert_allclose(traj, 1.0)
    # one example's departure acts with weight s_t: compare steps of rate 1 and of rate 0.1
    step = fitted.row_mass(fitted.encode([train.runs[0].curriculum])[0])
    np.testing.assert_allclose(step, 2.0)


def test_save_load_round_trip(tmp_path, momentum_data: tuple[RunSet, RunSet]) -> None:
    train, held = momentum_data
    fitted = LinearSimulator(memory="auto").fit(train)
    fitted.save(tmp_path / "linear.npz")
    loaded = load_simulator(tmp_path / "linear.npz")
    assert loaded.memory_ == fitted.memory_
    curricula = [r.curriculum for r in held.runs]
    starts = np.stack([r.initial_loss for r in held.runs])
    for a, b in zip(
        fitted.simulate_many(curricula, starts),
        loaded.simulate_many(curricula, starts),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_calibration_refits_keep_the_kernel(momentum_data: tuple[RunSet, RunSet]) -> None:
    train, _ = momentum_data
    fitted = LinearSimulator(memory="auto").fit(train)
    assert fitted._calibration_params()["memory"] == 0.8
    fitted.calibrate(train, n_folds=2)
    assert all(f.memory_ == fitted.memory_ for f in fitted.fold_simulators())


def test_auto_picks_reports_and_round_trips(tmp_path, momentum_data: tuple[RunSet, RunSet]) -> None:
    train, held = momentum_data
    auto = make_simulator("auto", candidates=["linear", "mean"], cv_folds=3, stack=False)
    auto.fit(train)
    assert auto.chosen_ == "linear"
    assert auto.cv_scores_["linear"] < auto.cv_scores_["mean"]
    assert "auto picked linear (memory 0.8" in auto.describe()
    curricula = [r.curriculum for r in held.runs]
    starts = np.stack([r.initial_loss for r in held.runs])
    direct = auto.chosen_simulator.simulate_many(curricula, starts)
    for a, b in zip(auto.simulate_many(curricula, starts), direct, strict=True):
        np.testing.assert_array_equal(a, b)
    auto.save(tmp_path / "auto.npz")
    loaded = load_simulator(tmp_path / "auto.npz")
    assert loaded.chosen_ == "linear" and loaded.describe() == auto.describe()
    for a, b in zip(loaded.simulate_many(curricula, starts), direct, strict=True):
        np.testing.assert_array_equal(a, b)
    # the mean trajectory wins where every run has the same (oscillating) losses
    steps = np.arange(train.runs[0].n_steps + 1)[:, None]
    same = 1 + 0.5 * np.sin(steps) * np.ones((1, len(train.test_ids)))
    flat = RunSet(
        train.train_ids, train.test_ids, [Run(r.run_id, r.curriculum, same) for r in train.runs]
    )
    other = make_simulator("auto", candidates=["linear", "mean"], cv_folds=3).fit(flat)
    assert other.chosen_ == "mean" and other.cv_scores_["mean"] < other.cv_scores_["linear"]
    assert other.cv_scores_["stack"] == other.cv_scores_["mean"]  # a tie goes to the candidate
    # with the stack: whatever wins survives a save, its nested members included
    stacked = make_simulator("auto", candidates=["linear", "mean"], cv_folds=3).fit(train)
    assert stacked.cv_scores_[stacked.chosen_] == min(stacked.cv_scores_.values())
    stacked.save(tmp_path / "stacked.npz")
    again = load_simulator(tmp_path / "stacked.npz")
    assert again.describe() == stacked.describe()
    for a, b in zip(
        again.simulate_many(curricula, starts),
        stacked.simulate_many(curricula, starts),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    with pytest.raises(SimfluenceError):
        make_simulator("auto", candidates=["tracin-cp"]).fit(train)


def _with_features(runs: RunSet, seed: int = 0) -> RunSet:
    from simfluence.runlog.features import ExampleFeatures

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((len(runs.train_ids), 2))
    Y = rng.standard_normal((len(runs.test_ids), 2))
    runs.features = ExampleFeatures(X, Y, {"source": "test"})
    return runs


def test_hybrid_memory_none_is_todays_hybrid_and_cv_picks_the_kernel(
    tmp_path, momentum_data: tuple[RunSet, RunSet]
) -> None:
    from simfluence.simulators.featurized import HybridSimulator

    train, held = momentum_data
    train = _with_features(train)
    plain = HybridSimulator(n_components=1, feature_l2=1.0).fit(train)
    none = HybridSimulator(n_components=1, feature_l2=1.0, memory="none").fit(train)
    assert none.memory_ == {"decay": 0.0, "lr_scale": False} and none.memory_cv_ is None
    np.testing.assert_array_equal(plain.A_, none.A_)
    np.testing.assert_array_equal(plain.B_, none.B_)
    # the featurized prior and the ridge both see the kernel; CV prefers the generating one
    chosen = HybridSimulator(n_components=1, feature_l2=1.0, memory="none,0.8")
    chosen_mse = _heldout_mse(chosen, train, held)  # type: ignore[arg-type]
    assert chosen.memory_ == {"decay": 0.8, "lr_scale": False}
    assert chosen.memory_cv_ is not None and len(chosen.memory_cv_) == 2
    assert chosen_mse < 0.5 * _heldout_mse(none, train, held)  # type: ignore[arg-type]
    chosen.save(tmp_path / "hybrid.npz")
    loaded = load_simulator(tmp_path / "hybrid.npz")
    curricula = [r.curriculum for r in held.runs]
    starts = np.stack([r.initial_loss for r in held.runs])
    again = chosen.simulate_many(curricula, starts)
    for a, b in zip(loaded.simulate_many(curricula, starts), again, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_auto_gives_hybrid_the_kernel_linear_chose(momentum_data: tuple[RunSet, RunSet]) -> None:
    train, _ = momentum_data
    train = _with_features(train)
    auto = make_simulator("auto", candidates=["linear", "hybrid"], cv_folds=3, stack=False).fit(
        train
    )
    choice = auto.choice()
    assert set(choice["cv_all_steps_mse"]) == {"linear", "hybrid"}
    assert choice["description"].startswith(f"auto picked {choice['method']} (memory ")
    assert choice["memory"] == "0.8"  # linear's kernel, which hybrid took over none


def test_cli_auto_says_what_it_picked(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from simfluence.cli import main
    from simfluence.runlog import save_runset

    save_runset(momentum_runs(0.8, n_runs=8), tmp_path / "runs")
    out = tmp_path / "eval.json"
    argv = ["evaluate", str(tmp_path / "runs"), "--holdout", "2", "--json", str(out)]
    assert main([*argv, "--methods", "auto,mean", "--l2", "0.1"]) == 2  # auto takes no --l2
    assert "method 'auto' does not take --l2" in capsys.readouterr().err
    assert main([*argv, "--methods", "linear,auto,mean", "--l2", "0.1"]) == 0  # beside linear
    capsys.readouterr()
    assert main([*argv, "--methods", "auto,mean", "--memory", "auto"]) == 0
    printed = capsys.readouterr().out
    choice = json.loads(out.read_text())["methods"]["auto"]["choice"]
    assert choice["method"] == "linear" and choice["memory"] not in (None, "none")
    assert choice["description"] in printed and printed.count("auto picked linear") == 1
    model = tmp_path / "auto.npz"
    fit = ["fit", str(tmp_path / "runs"), "--method", "auto", "-o", str(model), "--no-intervals"]
    assert main(fit) == 0
    assert "auto picked linear (memory 0.8, l2 " in capsys.readouterr().out  # all 8 runs
