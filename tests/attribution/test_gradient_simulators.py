"""Gradient methods as simulators, validation against retraining, and the demo, on digits-mlp."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require_module

torch = require_module("torch", "pip install -c constraints.txt torch")
require_module("sklearn", "pip install scikit-learn")

from simfluence.attribution.tracin import tracin_cp_scores
from simfluence.cli.main import main
from simfluence.errors import SimfluenceError
from simfluence.recording.checkpoints import load_checkpoint
from simfluence.recording.protocol import RecordingProtocol
from simfluence.recording.record import record_runs
from simfluence.recording.workloads import get_workload
from simfluence.runlog import RunSet, load_runset
from simfluence.runlog.layout import checkpoint_path
from simfluence.simulators import AdditiveSimulator, configure_simulator, rollout

TINY = dict(runs=6, pool=40, per_run=16, tests=8, batch=4, epochs=2, lr=0.1, seed=0)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("digits") / "runs"
    protocol = RecordingProtocol(checkpoints=[0, 4, 8], **TINY)
    record_runs(get_workload("digits-mlp"), directory, protocol, progress=False)
    return directory


def test_tracin_cp_is_the_average_over_runs_and_checkpoints(recorded: Path) -> None:
    runs = load_runset(recorded)
    sim = configure_simulator("tracin-cp", max_runs=None).fit(runs)
    task = get_workload("digits-mlp")
    pool, tests = task.prepare(TINY["pool"], TINY["tests"], TINY["seed"])
    model = task.make_model(TINY["seed"])
    expected = np.zeros_like(sim.B_)
    for run in runs.runs:
        checkpoints = [load_checkpoint(recorded, run.run_id, s) for s in (0, 4, 8)]
        lrs = [run.lr[0], run.lr[4], run.lr[7]]  # the step taken from each checkpoint
        expected += tracin_cp_scores(
            task, model, checkpoints, lrs, pool, tests, 4, checkpoint_weights=[1 / 3] * 3
        )
    np.testing.assert_allclose(sim.B_, expected / len(runs.runs), rtol=1e-10, atol=1e-14)
    assert sim.A_ is None and sim.scale_ == 1.0 and sim.runs_used_ == 6


def test_additive_fed_tracin_scores_is_the_tracin_rollout(recorded: Path) -> None:
    """The special-case identity: TracIn is Simfluence-Additive with B from gradients."""
    runs = load_runset(recorded)
    tracin = configure_simulator("tracin-cp").fit(runs)
    additive = AdditiveSimulator(l2=1.0).fit(runs)
    additive.B_ = tracin.B_.copy()
    additive.seen_ = tracin.seen_
    for run in runs.runs:
        np.testing.assert_array_equal(
            additive.simulate(run.curriculum, run.initial_loss),
            tracin.simulate(run.curriculum, run.initial_loss),
        )


def test_scaled_variant_fits_one_scale_on_training_runs(recorded: Path) -> None:
    runs = load_runset(recorded)
    raw = configure_simulator("grad-dot").fit(runs)
    scaled = configure_simulator("grad-dot-scaled").fit(runs)
    # the closed form: least squares of L_t - L_0 on the raw rollout's change
    # (the raw rollout's change from 0, unfloored: a change may be negative)
    counts = raw.encode([r.curriculum for r in runs.runs])
    change = rollout(counts, None, raw.B_, np.zeros((len(runs.runs), len(runs.test_ids))))
    observed = [r.losses - r.losses[0] for r in runs.runs]
    s = sum((c * o).sum() for c, o in zip(change, observed, strict=True)) / sum(
        (c * c).sum() for c in change
    )
    assert scaled.scale_ == pytest.approx(max(s, 0.0), rel=1e-9)
    np.testing.assert_allclose(scaled.B_, raw.B_ * scaled.scale_, rtol=1e-12)


def test_influence_runs_and_is_finite(recorded: Path) -> None:
    sim = configure_simulator("influence-scaled", max_runs=2).fit(load_runset(recorded))
    assert sim.B_.shape == (TINY["tests"], TINY["pool"]) and np.isfinite(sim.B_).all()


def test_missing_checkpoints_name_the_run_and_step(recorded: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    protocol = RecordingProtocol(checkpoints=[], **{**TINY, "runs": 2})
    record_runs(get_workload("digits-mlp"), bare, protocol, progress=False)
    with pytest.raises(SimfluenceError, match=r"run 'run-0000' has no saved checkpoints"):
        configure_simulator("tracin-cp").fit(load_runset(bare))
    broken = tmp_path / "broken"
    record_runs(
        get_workload("digits-mlp"),
        broken,
        RecordingProtocol(checkpoints=[0, 8], **{**TINY, "runs": 2}),
        progress=False,
    )
    checkpoint_path(broken, "run-0001", 8).unlink()
    with pytest.raises(SimfluenceError, match=r"no checkpoint of run 'run-0001' at step 8"):
        configure_simulator("grad-dot").fit(load_runset(broken))


@pytest.mark.slow
def test_evaluate_and_validate_commands(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    methods = "linear,tracin-cp,tracin-cp-scaled,grad-dot,influence,mean"
    args = ["evaluate", str(recorded), "--methods", methods, "--holdout", "2", "--json", str(out)]
    assert main(args) == 0
    scores = json.loads(out.read_text())["methods"]
    assert set(scores) == set(methods.split(","))
    for name in ("linear", "tracin-cp", "mean"):  # tracin-cp calibrates in-sample
        assert 0.0 < scores[name]["coverage_90"] <= 1.0 and scores[name]["interval_width_90"] > 0
    out = tmp_path / "validation.json"
    args = [
        "validate",
        str(recorded),
        "--curricula",
        "3",
        "--kinds",
        "random,leave-out,optimized",
        "--methods",
        "linear,mean",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["kinds"]) == {"random", "leave-out", "optimized"}
    for block in result["kinds"].values():
        for scores in block["methods"].values():
            assert set(scores) >= {"all_steps_mse", "final_step_spearman", "lds"}
    for kind, block in result["kinds"].items():
        linear = block["methods"]["linear"]
        assert 0.0 <= linear["coverage_90"] <= 1.0 and linear["interval_width_90"] > 0, kind
        assert len(linear["mean_final_in_interval"]) == 3
    optimized = result["optimized"]
    assert len(optimized["random_mean_test_losses"]) == 3
    assert 0.0 <= optimized["fraction_of_random_beaten"] <= 1.0
    low, high = optimized["predicted_interval_90"]
    assert 0.0 <= low <= optimized["predicted_mean_test_loss_in_trust_region"] <= high
    assert optimized["actual_in_interval"] == (low <= optimized["actual_mean_test_loss"] <= high)
    assert main(["validate", str(recorded), "--workload", "newsgroups-minilm"]) == 2


@pytest.mark.slow
def test_demo_writes_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--runs",
        "6",
        "--holdout",
        "2",
        "--methods",
        "linear,additive,grad-dot-scaled,mean",
    ]
    assert main(args) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert len(evaluation["heldout_runs"]) == 2
    assert set(evaluation["methods"]) == {"linear", "additive", "grad-dot-scaled", "mean"}
    html = (out / "report.html").read_text()
    assert "simfluence-data" in html
    assert "Most helpful" in html  # the attribution views of the demo's report
    for name in ("methods.png", "trajectories.png", "attribution.json"):
        assert (out / name).stat().st_size > 0


def test_closed_form_fisher_influence_matches_the_dense_solve(recorded: Path) -> None:
    """Woodbury's n x n solve equals the dense (F + lambda I)^{-1} solve on a small model."""
    from simfluence.attribution.influence import influence_scores
    from simfluence.attribution.simulators import InfluenceSimulator, _mean_fisher_eigenvalue

    task = get_workload("digits-mlp")
    pool, tests = task.prepare(TINY["pool"], TINY["tests"], TINY["seed"])
    model = task.make_model(TINY["seed"])
    checkpoint = load_checkpoint(recorded, "run-0000", 8)
    sim = InfluenceSimulator(damping=0.1)
    closed = sim._kernel(task, model, checkpoint, pool, tests)
    lam = 0.1 * _mean_fisher_eigenvalue(task, model, checkpoint, pool)
    dense = influence_scores(
        task,
        model,
        checkpoint,
        -1.0,
        pool,
        tests,
        1,
        damping=lam,
        curvature="fisher",
        method="dense",
    )
    np.testing.assert_allclose(closed, dense, rtol=1e-4, atol=1e-6 * np.abs(dense).max())


# -- a task whose gradients and learning rates are known in closed form ------------------------
EXACT = dict(runs=3, pool=10, per_run=8, tests=4, batch=4, epochs=2, lr=0.3, seed=0)
EXACT_STEPS = 4  # 2 epochs x 8 / 4


@pytest.fixture(scope="module")
def decaying(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs of `SquaredLossTask`, whose learning rate decays at every step."""
    from exact_tasks import SquaredLossTask

    directory = tmp_path_factory.mktemp("decaying") / "runs"
    protocol = RecordingProtocol(checkpoints=[0, 2, 4], **EXACT)
    record_runs(SquaredLossTask(), directory, protocol, progress=False)
    return directory


@pytest.fixture()
def exact_workload(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`SquaredLossTask` registered as a workload, so the gradient methods can rebuild it."""
    from exact_tasks import SquaredLossTask

    from simfluence.recording.workloads import WORKLOADS

    monkeypatch.setitem(WORKLOADS, SquaredLossTask.name, SquaredLossTask)
    task = SquaredLossTask()
    pool, tests = task.prepare(EXACT["pool"], EXACT["tests"], EXACT["seed"])
    return task, pool, tests


def _replay(task, pool, run):  # type: ignore[no-untyped-def]
    """theta_t (t = 0..T) and the learning rate of every step, recomputed by hand."""
    from exact_tasks import squared_loss_thetas, weights

    lrs = EXACT["lr"] * task.DECAY ** np.arange(EXACT_STEPS)
    return squared_loss_thetas(pool, weights(task, EXACT["seed"]), run.curriculum, lrs), lrs


def test_runner_records_each_steps_learning_rate(decaying: Path, exact_workload) -> None:
    from exact_tasks import features

    task, pool, tests = exact_workload
    for run in load_runset(decaying).runs:
        thetas, lrs = _replay(task, pool, run)
        np.testing.assert_allclose(run.lr, lrs, rtol=1e-15)
        x, y = features(tests), features(tests, "y")
        np.testing.assert_allclose(run.losses, 0.5 * (thetas @ x.T - y) ** 2, rtol=1e-10)


@pytest.mark.parametrize("method", ["tracin-cp", "grad-dot"])
def test_tracin_uses_each_checkpoints_own_learning_rate(
    decaying: Path, exact_workload, method: str
) -> None:
    """B = -mean_k eta_k / b g_z(theta_k) . g_i(theta_k), eta_k the learning rate of the step
    taken *from* checkpoint k (the last step's for the final checkpoint), averaged over runs."""
    from exact_tasks import squared_loss_gradients

    task, pool, tests = exact_workload
    runs = load_runset(decaying)
    sim = configure_simulator(method).fit(runs)
    steps = [0, 2, 4] if method == "tracin-cp" else [4]
    expected = np.zeros((EXACT["tests"], EXACT["pool"]))
    for run in runs.runs:
        thetas, lrs = _replay(task, pool, run)
        for step in steps:
            eta = lrs[min(step, EXACT_STEPS - 1)]
            kernel = (
                squared_loss_gradients(tests, thetas[step])
                @ squared_loss_gradients(pool, thetas[step]).T
            )
            expected -= eta / EXACT["batch"] / len(steps) * kernel
    expected /= len(runs.runs)
    np.testing.assert_allclose(sim.B_, expected, rtol=1e-9, atol=1e-14)
    assert sim.checkpoint_steps_ == {r.run_id: steps for r in runs.runs}


def test_influence_equals_a_dense_fisher_solve(decaying: Path, exact_workload) -> None:
    """B = -(eta_T / b) g_z^T (F + lambda I)^{-1} g_i at the last checkpoint, F the pool's
    empirical Fisher, lambda = 0.1 trace(F) / D, solved densely by numpy; averaged over runs."""
    from exact_tasks import squared_loss_gradients

    task, pool, tests = exact_workload
    runs = load_runset(decaying)
    sim = configure_simulator("influence").fit(runs)
    expected = np.zeros((EXACT["tests"], EXACT["pool"]))
    for run in runs.runs:
        thetas, lrs = _replay(task, pool, run)
        g_pool = squared_loss_gradients(pool, thetas[-1])
        g_test = squared_loss_gradients(tests, thetas[-1])
        fisher = g_pool.T @ g_pool / len(pool)
        damped = fisher + 0.1 * np.trace(fisher) / fisher.shape[0] * np.eye(fisher.shape[0])
        expected -= lrs[-1] / EXACT["batch"] * g_test @ np.linalg.solve(damped, g_pool.T)
    expected /= len(runs.runs)
    np.testing.assert_allclose(sim.B_, expected, rtol=1e-8, atol=1e-14)


def test_projected_gradients_keep_the_scale(decaying: Path, exact_workload) -> None:
    """A Johnson-Lindenstrauss projection changes B by sampling noise, not by a factor."""
    runs = load_runset(decaying)
    exact = configure_simulator("tracin-cp").fit(runs).B_
    ratios = []
    for seed in range(4):
        projected = (
            configure_simulator("tracin-cp", projection_dim=256, projection_seed=seed).fit(runs).B_
        )
        assert np.corrcoef(exact.ravel(), projected.ravel())[0, 1] > 0.9
        ratios.append(np.linalg.norm(projected) / np.linalg.norm(exact))
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.1), ratios
    assert len(set(ratios)) == len(ratios)  # each seed its own projection (and cache entry)


def test_kernel_cache_keys_on_every_setting(decaying: Path, exact_workload) -> None:
    """Per-checkpoint kernels are shared between simulators of one process, but never across
    settings that change them (damping, curvature, projection)."""
    runs = load_runset(decaying)
    weak = configure_simulator("influence", damping=0.1).fit(runs).B_
    strong = configure_simulator("influence", damping=10.0).fit(runs).B_
    assert np.abs(strong).max() < 0.5 * np.abs(weak).max()  # more damping, smaller effects
    again = configure_simulator("influence", damping=0.1).fit(runs).B_
    np.testing.assert_array_equal(again, weak)
    tracin = configure_simulator("grad-dot").fit(runs).B_
    assert not np.allclose(tracin, weak)  # influence is not served TracIn's kernel


def test_gradient_options_runs_checkpoints_and_missing_learning_rates(
    decaying: Path, exact_workload, tmp_path: Path
) -> None:
    """``max_runs`` averages the first runs only; ``checkpoints_dir`` finds checkpoints
    elsewhere; a run without learning rates (or a NaN one) uses the protocol's ``lr``."""
    import dataclasses

    from exact_tasks import squared_loss_gradients

    from simfluence.runlog import save_runset

    task, pool, tests = exact_workload
    runs = load_runset(decaying)
    first = configure_simulator("grad-dot", max_runs=1).fit(runs)
    thetas, lrs = _replay(task, pool, runs.runs[0])
    kernel = squared_loss_gradients(tests, thetas[-1]) @ squared_loss_gradients(pool, thetas[-1]).T
    np.testing.assert_allclose(first.B_, -lrs[-1] / EXACT["batch"] * kernel, rtol=1e-9)
    assert first.runs_used_ == 1

    # the same runs without learning rates (run 0) or with a NaN one (run 1), elsewhere
    stripped = [dataclasses.replace(runs.runs[0], lr=None)]
    nan_lr = runs.runs[1].lr.copy()
    nan_lr[-1] = np.nan
    stripped.append(dataclasses.replace(runs.runs[1], lr=nan_lr))
    copy = dataclasses.replace(runs, runs=stripped)
    save_runset(copy, tmp_path / "copy")
    moved = configure_simulator("grad-dot", checkpoints_dir=str(decaying)).fit(
        load_runset(tmp_path / "copy")
    )
    expected = np.zeros_like(moved.B_)
    for run in runs.runs[:2]:
        thetas, _ = _replay(task, pool, run)
        g_test, g_pool = (squared_loss_gradients(e, thetas[-1]) for e in (tests, pool))
        expected -= EXACT["lr"] / EXACT["batch"] * g_test @ g_pool.T / 2
    np.testing.assert_allclose(moved.B_, expected, rtol=1e-9)
    with pytest.raises(SimfluenceError, match="no checkpoint"):
        configure_simulator("grad-dot").fit(load_runset(tmp_path / "copy"))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_influence_with_the_exact_hessian(decaying: Path, exact_workload) -> None:
    """``curvature="hessian"``: for the squared loss the Hessian of the mean pool loss is
    ``X^T X / n`` whatever the checkpoint; damping stays relative to the Fisher's mean
    eigenvalue."""
    from exact_tasks import features, squared_loss_gradients

    task, pool, tests = exact_workload
    runs = load_runset(decaying)
    sim = configure_simulator("influence", curvature="hessian", damping=0.5).fit(runs)
    x = features(pool)
    hessian = x.T @ x / len(pool)
    expected = np.zeros_like(sim.B_)
    for run in runs.runs:
        thetas, lrs = _replay(task, pool, run)
        g_pool = squared_loss_gradients(pool, thetas[-1])
        g_test = squared_loss_gradients(tests, thetas[-1])
        lam = 0.5 * (g_pool**2).sum() / len(pool) / g_pool.shape[1]
        damped = hessian + lam * np.eye(len(hessian))
        expected -= lrs[-1] / EXACT["batch"] * g_test @ np.linalg.solve(damped, g_pool.T)
    np.testing.assert_allclose(sim.B_, expected / len(runs.runs), rtol=1e-6, atol=1e-12)


def test_gradient_simulators_need_their_run_set(
    decaying: Path, exact_workload, tmp_path: Path
) -> None:
    """Default projection seed 0; checkpoints re-read when a file changes; clear errors for run
    sets without checkpoints directory or workload config."""
    runs = load_runset(decaying)
    seeded = configure_simulator("grad-dot", projection_dim=64, projection_seed=0).fit(runs).B_
    default = configure_simulator("grad-dot", projection_dim=64).fit(runs).B_
    np.testing.assert_array_equal(default, seeded)

    in_memory = RunSet(runs.train_ids, runs.test_ids, runs.runs, runs.metadata)
    with pytest.raises(SimfluenceError, match="no directory to find checkpoints"):
        configure_simulator("grad-dot").fit(in_memory)
    bare = RunSet(runs.train_ids, runs.test_ids, runs.runs, {})
    with pytest.raises(SimfluenceError, match="not recorded by `simfluence record`"):
        configure_simulator("grad-dot").fit(bare)
    with pytest.raises(SimfluenceError, match="unknown task 'nope'"):
        configure_simulator("grad-dot", workload="nope").fit(runs)  # the older parameter name
    with pytest.raises(SimfluenceError, match="unknown task 'nope'"):
        configure_simulator("grad-dot", task="nope").fit(runs)

    copy = tmp_path / "copy"
    shutil.copytree(decaying, copy)
    before = configure_simulator("grad-dot").fit(load_runset(copy)).B_
    for run in runs.runs:  # the final checkpoints change (as after re-recording)
        path = checkpoint_path(copy, run.run_id, EXACT_STEPS)
        state = torch.load(path, weights_only=True)
        torch.save({k: 2 * v for k, v in state.items()}, path)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    after = configure_simulator("grad-dot").fit(load_runset(copy)).B_
    assert not np.allclose(before, after)


def test_scale_is_the_least_squares_slope_clamped_at_zero(
    decaying: Path, exact_workload, tmp_path: Path
) -> None:
    """``s = max(<rollout change, observed change> / |rollout change|^2, 0)`` over the training
    runs' steps, with the simulator's own batch weighting; runs whose losses went *up* where
    the gradients predict a fall get ``s = 0`` (no sign flip)."""
    import dataclasses

    from exact_tasks import SquaredLossTask

    from simfluence.runlog import save_runset
    from simfluence.simulators.dynamics import rollout
    from simfluence.simulators.encoding import encode_runs

    partial = {**EXACT, "per_run": 6}  # batches of 4 and 2: the two weightings differ
    protocol = RecordingProtocol(checkpoints=[0, 4], **partial)
    runs = record_runs(SquaredLossTask(), tmp_path / "partial", protocol, progress=False)
    for weighting in ("sum", "mean"):
        raw = configure_simulator("grad-dot", batch_weighting=weighting).fit(runs)
        scaled = configure_simulator("grad-dot-scaled", batch_weighting=weighting).fit(runs)
        zeros = np.zeros((len(runs.runs), len(runs.test_ids)))
        change = rollout(encode_runs(runs, raw.batch_size_, weighting), None, raw.B_, zeros)
        observed = [r.losses - r.losses[0] for r in runs.runs]
        slope = sum(float((c * o).sum()) for c, o in zip(change, observed, strict=True)) / sum(
            float((c * c).sum()) for c in change
        )
        assert slope > 0 and scaled.scale_ == pytest.approx(slope, rel=1e-9)
    runs = load_runset(decaying)
    rising = [dataclasses.replace(r, losses=2 * r.losses[0] - r.losses) for r in runs.runs]
    save_runset(dataclasses.replace(runs, runs=rising), tmp_path / "rising")
    flipped = configure_simulator("grad-dot-scaled", checkpoints_dir=str(decaying)).fit(
        load_runset(tmp_path / "rising")
    )
    assert flipped.scale_ == 0.0 and np.all(flipped.B_ == 0.0)


def test_influence_passes_every_option_on(decaying: Path, exact_workload) -> None:
    from simfluence.attribution.simulators import InfluenceSimulator, TracInCPSimulator

    runs = load_runset(decaying)
    defaults = InfluenceSimulator().get_params()
    assert defaults["max_runs"] == 8 and defaults["projection_seed"] == 0
    assert defaults["damping"] == 0.1 and defaults["curvature"] == "fisher"
    shared = TracInCPSimulator().get_params()  # the options all gradient methods share
    assert {k: defaults[k] for k in shared} == shared
    options = dict(
        scaled=True,
        max_runs=1,
        projection_dim=16,
        projection_seed=3,
        workload="exact-squared-loss",
        checkpoints_dir=str(decaying),
        batch_weighting="sum",
    )
    sim = InfluenceSimulator(**options, task="exact-squared-loss", device="auto").fit(runs)
    expected = {**options, "task": "exact-squared-loss", "device": "auto"}
    assert {k: sim.get_params()[k] for k in expected} == expected
    assert sim.runs_used_ == 1 and sim.scale_ != 1.0
    exact = InfluenceSimulator(scaled=True, max_runs=1, batch_weighting="sum").fit(runs)
    assert not np.allclose(sim.B_, exact.B_)  # the projection reached the Fisher kernel


def _copy_with(runs: RunSet, directory: Path, **changes) -> RunSet:  # type: ignore[no-untyped-def]
    """`runs` saved again under `directory` with every run's fields replaced by
    ``changes[field](run)`` (the checkpoints stay where they were)."""
    import dataclasses

    from simfluence.runlog import save_runset

    changed = [dataclasses.replace(r, **{k: f(r) for k, f in changes.items()}) for r in runs.runs]
    save_runset(dataclasses.replace(runs, runs=changed), directory)
    return load_runset(directory)


def test_scaled_effects_do_not_depend_on_the_learning_rates_unit(
    decaying: Path, exact_workload, tmp_path: Path
) -> None:
    """The fitted scale absorbs any global factor on B: with every recorded learning rate 1000
    times smaller or larger (raw B, and the rollout's change, 1000 times smaller or larger:
    its squared sum from about 1e-6 to 1e6), the scaled B is the same and the scale 1000 times
    larger or smaller. Learning rates of zero (runs that did not move) give B = 0: nothing to
    scale, s = 0, no division by zero."""
    runs = load_runset(decaying)
    reference = configure_simulator("grad-dot-scaled").fit(runs)
    raw_reference = configure_simulator("grad-dot").fit(runs).B_
    assert reference.scale_ > 0
    for factor in (1e-3, 1e3):
        copy = _copy_with(runs, tmp_path / f"x{factor}", lr=lambda r, f=factor: r.lr * f)
        raw = configure_simulator("grad-dot", checkpoints_dir=str(decaying)).fit(copy)
        np.testing.assert_allclose(raw.B_, raw_reference * factor, rtol=1e-12)
        scaled = configure_simulator("grad-dot-scaled", checkpoints_dir=str(decaying)).fit(copy)
        assert scaled.scale_ == pytest.approx(reference.scale_ / factor, rel=1e-9)
        np.testing.assert_allclose(scaled.B_, reference.B_, rtol=1e-9)

    still = _copy_with(runs, tmp_path / "still", lr=lambda r: np.zeros_like(r.lr))
    zero = configure_simulator("grad-dot-scaled", checkpoints_dir=str(decaying)).fit(still)
    assert zero.scale_ == 0.0 and np.all(zero.B_ == 0.0)


def test_max_runs_zero_or_none_averages_every_run(decaying: Path, exact_workload) -> None:
    """``max_runs`` None or 0: no limit (all 3 runs), not an average over no run."""
    runs = load_runset(decaying)
    every = configure_simulator("grad-dot", max_runs=None).fit(runs)
    unlimited = configure_simulator("grad-dot", max_runs=0).fit(runs)
    assert every.runs_used_ == unlimited.runs_used_ == EXACT["runs"]
    np.testing.assert_array_equal(unlimited.B_, every.B_)


def test_gradient_methods_refuse_an_unknown_device(decaying: Path, exact_workload) -> None:
    """A device that does not exist is an error, never a silent fall-back to the CPU."""
    from simfluence.recording.devices import DeviceError

    runs = load_runset(decaying)
    for method in ("grad-dot", "influence"):
        with pytest.raises(DeviceError, match="--device 'gpu'"):
            configure_simulator(method, device="gpu").fit(runs)


def test_gradient_calibration_is_in_sample(decaying: Path, exact_workload) -> None:
    """Gradient methods learn nothing from the recorded losses, so `calibrate` keeps the
    residuals of their rollouts of the recorded runs themselves, each from its own step-0
    loss: ``L_t - simulate(curriculum, L_0)``."""
    runs = load_runset(decaying)
    sim = configure_simulator("tracin-cp").fit(runs).calibrate(runs)
    expected = [r.losses - sim.simulate(r.curriculum, r.initial_loss) for r in runs.runs]
    np.testing.assert_allclose(sim.calibration_residuals_, np.array(expected), rtol=1e-6)
    assert np.abs(sim.calibration_residuals_[:, 0]).max() == 0.0  # each run's own start


def test_influence_refuses_an_unknown_curvature(decaying: Path, exact_workload) -> None:
    """A misspelt curvature is refused, never replaced by the exact Hessian."""
    runs = load_runset(decaying)
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'fisher'"):
        configure_simulator("influence", curvature="gauss-newton").fit(runs)


class _Payload:
    """Pickles into a call of ``Path.touch(marker)``: code that runs when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_checkpoints_are_read_as_tensors_only(
    decaying: Path, exact_workload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint file that holds code, not tensors, is refused before the code runs, even
    where the environment tells torch to unpickle anything by default."""
    import pickle

    copy = tmp_path / "copy"
    shutil.copytree(decaying, copy)
    marker = tmp_path / "code-ran"
    torch.save({"weight": _Payload(marker)}, checkpoint_path(copy, "run-0000", EXACT_STEPS))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        configure_simulator("grad-dot").fit(load_runset(copy))
    assert not marker.exists()


def test_checkpoints_saved_on_a_gpu_are_read_on_the_cpu(
    decaying: Path, exact_workload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints whose tensors were saved from a GPU (as a user's own training may write
    them) are mapped to the CPU: the same scores as the CPU-saved ones."""
    import torch.serialization

    runs = load_runset(decaying)
    expected = configure_simulator("tracin-cp").fit(runs).B_
    copy = tmp_path / "copy"
    shutil.copytree(decaying, copy)
    with monkeypatch.context() as patch:  # tag every tensor as one of GPU 0's
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        for path in copy.glob("**/step-*.pt"):
            torch.save(torch.load(path, weights_only=True), path)
    got = configure_simulator("tracin-cp").fit(load_runset(copy)).B_
    np.testing.assert_array_equal(got, expected)


def test_kernel_cache_tells_checkpoints_with_equal_times_apart(
    decaying: Path, exact_workload, tmp_path: Path
) -> None:
    """Checkpoint files with the same modification time (as unpacked from an archive that
    keeps whole seconds) are still different checkpoints: each is read."""
    runs = load_runset(decaying)
    expected = configure_simulator("tracin-cp").fit(runs).B_
    copy = tmp_path / "unpacked"
    shutil.copytree(decaying, copy)
    for path in copy.glob("**/step-*.pt"):
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    got = configure_simulator("tracin-cp").fit(load_runset(copy)).B_
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_kernel_cache_is_bounded_and_drops_the_oldest(
    decaying: Path, exact_workload, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-checkpoint kernel cache holds at most `_KERNEL_CACHE_SIZE` kernels, dropping
    the oldest first; what is fitted does not change."""
    import simfluence.attribution.simulators as gradient_simulators

    runs = load_runset(decaying)
    expected = configure_simulator("tracin-cp").fit(runs).B_
    monkeypatch.setattr(gradient_simulators, "_KERNELS", {})
    monkeypatch.setattr(gradient_simulators, "_KERNEL_CACHE_SIZE", 2)
    got = configure_simulator("tracin-cp").fit(runs).B_  # 3 runs x 3 checkpoints
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    kept = [Path(key[0]) for key in gradient_simulators._KERNELS]
    last = runs.runs[-1].run_id
    assert kept == [checkpoint_path(decaying, last, s) for s in (2, EXACT_STEPS)]


def test_gradient_methods_warn_when_the_runs_were_not_plain_sgd(
    decaying: Path, exact_workload, tmp_path: Path
) -> None:
    """Fitted on AdamW runs, a gradient method says once, by name, that its formula assumes
    plain SGD (what `evaluate` prints under its table). An optimizer it does not know (the
    decaying runs' `DecayingSGD`, an SGD subclass) gets the same warning: a subclass may
    change the step."""
    from exact_tasks import SquaredLossTask

    from simfluence.attribution.simulators import optimizer_warnings
    from simfluence.recording.optim import OptimizerSpec

    (unknown,) = configure_simulator("grad-dot").fit(load_runset(decaying)).warnings_
    assert unknown.startswith("grad-dot: the runs were trained with DecayingSGD (lr 0.3)")

    adamw = tmp_path / "adamw"
    protocol = RecordingProtocol(
        checkpoints=[0, 4], optimizer=OptimizerSpec(name="adamw"), **{**EXACT, "runs": 2}
    )
    record_runs(SquaredLossTask(), adamw, protocol, progress=False)
    runs = load_runset(adamw)
    recorded = runs.metadata["config"]["optimizer"]
    for method in ("grad-dot", "tracin-cp"):  # Adam's preconditioner, from the replayed run
        fitted = configure_simulator(method).fit(runs)
        assert fitted.warnings_ == [] and fitted.preconditioned_
    for method in ("influence",):
        (warning,) = configure_simulator(method).fit(runs).warnings_
        assert warning == optimizer_warnings(method, recorded)[0]
        assert warning.startswith(f"{method}: the runs were trained with AdamW (betas [0.9, 0.999]")
        assert "lr 0.3, weight_decay 0.01), but its formula assumes plain SGD" in warning


def test_gradient_methods_keep_their_unseen_rule(decaying: Path, exact_workload) -> None:
    """``unseen`` reaches the base simulator: the rule is kept as given (and in the parameters
    saved with the model), and a rule that does not exist is refused at fit."""
    runs = load_runset(decaying)
    for rule in ("error", "prior"):
        sim = configure_simulator("grad-dot", unseen=rule).fit(runs)
        assert sim.unseen == rule and sim.get_params()["unseen"] == rule
    with pytest.raises(SimfluenceError, match="unseen='sometimes'"):
        configure_simulator("tracin-cp", unseen="sometimes").fit(runs)


def test_the_gradient_projection_is_seeded_by_projection_seed() -> None:
    """`projection_seed` picks the random projection of the gradients: the simulator projects
    with the matrix that seed draws (another seed, another matrix); no dimension, none."""
    from simfluence.attribution.gradients import RandomProjection
    from simfluence.attribution.simulators import TracInCPSimulator

    grads = torch.linspace(-1.0, 1.0, 30, dtype=torch.float32).reshape(2, 15)
    projection = TracInCPSimulator(projection_dim=4, projection_seed=7)._projection()
    torch.testing.assert_close(projection(grads), RandomProjection(4, seed=7)(grads))
    assert not torch.allclose(projection(grads), RandomProjection(4, seed=0)(grads))
    assert TracInCPSimulator()._projection() is None
