"""`optimize_curriculum`'s contract, field by field, on a tiny calibrated simulator (tens of
milliseconds a search): the reported numbers against the library's own rollouts, intervals and
offsets computed by hand; the stopping rules (patience, evaluation budget, deadline, an
exhaustive neighbourhood); defaults; the fallback to a recorded curriculum."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from simfluence.counterfactual.search import (
    TRUST_REGION,
    optimize_curriculum,
    trust_region_rollouts,
)
from simfluence.errors import SimfluenceError
from simfluence.simulators import AdditiveSimulator
from simfluence.synth import SynthConfig, generate

SMALL = dict(n_random=8, proposals=24, max_evaluations=400)  # a search of tens of ms


@pytest.fixture(scope="module")
def fitted() -> tuple:
    runs, _ = generate(SynthConfig(pool=10, tests=3, runs=10, per_run=6, batch=2, epochs=1, seed=4))
    plain = AdditiveSimulator(unseen="prior").fit(runs)
    calibrated = AdditiveSimulator(unseen="prior").fit(runs).calibrate(runs)
    return runs, plain, calibrated


def test_a_calibrated_search_reports_its_numbers_consistently(fitted) -> None:  # type: ignore[no-untyped-def]
    _, _, sim = fitted
    result = optimize_curriculum(sim, 6, 2, level=0.8, **SMALL)
    assert result.source == "search" and result.trust_region == TRUST_REGION
    assert result.level == 0.8 and len(result.curriculum) == 3
    columns = np.arange(3)
    low, high = sim.objective_offsets(columns, 3, 0.8)
    confined = trust_region_rollouts(sim, [result.curriculum])[0]
    assert result.predicted == pytest.approx(confined[-1].mean(), abs=1e-12)
    assert result.objective == pytest.approx(result.predicted + high, abs=1e-12)
    np.testing.assert_allclose(result.random_predicted, result.random_objectives - high)
    unconstrained = sim.simulate(result.curriculum, sim.initial_loss_)[-1].mean()
    assert result.unconstrained == pytest.approx(unconstrained, abs=1e-12)
    assert result.interval == sim.mean_loss_interval(result.predicted, columns, 3, 0.8)
    assert result.gain_established == bool(result.interval[1] < result.random_predicted.mean())
    assert result.interval[0] == pytest.approx(result.predicted + low, abs=1e-12)


def test_without_the_trust_region_the_plain_rollout_is_searched(fitted) -> None:  # type: ignore[no-untyped-def]
    _, plain, _ = fitted
    result = optimize_curriculum(plain, 6, 2, trust_region=False, **SMALL)
    assert result.trust_region == "none" and result.interval is None
    assert result.gain_established is None and result.level == 0.9
    assert result.objective == pytest.approx(result.unconstrained, abs=1e-12)
    assert result.predicted == result.objective
    np.testing.assert_array_equal(result.random_predicted, result.random_objectives)


def test_an_uncalibrated_search_in_the_trust_region_credits_only_the_envelope(fitted) -> None:  # type: ignore[no-untyped-def]
    _, plain, _ = fitted
    result = optimize_curriculum(plain, 6, 2, **SMALL)
    assert result.trust_region == TRUST_REGION and result.interval is None
    confined = trust_region_rollouts(plain, [result.curriculum])[0]
    assert result.objective == pytest.approx(confined[-1].mean(), abs=1e-12)
    assert result.objective >= result.unconstrained - 1e-12


def test_an_initial_loss_of_ones_own_is_rolled_out_from(fitted) -> None:  # type: ignore[no-untyped-def]
    _, plain, _ = fitted
    initial = plain.initial_loss_ + 0.5
    result = optimize_curriculum(plain, 6, 2, initial_loss=initial, trust_region=False, **SMALL)
    expected = plain.simulate(result.curriculum, initial)[-1].mean()
    assert result.unconstrained == pytest.approx(expected, abs=1e-12)


def test_search_defaults(fitted) -> None:  # type: ignore[no-untyped-def]
    """One epoch, seed 0, the candidates the simulator saw, the greedy start, level 0.9."""
    _, plain, _ = fitted
    default = optimize_curriculum(plain, 4, 2, n_random=8, max_evaluations=300)
    explicit = optimize_curriculum(
        plain, 4, 2, epochs=1, seed=0, n_random=8, max_evaluations=300, include_unseen=False
    )
    assert default.curriculum == explicit.curriculum and len(default.curriculum) == 2
    np.testing.assert_array_equal(default.random_objectives, explicit.random_objectives)
    assert default.greedy_objective is not None and default.level == 0.9
    no_greedy = optimize_curriculum(plain, 4, 2, greedy=False, n_random=1, max_evaluations=50)
    assert no_greedy.greedy_objective is None and len(no_greedy.random_objectives) == 1


def test_search_stays_within_the_candidates_given(fitted) -> None:  # type: ignore[no-untyped-def]
    runs, plain, _ = fitted
    allowed = runs.train_ids[:5]
    result = optimize_curriculum(plain, 4, 2, candidates=allowed, **SMALL)
    assert {i for b in result.curriculum for i in b} <= set(allowed)


def test_unseen_examples_are_candidates_only_when_asked(fitted) -> None:  # type: ignore[no-untyped-def]
    runs = fitted[0]
    sim = AdditiveSimulator(unseen="prior").fit(
        type(runs)([*runs.train_ids, "never-consumed"], runs.test_ids, runs.runs, runs.metadata)
    )
    seen = len(runs.train_ids)
    with pytest.raises(SimfluenceError, match=f"the {seen} candidate"):
        optimize_curriculum(sim, seen + 1, 2, **SMALL)
    result = optimize_curriculum(sim, seen + 1, 2, include_unseen=True, **SMALL)
    assert "never-consumed" in {i for b in result.curriculum for i in b}


def test_stopping_rules(fitted) -> None:  # type: ignore[no-untyped-def]
    _, plain, _ = fitted
    base = dict(n_random=8, greedy=False, proposals=24)
    # the evaluation budget is spent by the random starts: no round
    spent = optimize_curriculum(plain, 6, 2, max_evaluations=8, **base)
    assert spent.evaluations == 8 and spent.history == []
    # a deadline already past: no round; a far one: rounds until patience runs out
    assert optimize_curriculum(plain, 6, 2, max_seconds=0.0, **base).history == []
    far = optimize_curriculum(plain, 6, 2, max_seconds=1000.0, **base)
    assert len(far.history) >= 1
    # patience 1: the first round without improvement is the last
    once = optimize_curriculum(plain, 6, 2, patience=1, **base)
    assert once.history and once.history[-1]["accepted"] == 0
    assert all(h["accepted"] for h in once.history[:-1])
    assert [h["round"] for h in once.history] == list(range(1, len(once.history) + 1))
    assert once.history[-1]["evaluations"] == once.evaluations


def test_an_exhaustive_neighbourhood_stops_at_its_first_idle_round(fitted) -> None:  # type: ignore[no-untyped-def]
    """One batch per epoch and every swap-in proposed: a round that improves nothing proves
    a local optimum, so the search ends there even with patience left."""
    _, plain, _ = fitted
    result = optimize_curriculum(plain, 2, 2, patience=5, proposals=512, n_random=4)
    idle = [h for h in result.history if not h["accepted"]]
    assert len(idle) == 1 and result.history[-1] is idle[0]


def test_a_better_recorded_curriculum_is_returned_with_its_own_numbers(fitted) -> None:  # type: ignore[no-untyped-def]
    """A recorded run of the same layout whose actual final loss is below the search's
    pessimistic objective is returned: its curriculum, its recorded loss as `predicted`, the
    interval around that as `objective`'s upper end."""
    runs, _, sim = fitted
    result = optimize_curriculum(sim, 6, 2, recorded=runs, n_random=2, max_evaluations=2)
    assert result.source.startswith("recorded ")
    run = runs.run(result.source.split(" ", 1)[1])
    assert result.curriculum == [list(b) for b in run.curriculum]
    assert result.predicted == pytest.approx(run.losses[-1].mean(), abs=1e-12)
    columns = np.arange(3)
    assert result.interval == sim.mean_loss_interval(result.predicted, columns, 3, 0.9)
    assert result.objective == result.interval[1]
    best = min(r.losses[-1].mean() for r in runs.runs)
    assert result.predicted == pytest.approx(best, abs=1e-12)
    expected = sim.simulate(run.curriculum, run.initial_loss)[-1].mean()
    assert result.unconstrained == pytest.approx(expected, abs=1e-12)


# -- the vectorized evaluator -----------------------------------------------------------------
def _layouts(pool_size: int, n: int, epochs: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([
        np.stack([rng.permutation(pool_size)[:size] for _ in range(epochs)]) for _ in range(n)
    ])  # fmt: skip


@pytest.mark.parametrize("trust_region", [True, False])
def test_the_evaluator_equals_the_rollouts_of_a_time_varying_simulator(trust_region: bool) -> None:
    """The search's direct rollout of a dynamics simulator (time-varying effects, a ragged last
    batch, a subset of test examples, with and without the envelope) gives what the library's
    rollouts report, floor included."""
    from simfluence.counterfactual.search.evaluator import _Evaluator
    from simfluence.simulators.featurized import FeaturizedSimulator

    runs, _ = generate(SynthConfig(pool=10, tests=4, runs=8, per_run=5, batch=2, epochs=1, seed=6))
    sim = FeaturizedSimulator(time_varying=True, n_components=2, l2=1.0).fit(runs)
    assert sim.A_slope_ is not None and sim.B_slope_ is not None
    columns = np.array([1, 3])
    initial = sim.initial_loss_ - 0.3  # low enough for the floor and the envelope to bind
    envelope = np.asarray(sim.envelope_, dtype=np.float64) if trust_region else None
    evaluate = _Evaluator(sim, columns, initial, 2, envelope, offset=0.25)
    layouts = _layouts(10, 6, 2, 5, seed=1)
    curricula = [evaluate.curriculum(layout) for layout in layouts]
    if trust_region:
        rollouts = trust_region_rollouts(sim, curricula, initial)
    else:
        rollouts = sim.simulate_many(curricula, initial)
    expected = np.array([r[-1, columns].mean() for r in rollouts])
    np.testing.assert_allclose(evaluate.predict(layouts), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(evaluate(layouts), expected + 0.25, rtol=1e-10, atol=1e-12)
    assert evaluate.count == 12


@pytest.mark.parametrize("trust_region", [True, False])
def test_the_evaluator_of_other_simulators_goes_through_their_rollouts(
    fitted, trust_region: bool
) -> None:  # type: ignore[no-untyped-def]
    from simfluence.counterfactual.search.evaluator import _Evaluator
    from simfluence.simulators import MeanTrajectorySimulator

    runs = fitted[0]
    sim = MeanTrajectorySimulator().fit(runs)
    initial = sim.initial_loss_ - 0.5
    envelope = np.asarray(sim.envelope_) if trust_region else None
    evaluate = _Evaluator(sim, np.array([0, 2]), initial, 2, envelope)
    layouts = _layouts(10, 3, 1, 6, seed=2)
    curricula = [evaluate.curriculum(layout) for layout in layouts]
    rollouts = (trust_region_rollouts if trust_region else _plain)(sim, curricula, initial)
    expected = [r[-1, [0, 2]].mean() for r in rollouts]
    np.testing.assert_allclose(evaluate(layouts), expected, rtol=1e-12)


def _plain(sim, curricula, initial):  # type: ignore[no-untyped-def]
    return sim.simulate_many(curricula, initial)


# -- the statement ----------------------------------------------------------------------------
def _result(**fields):  # type: ignore[no-untyped-def]
    from simfluence.counterfactual.search import SearchResult

    defaults = dict(predicted=1.0, random_predicted=np.array([1.5, 2.5]), level=0.8)
    return SearchResult([["a"]], 1.2, np.array([2.0]), None, **(defaults | fields))


@pytest.mark.parametrize(
    ("fields", "sentence"),
    [
        (
            dict(),
            "predicted 1 against 2 for random curricula of the same size; the simulator is not "
            "calibrated, so the uncertainty of this gain is unknown (calibrate it: `simfluence "
            "fit` does by default)",
        ),
        (
            dict(interval=(0.8, 1.2), gain_established=True),
            "predicted 1 (80% interval 0.8 to 1.2) against 2 for random curricula of the same "
            "size: a gain of 1, larger than the uncertainty",
        ),
        (
            dict(interval=(0.5, 2.25), gain_established=False, predicted=1.25),
            "the predicted gain over random curricula of the same size (0.75: 1.25 against 2) is "
            "within the uncertainty (80% interval 0.5 to 2.25): no curriculum is predicted to be "
            "reliably better than a random one",
        ),
        (
            dict(interval=(0.8, 1.2), gain_established=True, source="recorded r7"),
            "no searched curriculum is predicted, pessimistically, to beat the best recorded one: "
            "returning the curriculum of r7, whose recorded final loss was 1 (80% interval 0.8 to "
            "1.2) against 2 predicted for random curricula of the same size: a gain larger than "
            "the uncertainty",
        ),
        (
            dict(interval=(0.5, 2.25), gain_established=False, source="recorded r7", level=0.95),
            "no searched curriculum is predicted, pessimistically, to beat the best recorded one: "
            "returning the curriculum of r7, whose recorded final loss was 1 (95% interval 0.5 to "
            "2.25) against 2 predicted for random curricula of the same size: a gain within the "
            "uncertainty",
        ),
    ],
)
def test_the_statement_says_the_gain_and_its_uncertainty(fields: dict, sentence: str) -> None:
    from simfluence.counterfactual.search.result import _statement

    assert _statement(_result(**fields)) == sentence


def test_a_binding_envelope_is_what_the_search_is_credited_with(fitted) -> None:  # type: ignore[no-untyped-def]
    """Where the recorded envelope binds (here: as if no recorded run had ever gone below its
    initial losses), the search is credited with the confined rollout only: its objective is
    the trust-region rollout's mean final loss, strictly above the unconstrained prediction."""
    _, plain, _ = fitted
    confined_sim = copy.deepcopy(plain)
    floor = plain.initial_loss_  # (M,)
    confined_sim.envelope_ = np.broadcast_to(floor, plain.envelope_.shape).copy()
    result = optimize_curriculum(confined_sim, 6, 2, **SMALL)
    confined = trust_region_rollouts(confined_sim, [result.curriculum])[0]
    assert result.objective == pytest.approx(confined[-1].mean(), abs=1e-12)
    assert result.objective >= floor.mean() - 1e-12
    assert result.objective > result.unconstrained + 0.01
    assert result.random_objectives.min() >= floor.mean() - 1e-12  # the random starts too


def test_documented_search_defaults() -> None:
    """docs/counterfactuals.md: 64 random starts, up to 512 neighbours a round, 3 idle rounds,
    a budget of 200000 rollouts; at most 8 disjoint moves applied together."""
    import inspect

    defaults = {
        name: p.default for name, p in inspect.signature(optimize_curriculum).parameters.items()
    }
    assert defaults["n_random"] == 64 and defaults["proposals"] == 512
    assert defaults["patience"] == 3 and defaults["max_evaluations"] == 200_000
    assert defaults["max_accept"] == 8 and defaults["level"] == 0.9


@pytest.mark.parametrize("patience", [1, 2])
def test_the_search_ends_after_patience_idle_rounds(fitted, patience: int) -> None:  # type: ignore[no-untyped-def]
    """With fewer proposals than neighbours (not exhaustive), the search stops after
    `patience` consecutive rounds without improvement, long before its evaluation budget."""
    _, plain, _ = fitted
    result = optimize_curriculum(
        plain, 6, 2, n_random=4, greedy=False, proposals=4, patience=patience,
        max_evaluations=100_000,
    )  # fmt: skip
    assert result.evaluations < 5_000
    accepted = [h["accepted"] for h in result.history]
    assert accepted[-patience:] == [0] * patience
    assert all(accepted[-patience - 1 : -patience])  # the round before them improved


def test_a_recorded_curriculum_is_judged_on_the_objectives_test_examples(fitted) -> None:  # type: ignore[no-untyped-def]
    """With an objective of one test example, the recorded run returned is the one whose
    actual final loss of that example is lowest, not the one with the lowest mean."""
    runs, _, sim = fitted
    target = runs.test_ids[2]
    result = optimize_curriculum(
        sim, 6, 2, objective=[target], recorded=runs, n_random=2, max_evaluations=2
    )
    assert result.source.startswith("recorded ")
    best = min(r.losses[-1, 2] for r in runs.runs)
    assert result.predicted == pytest.approx(best, abs=1e-12)
    assert best != min(r.losses[-1].mean() for r in runs.runs)


def test_an_uncalibrated_search_returns_a_recorded_curriculum_at_its_actual_loss(fitted) -> None:  # type: ignore[no-untyped-def]
    """Uncalibrated, a better recorded curriculum is returned with no interval: its objective
    is its actual final loss."""
    runs, plain, _ = fitted
    result = optimize_curriculum(plain, 6, 2, recorded=runs, n_random=2, max_evaluations=2)
    assert result.source.startswith("recorded ") and result.interval is None
    assert result.gain_established is None
    best = min(r.losses[-1].mean() for r in runs.runs)
    assert result.objective == result.predicted == pytest.approx(best, abs=1e-12)


def test_a_simulator_without_an_envelope_is_searched_unconfined(fitted) -> None:  # type: ignore[no-untyped-def]
    """A simulator with no recorded envelope (a model saved before there was one) is searched
    on its plain rollouts, and the result says so."""
    _, plain, _ = fitted
    bare = copy.deepcopy(plain)
    del bare.envelope_
    result = optimize_curriculum(bare, 6, 2, **SMALL)
    unconfined = optimize_curriculum(plain, 6, 2, trust_region=False, **SMALL)
    assert result.trust_region == "none"
    assert result.curriculum == unconfined.curriculum
    assert result.objective == pytest.approx(result.unconstrained, abs=1e-12)


def test_the_level_shapes_the_pessimistic_objective_and_the_interval(fitted) -> None:  # type: ignore[no-untyped-def]
    """At level 0.5 the searched objective is the prediction plus the 0.5 interval's upper
    offset (not the default 0.9's), and the reported interval is the 0.5 one."""
    _, _, sim = fitted
    result = optimize_curriculum(sim, 6, 2, level=0.5, n_random=4, greedy=False, max_evaluations=4)
    columns = np.arange(3)
    high = sim.objective_offsets(columns, 3, 0.5)[1]
    assert high != sim.objective_offsets(columns, 3, 0.9)[1]
    assert result.objective == pytest.approx(result.predicted + high, abs=1e-12)
    np.testing.assert_allclose(result.random_objectives, result.random_predicted + high)
    assert result.interval == sim.mean_loss_interval(result.predicted, columns, 3, 0.5)


def test_a_gain_is_established_when_the_upper_end_beats_the_random_mean(fitted) -> None:  # type: ignore[no-untyped-def]
    """A search whose pessimistic objective is below the random starts' mean prediction
    establishes its gain (here a simulator calibrated to tiny held-out errors)."""
    _, _, calibrated = fitted
    sim = copy.deepcopy(calibrated)
    sim.calibration_residuals_ = np.full_like(sim.calibration_residuals_, 1e-4)
    result = optimize_curriculum(sim, 6, 2, **SMALL)
    assert result.interval[1] < result.random_predicted.mean()
    assert result.gain_established is True


def test_default_proposals_and_moves_per_round_are_512_and_8() -> None:
    """On a neighbourhood larger than 512 (20 of 40 examples, 10 batches), a default search is
    the search with 512 proposals and up to 8 moves a round; 513 or 9 give another one (so
    this test can see a changed default)."""
    runs, _ = generate(SynthConfig(pool=40, tests=2, runs=6, per_run=20, batch=2, epochs=1, seed=0))
    sim = AdditiveSimulator(unseen="prior").fit(runs)
    small = dict(n_random=2, greedy=False, max_evaluations=1100, trust_region=False)
    default = optimize_curriculum(sim, 20, 2, **small)
    explicit = optimize_curriculum(sim, 20, 2, proposals=512, max_accept=8, **small)
    assert default.history == explicit.history and default.curriculum == explicit.curriculum
    for other in (dict(proposals=513), dict(max_accept=9)):
        assert optimize_curriculum(sim, 20, 2, **other, **small).history != default.history


def test_only_a_strictly_better_recorded_curriculum_of_the_layout_replaces_the_found_one(
    fitted,
) -> None:  # type: ignore[no-untyped-def]
    """A recorded run replaces the found curriculum only if it follows the layout (here 6
    distinct examples once each, in batches of 2: a run repeating examples in batches of the
    same sizes does not, however low its loss) and its actual loss is strictly below the found
    objective (a tie keeps what was found)."""
    from simfluence.counterfactual.search.optimize import _prefer_recorded
    from simfluence.runlog.runs import Run

    runs, plain, _ = fitted
    ids = runs.train_ids
    cheat = Run("cheat", [[ids[0], ids[0]], [ids[1], ids[1]], [ids[2], ids[2]]], np.zeros((4, 3)))
    recorded = type(runs)(runs.train_ids, runs.test_ids, [*runs.runs, cheat], runs.metadata)
    columns = np.arange(3)
    best = min(r.losses[-1].mean() for r in runs.runs)
    found = optimize_curriculum(plain, 6, 2, n_random=2, max_evaluations=2)
    tie = copy.deepcopy(found)
    tie.objective = best
    _prefer_recorded(tie, recorded, plain, columns, 6, 1)
    assert tie.source == "search" and tie.curriculum == found.curriculum
    worse = copy.deepcopy(found)
    worse.objective = best + 1.0
    _prefer_recorded(worse, recorded, plain, columns, 6, 1)
    assert worse.source != "recorded cheat" and worse.predicted == pytest.approx(best, abs=1e-12)


def test_assessing_a_curriculum_without_recorded_runs_rolls_it_out(fitted) -> None:  # type: ignore[no-untyped-def]
    """Without recorded runs, a curriculum is assessed by its trust-region rollout."""
    from simfluence.counterfactual.search import assess_curriculum

    runs, plain, _ = fitted
    curriculum = runs.runs[0].curriculum
    predicted, interval, source = assess_curriculum(plain, curriculum)
    expected = trust_region_rollouts(plain, [curriculum])[0][-1].mean()
    assert source == "search" and interval is None
    assert predicted == pytest.approx(expected, abs=1e-12)


def test_an_integer_initial_loss_is_searched_from_as_floats(fitted) -> None:  # type: ignore[no-untyped-def]
    """Initial losses given as integers are the same starting point as the equal floats."""
    _, plain, _ = fitted
    ints = optimize_curriculum(plain, 6, 2, initial_loss=np.array([2, 1, 3]), **SMALL)
    floats = optimize_curriculum(plain, 6, 2, initial_loss=np.array([2.0, 1.0, 3.0]), **SMALL)
    assert ints.curriculum == floats.curriculum and ints.objective == floats.objective
