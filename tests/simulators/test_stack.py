"""``stack`` (`simulators.stack`): the exact simplex solver, the weights per test example and
stretch of training, the cross-fitted choice, and the simulator itself on a small synthetic
run set (fits well under a second)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.metrics import all_steps_mse
from simfluence.runlog.runs import RunSet
from simfluence.simulators import load_simulator
from simfluence.simulators.auto import AutoSimulator
from simfluence.simulators.baselines import MeanTrajectorySimulator
from simfluence.simulators.linear import LinearSimulator
from simfluence.simulators.stack import (
    STACK_MEMBERS,
    StackSimulator,
    block_moments,
    choose_stack,
    combine,
    simplex_least_squares,
    stack_weights,
    step_blocks,
)
from simfluence.synth import SynthConfig, generate

_SMALL = SynthConfig(pool=8, tests=3, runs=6, per_run=8, batch=2, epochs=2, noise=0.01)


def _runs(features: bool = False) -> RunSet:
    runs, _ = generate(_SMALL)
    if not features:
        runs = RunSet(runs.train_ids, runs.test_ids, runs.runs, runs.metadata)
    return runs


def _grid_minimum(Q: np.ndarray, q: np.ndarray, step: float = 0.005) -> float:
    """The smallest ``w Q w - 2 q w`` on a fine grid of the simplex (three members)."""
    n = round(1 / step)
    grid = np.array([(a, b, n - a - b) for a in range(n + 1) for b in range(n + 1 - a)]) / n
    return float(np.min(np.einsum("ga,ab,gb->g", grid, Q, grid) - 2 * grid @ q))


def test_the_simplex_solver_is_exact_inside_and_on_the_faces() -> None:
    """Random problems (interior and boundary minima): the weights are on the simplex and at
    least as good as the best point of a fine grid, and no worse than any vertex."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.normal(size=(30, 3))
        y = x @ rng.dirichlet(np.ones(3)) * rng.uniform(0.5, 1.5) + rng.normal(0, 0.1, 30)
        Q, q = x.T @ x, x.T @ y
        w = simplex_least_squares(Q[None], q[None])[0]
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        loss = w @ Q @ w - 2 * q @ w
        assert loss <= _grid_minimum(Q, q) + 1e-9 * abs(loss)
        vertices = np.diag(Q) - 2 * q
        assert loss <= vertices.min() + 1e-12


def test_the_simplex_solver_finds_known_minima_row_by_row() -> None:
    """An exact member gets weight 1; an equal mix of two members is found as (0.5, 0.5, 0);
    rows are solved independently; a degenerate (all-zero) problem gives the first vertex."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    rows = [x[:, 2], 0.5 * x[:, 0] + 0.5 * x[:, 1], np.zeros(40)]
    Q = np.stack([x.T @ x, x.T @ x, np.zeros((3, 3))])
    q = np.stack([x.T @ rows[0], x.T @ rows[1], np.zeros(3)])
    w = simplex_least_squares(Q, q)
    np.testing.assert_allclose(w[0], [0, 0, 1], atol=1e-9)
    np.testing.assert_allclose(w[1], [0.5, 0.5, 0], atol=1e-9)
    np.testing.assert_array_equal(w[2], [1, 0, 0])


def test_steps_fall_into_equal_blocks() -> None:
    np.testing.assert_array_equal(step_blocks(8, 4), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(step_blocks(6, 4), [0, 0, 1, 2, 2, 3])
    np.testing.assert_array_equal(step_blocks(3, 4), [0, 1, 2])
    np.testing.assert_array_equal(step_blocks(5, 1), [0] * 5)


def test_combine_weighs_each_block_and_keeps_the_start() -> None:
    """Two members, two test examples, four steps in two blocks, by hand."""
    a = np.array([[9.0, 9.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    b = np.array([[9.0, 9.0], [3.0, 4.0], [3.0, 4.0], [3.0, 4.0], [3.0, 4.0]])
    weight = np.array([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.25, 0.75]]])  # (B, M, K)
    out = combine([a, b], weight)
    expected = [[9, 9], [1, 3], [1, 3], [3, 3.5], [3, 3.5]]
    np.testing.assert_allclose(out, expected)


def test_block_moments_leave_out_the_start_and_unscored_losses() -> None:
    """The moments equal the sums over the scored steps of each block, by hand."""
    rng = np.random.default_rng(2)
    sides = [[rng.normal(size=(5, 2))] for _ in range(2)]
    true = rng.normal(size=(5, 2))
    true[3, 1] = np.nan
    Q, q = block_moments(sides, [true], 2)
    assert Q.shape == (1, 2, 2, 2, 2) and q.shape == (1, 2, 2, 2)
    for b, steps in enumerate(([1, 2], [3, 4])):
        for j in range(2):
            rows = [t for t in steps if not np.isnan(true[t, j])]
            x = np.array([[s[0][t, j] for s in sides] for t in rows])
            np.testing.assert_allclose(Q[0, b, j], x.T @ x)
            np.testing.assert_allclose(q[0, b, j], x.T @ true[rows, j])


def test_shrinkage_pulls_every_test_example_to_the_shared_weights() -> None:
    """Without shrinkage each test example takes its own exact member; with a very strong one
    both take the weights of the summed problem."""
    x = np.random.default_rng(3).normal(size=(30, 2))
    Q = np.stack([x.T @ x, x.T @ x])[None]  # (B=1, M=2, K, K)
    q = np.stack([x.T @ x[:, 0], x.T @ x[:, 1]])[None]
    np.testing.assert_allclose(stack_weights(Q, q, 0.0)[0], [[1, 0], [0, 1]], atol=1e-9)
    strong = stack_weights(Q, q, 1e9)[0]
    shared = simplex_least_squares(Q[0].mean(0)[None], q[0].mean(0)[None])[0]
    np.testing.assert_allclose(strong, [shared, shared], atol=1e-6)


def test_cross_fitting_scores_each_fold_with_weights_from_the_others() -> None:
    """Member 1 is exact on every run: the stack gives it all the weight and scores 0. When
    member 0 is exact on fold 0 only and member 1 on fold 1 only, cross-fitted weights
    (learned on the other fold) are wrong on both folds, and the score says so."""
    rng = np.random.default_rng(4)
    true = [rng.normal(size=(5, 2)) for _ in range(4)]
    noisy = [t + rng.normal(0, 1, t.shape) for t in true]
    choice = choose_stack([noisy, true], true, [0, 1, 0, 1])
    assert choice.cv_mse == pytest.approx(0.0, abs=1e-20)
    np.testing.assert_allclose(choice.weight[..., 1], 1.0)
    first = [t if f == 0 else n for t, n, f in zip(true, noisy, [0, 1, 0, 1], strict=True)]
    second = [n if f == 0 else t for t, n, f in zip(true, noisy, [0, 1, 0, 1], strict=True)]
    crossed = choose_stack([first, second], true, [0, 1, 0, 1])
    assert crossed.cv_mse > 0.1
    assert crossed.blocks in (1, 2, 4) and crossed.shrinkage in (0.0, 1.0, 3.0, 10.0)


def test_stack_fits_simulates_saves_and_calibrates_without_refits(tmp_path: Path) -> None:
    """The stack's rollouts are its members' rollouts weighted per block; it survives a save;
    calibration on its own runs uses the cross-fitted rollouts of the fit (no refit)."""
    runs = _runs()
    stack = StackSimulator(["linear", "mean"], cv_folds=3, memory="none").fit(runs)
    assert stack.members_ and set(stack.members_) <= {"linear", "mean"}
    np.testing.assert_allclose(stack.weight_.sum(axis=2), 1.0)
    assert stack.weight_.shape[1:] == (len(runs.test_ids), len(stack.members_))
    curricula = [r.curriculum for r in runs.runs]
    starts = np.stack([r.initial_loss for r in runs.runs])
    classes = {"linear": LinearSimulator, "mean": MeanTrajectorySimulator}
    members = [
        classes[n](**p).fit(runs) for n, p in zip(stack.members_, stack.member_params_, strict=True)
    ]
    rollouts = [m.simulate_many(curricula, starts) for m in members]
    expected = [combine([r[c] for r in rollouts], stack.weight_) for c in range(len(curricula))]
    got = stack.simulate_many(curricula, starts)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9)
    # the members keep the hyperparameters they chose and the unseen policy given
    assert all(p["unseen"] == "error" for p in stack.member_params_ if "unseen" in p)
    linear_params = stack.member_params_[stack.members_.index("linear")]
    assert linear_params["l2"] == stack.fitted_members[stack.members_.index("linear")].l2_
    stack.save(tmp_path / "stack.npz")
    loaded = load_simulator(tmp_path / "stack.npz")
    assert loaded.describe() == stack.describe()
    for a, b in zip(loaded.simulate_many(curricula, starts), got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    true, cross_fitted, copies = stack._calibration_rollouts(runs, 3)
    assert copies == [] and all_steps_mse(true, cross_fitted).mean == pytest.approx(stack.cv_mse_)
    refitted = loaded._calibration_rollouts(runs, 3)  # a loaded stack refits its members
    assert len(refitted[2]) == 3


def test_stack_refuses_unknown_members_and_too_few_runs() -> None:
    runs = _runs()
    with pytest.raises(SimfluenceError, match="candidates must be among"):
        StackSimulator(["linear", "tracin-cp"]).fit(runs)
    two = RunSet(runs.train_ids, runs.test_ids, runs.runs[:1])
    with pytest.raises(SimfluenceError, match="at least 2 training runs and 2 folds"):
        StackSimulator(["mean", "linear"]).fit(two)
    assert StackSimulator().members == list(STACK_MEMBERS)


def test_auto_stacks_when_the_stack_scores_best_and_says_so() -> None:
    """auto scores the stack of its candidates by the cross-fitted held-out error; when it
    wins, the choice names the members and their mean weights; the stack is never chosen
    when it is off."""
    runs = _runs(features=True)
    auto = AutoSimulator(["linear", "mean", "log-linear"], cv_folds=3, memory="none").fit(runs)
    assert set(auto.cv_scores_) == {"linear", "mean", "log-linear", "stack"}
    best = min(auto.cv_scores_, key=auto.cv_scores_.get)
    assert auto.chosen_ == best
    off = AutoSimulator(["linear", "mean"], cv_folds=3, memory="none", stack=False).fit(runs)
    assert "stack" not in off.cv_scores_
    forced = AutoSimulator(["linear", "mean"], cv_folds=3, memory="none").fit(runs)
    if forced.chosen_ == "stack":
        choice = forced.choice()
        assert set(choice["members"]) <= {"linear", "mean"}
        assert sum(choice["members"].values()) == pytest.approx(1.0)
        assert forced.describe().startswith("auto picked stack (")
    for a, b in itertools.pairwise(sorted(auto.cv_scores_.values())):
        assert a <= b


def test_sparse_runs_go_to_the_members_as_they_are(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On sparsely scored runs auto and stack do not wrap themselves in rounds of imputation
    (each would refit every member): the members fit the gaps, each its own way, and the
    held-out rollouts are scored on the recorded losses only."""
    from dataclasses import replace

    from simfluence.simulators import gaps

    runs = _runs()
    sparse = []
    for r in runs.runs:
        observed = np.zeros(r.losses.shape, dtype=bool)
        observed[::2] = True
        observed[-1] = True
        sparse.append(replace(r, losses=np.where(observed, r.losses, np.nan), observed=observed))
    gappy = RunSet(runs.train_ids, runs.test_ids, sparse)
    assert not gappy.complete
    seen: list[str] = []
    original = gaps.fit_with_gaps

    def spy(simulator, data):  # type: ignore[no-untyped-def]
        seen.append(simulator.name)
        return original(simulator, data)

    monkeypatch.setattr(gaps, "fit_with_gaps", spy)
    auto = AutoSimulator(["linear", "mean"], cv_folds=3, memory="none").fit(gappy)
    assert "auto" not in seen and "stack" not in seen and "linear" in seen
    assert np.isfinite(list(auto.cv_scores_.values())).all()
    stack = StackSimulator(["linear", "mean"], cv_folds=3, memory="none").fit(gappy)
    assert "stack" not in seen
    out = stack.simulate_many([runs.runs[0].curriculum], runs.runs[0].initial_loss[None])[0]
    assert np.isfinite(out).all() and out.shape == runs.runs[0].losses.shape


def test_auto_and_stack_tell_the_batch_size_their_members_learned() -> None:
    """A search builds curricula with the model's batch size: auto and stack give their first
    member's that has one; with the mean trajectory alone there is none to give."""
    runs = _runs()
    stack = StackSimulator(["mean", "linear"], cv_folds=3, memory="none").fit(runs)
    linear = LinearSimulator(memory="none").fit(runs)
    assert stack.batch_size_ == linear.batch_size_ == 2.0
    auto = AutoSimulator(["log-linear"], cv_folds=3, memory="none").fit(runs)
    assert auto.chosen_ == "log-linear" and auto.batch_size_ == 2.0
    alone = AutoSimulator(["mean"], cv_folds=3).fit(runs)
    assert getattr(alone, "batch_size_", None) is None


def test_a_tampered_stack_file_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """A saved stack whose members are not candidate methods, or whose weights do not match
    them, is a `SimfluenceError` naming the problem when it is used (no KeyError, no code)."""
    import json

    runs = _runs()
    stack = StackSimulator(["linear", "mean"], cv_folds=3, memory="none").fit(runs)
    stack.save(tmp_path / "stack.npz")
    data = dict(np.load(tmp_path / "stack.npz"))
    meta = json.loads(str(data["__meta__"]))
    for change, message in [
        (lambda m: m["learned"].update(members_=["os.system"] * len(stack.members_)), "not one of"),
        (lambda m: m["learned"].update(members_=["mean"] * 5), "do not match the weights"),
    ]:
        bad = json.loads(json.dumps(meta))
        change(bad)
        np.savez(tmp_path / "bad.npz", **{**data, "__meta__": np.array(json.dumps(bad))})
        loaded = load_simulator(tmp_path / "bad.npz")
        with pytest.raises(SimfluenceError, match=message):
            loaded.simulate_many([runs.runs[0].curriculum], runs.runs[0].initial_loss[None])
