"""What the curriculum search reports: the trust region's rollouts (against a step-by-step
reference), `assess_curriculum` on recorded and new curricula, the result's JSON, and which
recorded runs count as following the search's layout."""

from __future__ import annotations

import numpy as np
import pytest

from simfluence.counterfactual.search import SearchResult, assess_curriculum, trust_region_rollouts
from simfluence.counterfactual.search.optimize import _is_layout
from simfluence.simulators import LinearSimulator, MeanTrajectorySimulator
from simfluence.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def small_runs():
    config = SynthConfig(pool=12, tests=3, runs=6, per_run=8, batch=4, epochs=2, seed=4)
    return generate(config)[0]


def _known_simulator() -> LinearSimulator:
    """Hand-set parameters (2 test examples, 3 training examples, batch size 2), no envelope:
    like a simulator file saved before the trust region existed."""
    sim = LinearSimulator()
    sim.train_ids_ = ["x0", "x1", "x2"]
    sim.test_ids_ = ["t0", "t1"]
    sim.initial_loss_ = np.array([2.0, 1.5])
    sim.seen_ = np.ones(3, dtype=bool)
    sim.batch_size_ = 2.0
    sim.A_ = np.array([[0.45, 0.40, 0.50], [0.42, 0.48, 0.38]])
    sim.B_ = np.array([[-0.10, 0.05, -0.20], [0.02, -0.15, -0.05]])
    sim.floor_, sim.floor_width_ = -100.0, 0.0
    return sim


CURRICULA = [[["x0", "x1"], ["x2"], ["x1", "x2"]], [["x2", "x2"], ["x0"]]]


def test_without_an_envelope_the_trust_region_is_plain_simulation() -> None:
    sim = _known_simulator()
    assert not hasattr(sim, "envelope_")
    start = np.array([3.0, 2.5])
    got = trust_region_rollouts(sim, CURRICULA, start)
    want = sim.simulate_many(CURRICULA, np.stack([start, start]))
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert got[0][0].tolist() == [3.0, 2.5]
    default = trust_region_rollouts(sim, CURRICULA[:1])[0]
    assert default[0].tolist() == [2.0, 1.5]  # no initial loss given: the simulator's own


def _bent(value: np.ndarray, floor: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The soft floor by its formula: ``floor + w^2 / (floor + 2w - v)`` below ``floor + w``."""
    knee = floor + width
    return np.where(value < knee, floor + width**2 / (knee + width - value), value)


def test_trust_region_rollout_is_clamped_at_every_step_then_softly_floored() -> None:
    """Step by step: one step of the simulator, raised to the envelope's row of that step (the
    last row beyond it); the rollout goes on from the raised value; what is reported is then
    bent by the soft floor (steps 1.. only)."""
    sim = _known_simulator()
    sim.envelope_ = np.array([[9.0, 9.0], [1.9, 0.0], [0.0, 0.9]])  # rows: steps 0, 1, 2+
    sim.floor_, sim.floor_width_ = np.array([0.5, 0.6]), np.array([1.5, 0.2])
    start = np.array([2.0, 1.5])
    free = _known_simulator()  # no floor, no envelope: one plain step at a time
    for curriculum, got in zip(
        CURRICULA, trust_region_rollouts(sim, CURRICULA, start), strict=True
    ):
        loss, rows = start, [start]
        for t, batch in enumerate(curriculum, start=1):
            loss = free.simulate([batch], loss)[-1]
            loss = np.maximum(loss, sim.envelope_[min(t, 2)])
            rows.append(loss)
        want = np.array(rows)
        want[1:] = _bent(want[1:], sim.floor_, sim.floor_width_)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert got[1, 0] != pytest.approx(1.9)  # the bend is in reach at step 1


def test_trust_region_of_a_simulator_without_parameters() -> None:
    """The curriculum-blind mean is clamped row by row (the last envelope row beyond it)."""
    config = SynthConfig(pool=12, tests=3, runs=4, per_run=8, batch=4, epochs=1, seed=5)
    runs = generate(config)[0]
    mean = MeanTrajectorySimulator().fit(runs)
    mean.floor_, mean.floor_width_ = -100.0, 0.0
    mean.envelope_ = np.array([[0.0] * 3, [5.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    start = mean.initial_loss_ + 0.25
    curriculum = runs.runs[0].curriculum  # 2 steps
    longer = curriculum + curriculum  # 4 steps: rows 3 and 4 use the envelope's last row
    got = trust_region_rollouts(mean, [curriculum, longer], start)
    plain = mean.simulate_many([curriculum, longer], np.stack([start, start]))
    assert [g.shape[0] for g in got] == [3, 5]
    for g, p in zip(got, plain, strict=True):
        np.testing.assert_array_equal(g[0], start)
        rows = np.minimum(np.arange(1, g.shape[0]), 2)
        np.testing.assert_array_equal(g[1:], np.maximum(p[1:], mean.envelope_[rows]))
    assert got[0][1, 0] == 5.0 and got[1][4, 2] == 4.0


def test_assess_curriculum_reports_recorded_outcomes_and_searched_ones(small_runs) -> None:
    """A recorded curriculum is judged by its actual final loss (the objective's test examples
    averaged); any other by the trust-region rollout; intervals at the level asked for."""
    sim = LinearSimulator(l2=1.0).calibrate(small_runs, n_folds=3)
    run = small_runs.runs[2]
    columns = np.array([0, 2])
    objective = [small_runs.test_ids[0], small_runs.test_ids[2]]
    predicted, interval, source = assess_curriculum(sim, run.curriculum, objective, small_runs)
    assert source == f"recorded {run.run_id}"
    assert predicted == float(run.losses[-1, columns].mean())
    assert predicted != float(run.losses[-2, columns].mean())
    steps = len(run.curriculum)
    assert interval == sim.mean_loss_interval(predicted, columns, steps, 0.9)
    new = [list(reversed(b)) for b in reversed(run.curriculum)]
    predicted, interval, source = assess_curriculum(sim, new, objective, small_runs, level=0.2)
    assert source == "search"
    rollout = trust_region_rollouts(sim, [new])[0]
    assert predicted == float(rollout[-1, columns].mean())
    assert interval == sim.mean_loss_interval(predicted, columns, steps, 0.2)
    assert interval != sim.mean_loss_interval(predicted, columns, steps, 0.9)


def test_a_recorded_run_follows_the_layout_only_with_k_examples_each_e_times() -> None:
    assert _is_layout([["a", "b"], ["b", "a"]], 2, 2)
    assert not _is_layout([["a", "b"], ["a", "a"]], 2, 2)  # 2 distinct, but 3 + 1 times
    assert not _is_layout([["a", "b"], ["c", "d"]], 2, 1)  # once each, but 4 distinct
    assert not _is_layout([["a", "b"], ["c", "d"]], 2, 2)


def test_search_result_json_names_every_number() -> None:
    result = SearchResult(
        curriculum=[["a"]],
        objective=1.25,
        random_objectives=np.array([1.5, 1.75]),
        greedy_objective=1.3,
        history=[{"round": 1, "evaluations": 10, "objective": 1.25, "accepted": 2}],
        evaluations=10,
        seconds=0.5,
        predicted=1.1,
        interval=(1.0, 1.25),
        unconstrained=0.9,
        random_predicted=np.array([1.4, 1.6]),
        gain_established=True,
        statement="better",
        trust_region="the region",
        level=0.8,
        source="recorded run-3",
    )
    assert result.to_json() == {
        "objective": 1.25,
        "predicted": 1.1,
        "interval": [1.0, 1.25],
        "level": 0.8,
        "unconstrained": 0.9,
        "random_predicted_mean": pytest.approx(1.5),
        "random_objectives": [1.5, 1.75],
        "gain_established": True,
        "statement": "better",
        "source": "recorded run-3",
        "trust_region": "the region",
        "greedy_objective": 1.3,
        "evaluations": 10,
        "seconds": 0.5,
        "history": [{"round": 1, "evaluations": 10, "objective": 1.25, "accepted": 2}],
    }
    bare = SearchResult([["a"]], 1.0, np.array([1.0]), None).to_json()
    assert bare["interval"] is None and bare["random_predicted_mean"] is None
    assert bare["level"] == 0.9 and bare["source"] == "search"
