"""The linear blend (`linear-blend`): its log side, its sides' settings, the simplex weights and
the cross-validation that chooses them, on tiny processes whose right answer is known."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from simfluence.counterfactual import leave_one_out
from simfluence.curricula import random_curriculum
from simfluence.errors import SimfluenceError
from simfluence.runlog import Run, RunSet
from simfluence.simulators import BlendSimulator, LinearSimulator, MeanTrajectorySimulator
from simfluence.simulators.blend import LOG_FLOOR_SHARE, log_runs, simplex_weights
from simfluence.synth import SynthConfig, generate

# 22 per run and batch 4: every epoch ends with a batch of 2, so batch weighting matters
SMALL = SynthConfig(pool=30, tests=4, runs=8, per_run=22, batch=4, epochs=1, seed=3)


def log_linear_runset(
    runs: int = 12, pool: int = 13, tests: int = 3, per_run: int = 12, batch: int = 3, seed: int = 0
) -> RunSet:
    """Noiseless runs of Simfluence-Linear on ``log L``: ``log L_t = sum_{i in c_t} (A_i log
    L_{t-1} + B_i)``, so ``L_t = exp(beta) L_{t-1}**alpha`` with ``alpha`` near 0.9, a power
    law that no model linear in ``L`` follows. Initial losses span 0.05..5 (log-uniform), so
    many losses are below 1 (negative logs). The last pool example is consumed by no run."""
    rng = np.random.default_rng(seed)
    ids = [f"x{i}" for i in range(pool)]
    A = (0.9 + 0.05 * rng.standard_normal((tests, pool))) / batch
    B = 0.2 * rng.standard_normal((tests, pool)) / batch
    out = []
    for r in range(runs):
        curriculum = random_curriculum(ids[:-1], per_run, batch, 1, np.random.default_rng(r))
        log_loss = np.empty((len(curriculum) + 1, tests))
        log_loss[0] = rng.uniform(np.log(0.05), np.log(5.0), tests)
        for t, b in enumerate(curriculum):
            cols = [ids.index(i) for i in b]
            log_loss[t + 1] = A[:, cols].sum(axis=1) * log_loss[t] + B[:, cols].sum(axis=1)
        out.append(Run(f"run-{r:02d}", curriculum, np.exp(log_loss), seed=r))
    return RunSet(ids, [f"z{j}" for j in range(tests)], out, {"batch_size": batch})


def _rollouts(sim, runs: RunSet) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return sim.simulate_many(
        [r.curriculum for r in runs.runs], np.stack([r.initial_loss for r in runs.runs])
    )


# -- the pieces ---------------------------------------------------------------------------------
def test_log_runs_takes_the_log_of_every_loss_above_the_floor() -> None:
    runs, _ = generate(SMALL)
    runs = replace(runs, source=Path("recorded/set"))
    runs.runs[0].losses[3, 1] = 0.0  # a loss at 0 is raised to the floor, not sent to -inf
    logged = log_runs(runs, 0.01)
    assert logged.train_ids == runs.train_ids and logged.test_ids == runs.test_ids
    assert logged.metadata == runs.metadata and logged.source == Path("recorded/set")
    for before, after in zip(runs.runs, logged.runs, strict=True):
        assert after.curriculum == before.curriculum and after.run_id == before.run_id
        np.testing.assert_allclose(after.losses, np.log(np.maximum(before.losses, 0.01)))
    assert logged.runs[0].losses[3, 1] == pytest.approx(np.log(0.01))


def test_simplex_weights_keep_to_their_grid() -> None:
    """The weights are the best point of the grid of spacing `step`, not a finer one: with
    the best mix at 0.31 / 0.69 the default grid (0.02) answers 0.30 / 0.70 or 0.32 / 0.68."""
    mix = np.array([0.31, 0.69])
    Q = np.eye(2)[None]  # error |w - mix|^2 = w Q w - 2 mix w + const
    w = simplex_weights(Q, mix[None])
    assert np.allclose(w * 50, np.round(w * 50)) and abs(w[0, 0] - 0.31) == pytest.approx(0.01)
    np.testing.assert_allclose(simplex_weights(Q, mix[None], step=0.1), [[0.3, 0.7]])
    np.testing.assert_allclose(simplex_weights(Q, mix[None], step=0.01), [mix])


# -- what the blend fits -----------------------------------------------------------------------
def test_blend_follows_a_process_linear_in_the_log_loss() -> None:
    """Runs linear in ``log L`` (a power law in ``L``): cross-validation puts the weight on the
    log side, and held-out rollouts reproduce the recorded losses, those below 1 included."""
    runs = log_linear_runset()
    train, held = runs.split(3)
    sim = BlendSimulator(l2=1e-6).fit(train)
    lowest = min(float(r.losses.min()) for r in train.runs)
    assert sim.log_floor_ == pytest.approx(LOG_FLOOR_SHARE * lowest)
    assert (sim.weight_[:, 1] >= 0.9).all(), sim.weight_
    losses = np.stack([r.losses for r in held.runs])
    assert (losses < 1).mean() > 0.3
    np.testing.assert_allclose(np.stack(_rollouts(sim, held)), losses, rtol=1e-3)
    # Simfluence-Linear on the loss itself does much worse on these runs
    linear = np.stack(_rollouts(LinearSimulator(l2=1e-6).fit(train), held))
    assert np.abs(linear - losses).max() > 0.05


def test_blend_log_floor_is_a_share_of_the_smallest_positive_loss() -> None:
    runs = log_linear_runset(runs=4)
    runs.runs[0].losses[2, 0] = 0.0  # a zero loss has no log: the floor ignores it
    runs.runs[1].losses[3, 1] = 0.02
    sim = BlendSimulator(l2=1.0).fit(runs)
    positive = np.concatenate([r.losses[r.losses > 0] for r in runs.runs])
    assert positive.min() < 1
    assert sim.log_floor_ == pytest.approx(LOG_FLOOR_SHARE * positive.min())
    for r in runs.runs:
        r.losses[:] = -r.losses
    with pytest.raises(SimfluenceError, match="no positive loss"):
        BlendSimulator(l2=1.0).fit(runs)


def test_blend_fits_on_two_runs_its_stated_minimum() -> None:
    """Two runs are enough: each side chooses its l2 by 2-fold cross-validation, and the folds
    of the blend's own cross-validation (one training run each) reuse those l2 values."""
    runs = log_linear_runset(runs=3)
    sim = BlendSimulator(l2_grid=[0.1, 10.0]).fit(runs.subset(runs.run_ids[:2]))
    np.testing.assert_allclose(sim.weight_.sum(axis=1), 1.0)
    assert sim.l2_loss_ in (0.1, 10.0) and sim.l2_log_ in (0.1, 10.0)
    with pytest.raises(SimfluenceError, match="at least 2 training runs"):
        BlendSimulator().fit(runs.subset(runs.run_ids[:1]))


@pytest.mark.parametrize("weighting", ["mean", "sum"])
def test_blend_sides_are_the_linear_simulators_of_its_parameters(weighting: str) -> None:
    """The loss side is `LinearSimulator` on the runs, the log side `LinearSimulator` on their
    logs, both with the blend's l2 and batch weighting; `sides` returns them configured so."""
    runs, _ = generate(SMALL)
    sim = BlendSimulator(l2=0.3, cv_folds=3, batch_weighting=weighting).fit(runs)
    assert sim.l2_loss_ == sim.l2_log_ == 0.3
    on_loss = LinearSimulator(l2=0.3, batch_weighting=weighting).fit(runs)
    on_log = LinearSimulator(l2=0.3, batch_weighting=weighting).fit(log_runs(runs, sim.log_floor_))
    np.testing.assert_allclose(sim.A_loss_, on_loss.A_)
    np.testing.assert_allclose(sim.B_loss_, on_loss.B_)
    np.testing.assert_allclose(sim.A_log_, on_log.A_)
    np.testing.assert_allclose(sim.B_log_, on_log.B_)
    loss_side, log_side, mean_side = sim.sides()
    for side in (loss_side, log_side):
        params = side.get_params()
        assert params["l2"] == 0.3 and params["cv_folds"] == 3
        assert params["batch_weighting"] == weighting and params["unseen"] == "error"
    # the sides are fitted simulators: attribution defaults to the recorded initial loss
    run = runs.runs[0]
    np.testing.assert_allclose(
        leave_one_out(loss_side, run.curriculum, None, sim.test_ids_[:1]).effects,
        leave_one_out(loss_side, run.curriculum, run.initial_loss, sim.test_ids_[:1]).effects,
    )
    np.testing.assert_array_equal(mean_side.initial_loss_, sim.initial_loss_)


def test_blend_l2_grid_and_defaults_are_those_of_its_sides() -> None:
    runs = log_linear_runset(runs=6)
    sim = BlendSimulator(l2_grid=[0.7]).fit(runs)
    assert sim.l2_loss_ == sim.l2_log_ == 0.7
    defaults, linear = BlendSimulator().get_params(), LinearSimulator().get_params()
    assert {k: defaults[k] for k in ("l2", "l2_grid", "cv_folds", "unseen")} == {
        k: linear[k] for k in ("l2", "l2_grid", "cv_folds", "unseen")
    }


def test_blend_unseen_examples_follow_the_unseen_setting() -> None:
    runs = log_linear_runset(runs=6)
    curriculum = [["x12", "x0", "x1"], ["x2", "x3", "x4"]]  # x12: consumed by no run
    prior = BlendSimulator(l2=0.1, unseen="prior").fit(runs)
    assert np.isfinite(prior.simulate(curriculum, runs.runs[0].initial_loss)).all()
    with pytest.raises(SimfluenceError, match="x12"):
        BlendSimulator(l2=0.1).fit(runs).simulate(curriculum, runs.runs[0].initial_loss)


def test_blend_is_the_weighted_mix_of_independently_fitted_sides() -> None:
    """``L = w1 linear + w2 exp(log-linear) + w3 mean``, each side fitted on its own: checked
    against `LinearSimulator` and `MeanTrajectorySimulator` fitted here, not against `sides`."""
    runs = log_linear_runset(runs=9)
    train, held = runs.split(3)
    sim = BlendSimulator(l2=0.05).fit(train)
    on_loss = LinearSimulator(l2=0.05).fit(train)
    on_log = LinearSimulator(l2=0.05).fit(log_runs(train, sim.log_floor_))
    on_log.floor_ = -np.inf  # log losses are negative below 1: no floor at 0 for them
    mean = MeanTrajectorySimulator().fit(train)
    initial = np.stack([r.initial_loss for r in held.runs])
    w = sim.weight_
    for k, traj in enumerate(_rollouts(sim, held)):
        run = held.runs[k]
        expected = (
            w[:, 0] * on_loss.simulate(run.curriculum, run.initial_loss)
            + w[:, 1] * np.exp(on_log.simulate(run.curriculum, np.log(run.initial_loss)))
            + w[:, 2] * mean.simulate(run.curriculum, run.initial_loss)
        )
        np.testing.assert_allclose(traj[1:], expected[1:], rtol=1e-9)
        np.testing.assert_array_equal(traj[0], initial[k])


def test_blend_weights_minimize_the_cross_validated_error_over_the_grid() -> None:
    """Brute force over the simplex grid: for each test example, the weights minimize the
    all-steps squared error of the sides' held-out rollouts, summed over the folds."""
    from simfluence.simulators.linear import run_folds

    runs, _ = generate(SMALL)
    sim = BlendSimulator(l2=0.3, cv_folds=3).fit(runs)
    n = 50
    grid = np.array([(a, b, n - a - b) for a in range(n + 1) for b in range(n + 1 - a)]) / n
    error = np.zeros((len(runs.test_ids), len(grid)))
    for train, valid in run_folds(runs, 3):
        on_loss = LinearSimulator(l2=0.3).fit(train)
        on_log = LinearSimulator(l2=0.3).fit(log_runs(train, sim.log_floor_))
        on_log.floor_ = -np.inf
        mean = MeanTrajectorySimulator().fit(train)
        for run in valid.runs:
            sides = [
                on_loss.simulate(run.curriculum, run.initial_loss),
                np.exp(on_log.simulate(run.curriculum, np.log(run.initial_loss))),
                mean.simulate(run.curriculum, run.initial_loss),
            ]
            blends = np.einsum("ga,atm->gtm", grid, np.stack(sides)[:, 1:])  # every grid point
            error += ((blends - run.losses[1:]) ** 2).sum(axis=1).T
    best = error.min(axis=1)
    chosen = [int(np.flatnonzero((grid == w).all(axis=1))[0]) for w in sim.weight_]
    np.testing.assert_allclose(error[np.arange(len(chosen)), chosen], best, rtol=1e-9)
    assert len({tuple(w) for w in sim.weight_}) > 1  # the test examples do differ
