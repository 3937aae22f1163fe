"""Attribution views against hand-computed answers on tiny simulators with known parameters:
the per-example decomposition of each step (constant, additive and drifting effects), what the
loss floor adds, zero-weight removal, the intervals' flags and JSON, and ties."""

from __future__ import annotations

import numpy as np
import pytest

from simfluence.counterfactual import leave_one_out, pair_interactions, step_contributions
from simfluence.counterfactual.attribution import (
    FLOOR_KEY,
    INTERVAL_NOTE,
    LeaveOneOut,
    StepContributions,
    attribution_views,
    removal_effects,
)
from simfluence.simulators import LinearSimulator

#: 6 steps over a pool of 3 (more steps than examples), uneven batches, repeats in a batch
CURRICULUM = [["x0", "x1"], ["x2"], ["x1", "x1", "x0"], ["x2", "x0"], ["x1"], ["x0", "x2"]]


def known_simulator(
    additive: bool = False,
    drift: str = "",
    weighting: str = "mean",
    pool: int = 3,
    seed: int = 0,
) -> LinearSimulator:
    """A Simfluence-Linear simulator with hand-set parameters (2 test examples, `pool` training
    examples, batch size 2, initial loss 2, no floor in reach). ``drift``: "" (constant
    effects), "B" (drifting B only: additive simulators) or "AB" (both drift), over a time
    scale of 3 steps."""
    rng = np.random.default_rng(seed)
    sim = LinearSimulator(batch_weighting=weighting)
    sim.train_ids_ = [f"x{k}" for k in range(pool)]
    sim.test_ids_ = ["t0", "t1"]
    sim.initial_loss_ = np.array([2.0, 1.5])
    sim.seen_ = np.ones(pool, dtype=bool)
    sim.batch_size_ = 2.0
    sim.A_ = None if additive else rng.uniform(0.35, 0.55, (2, pool))
    sim.B_ = rng.uniform(-0.2, 0.1, (2, pool))
    if drift:
        sim.time_scale_ = 3.0
        sim.B_slope_ = rng.uniform(-0.1, 0.1, (2, pool))
        sim.A_slope_ = rng.uniform(-0.05, 0.05, (2, pool)) if "A" in drift else None
    sim.floor_, sim.floor_width_ = -100.0, 0.0
    return sim


def reference_steps(sim: LinearSimulator, curriculum, columns) -> tuple[np.ndarray, list[dict]]:
    """Loop over steps and examples: the objective after each step and each example's
    contribution ``n_ti [w_t (A_i L_{t-1} + B_i) - L_{t-1} / |c_t|]`` (additive: ``n_ti w_t
    B_i``), with ``A_i + tau_t A'_i``, ``tau_t = min((t - 1) / time_scale, 1)``."""
    index = {t: k for k, t in enumerate(sim.train_ids_)}
    loss = sim.initial_loss_[columns].astype(float)
    objective, contributions = [loss.mean()], []
    for t, batch in enumerate(curriculum, start=1):
        tau = min((t - 1) / sim.time_scale_, 1.0) if sim.time_scale_ else 0.0
        w = sim.batch_size_ / len(batch) if sim.batch_weighting == "mean" else 1.0
        step: dict[str, float] = {}
        total = np.zeros_like(loss)
        for i in batch:
            k = index[i]
            b = sim.B_[columns, k] + (tau * sim.B_slope_[columns, k] if tau else 0.0)
            if sim.A_ is None:
                c = w * b
            else:
                a = sim.A_[columns, k]
                if tau and sim.A_slope_ is not None:
                    a = a + tau * sim.A_slope_[columns, k]
                c = w * (a * loss + b) - loss / len(batch)
            step[i] = step.get(i, 0.0) + float(c.mean())
            total += c
        loss = loss + total
        objective.append(loss.mean())
        contributions.append(step)
    return np.array(objective), contributions


CASES = [
    ("constant", dict()),
    ("additive", dict(additive=True)),
    ("drifting A and B", dict(drift="AB")),
    ("additive, drifting", dict(additive=True, drift="B")),
    ("sum weighting, drifting", dict(drift="AB", weighting="sum")),
]


@pytest.mark.parametrize(("case", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_step_contributions_equal_the_per_example_formula(case: str, kwargs: dict) -> None:
    """Each example's credit at each step is its own term of the step's update, worked out by
    hand (a wrong sign, a divided term, the wrong step's drift all change it); with no floor in
    reach there is no "(floor)" entry to absorb a mistake."""
    sim = known_simulator(**kwargs)
    columns = np.array([0, 1])
    objective, expected = reference_steps(sim, CURRICULUM, columns)
    result = step_contributions(sim, CURRICULUM, None, ["t0", "t1"])
    np.testing.assert_allclose(result.trajectory, objective, rtol=1e-12)
    np.testing.assert_allclose(result.change, np.diff(objective), rtol=1e-12, atol=1e-15)
    assert result.contributions is not None
    for got, want in zip(result.contributions, expected, strict=True):
        assert FLOOR_KEY not in got
        assert set(got) == set(want)
        for i in want:
            assert got[i] == pytest.approx(want[i], rel=1e-12, abs=1e-15)


def test_the_floor_entry_is_what_the_floor_added() -> None:
    """A step whose simulated loss falls below the floor is raised to it (hard floor); its
    "(floor)" entry is exactly that rise, and steps before it have none."""
    free = known_simulator(additive=True, seed=1)
    free.B_[:] = -0.15  # every step of two (w = 1) lowers the loss by 0.3
    curriculum = [["x0", "x1"], ["x2", "x0"], ["x1", "x2"], ["x0", "x2"]]
    unfloored = free.simulate(curriculum, free.initial_loss_)[:, 0]
    np.testing.assert_allclose(unfloored, [2.0, 1.7, 1.4, 1.1, 0.8], rtol=1e-12)
    floored = known_simulator(additive=True, seed=1)
    floored.B_[:] = -0.15
    floored.floor_ = np.array([1.0, -100.0])
    result = step_contributions(floored, curriculum, None, "t0")
    assert [FLOOR_KEY in step for step in result.contributions] == [False, False, False, True]
    # step 4 would reach 0.8 and is raised to the floor 1.0: the floor added 0.2
    assert result.trajectory[-1] == pytest.approx(1.0)
    assert result.contributions[3][FLOOR_KEY] == pytest.approx(0.2, rel=1e-9)
    assert sum(result.contributions[3].values()) == pytest.approx(result.change[3], abs=1e-15)


def test_no_floor_entry_from_rounding_at_a_large_loss_scale() -> None:
    """At losses in the thousands the contributions' sum differs from the step's change by
    float rounding only: no "(floor)" entry may appear from it."""
    sim = known_simulator(seed=2)
    sim.initial_loss_ = np.array([3.0e4, 1.7e4])
    sim.B_ *= 1.0e3  # the loss stays positive, far above the floor
    result = step_contributions(sim, CURRICULUM * 3, None, ["t0", "t1"])
    assert result.trajectory[-1] > 100.0
    assert not any(FLOOR_KEY in step for step in result.contributions)


# -- zero-weight removal ------------------------------------------------------------------------
def _neutralized(sim: LinearSimulator, curriculum, group: set[str]):
    """The reference of zero-weight removal: a twin simulator with one more training id that
    has no effect (``A = 1/b``, ``B = 0``, no drift), consumed in place of the group's ids."""
    twin = known_simulator()
    for name in ("train_ids_", "seen_", "A_", "B_", "A_slope_", "B_slope_"):
        value = getattr(sim, name)
        setattr(twin, name, value)
    twin.time_scale_, twin.initial_loss_ = sim.time_scale_, sim.initial_loss_
    twin.batch_weighting, twin.batch_size_ = sim.batch_weighting, sim.batch_size_
    twin.train_ids_ = [*sim.train_ids_, "neutral"]
    twin.seen_ = np.append(sim.seen_, True)
    pad = np.zeros((len(sim.test_ids_), 1))
    twin.B_ = np.hstack([sim.B_, pad])
    if sim.A_ is not None:
        twin.A_ = np.hstack([sim.A_, pad + 1.0 / sim.batch_size_])
    for name in ("A_slope_", "B_slope_"):
        if getattr(sim, name) is not None:
            setattr(twin, name, np.hstack([getattr(sim, name), pad]))
    edited = [["neutral" if i in group else i for i in batch] for batch in curriculum]
    return twin.simulate(edited, sim.initial_loss_)[-1]


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(additive=True), dict(additive=True, drift="B"), dict(drift="AB")]
)
def test_zero_weight_removal_equals_a_neutral_stand_in(kwargs: dict) -> None:
    """Zero-weight removal of a group = the same batches with the group's consumptions replaced
    by an example of no effect; for each group, including one the curriculum never consumes
    (effect exactly 0)."""
    sim = known_simulator(**kwargs)
    columns = np.array([0, 1])
    full = sim.simulate(CURRICULUM, sim.initial_loss_)[-1]
    groups = [["x0"], ["x1", "x2"], ["x3-never"], ["x2"]]
    sim.unseen = "prior"
    got = removal_effects(sim, CURRICULUM, sim.initial_loss_, columns, groups, "zero-weight")
    for g, row in zip(groups, got, strict=True):
        want = full - _neutralized(sim, CURRICULUM, set(g))
        np.testing.assert_allclose(row, want, rtol=1e-12, atol=1e-15)
    assert np.all(got[2] == 0.0)


def test_zero_weight_removal_of_an_unconsumed_example_is_no_change() -> None:
    """The curriculum consumes only part of the pool: zero-weighting an example outside it
    (here the pool's last one) changes nothing."""
    sim = known_simulator(pool=5)
    curriculum = [["x0", "x1"], ["x1", "x2"]]
    got = removal_effects(
        sim, curriculum, sim.initial_loss_, np.array([0, 1]), [["x4"]], "zero-weight"
    )
    np.testing.assert_array_equal(got, np.zeros((1, 2)))


def test_pair_interactions_under_zero_weight_removal() -> None:
    """With ``removal="zero-weight"`` the singles are zero-weight leave-one-out effects and the
    joints zero-weight removals of both: directly and through `attribution_views`."""
    sim = known_simulator(drift="AB")
    columns = np.array([1])
    loo = leave_one_out(sim, CURRICULUM, None, "t1", None, "zero-weight")
    direct = pair_interactions(sim, CURRICULUM, None, "t1", top=3, removal="zero-weight")
    singles = dict(zip(loo.train_ids, loo.effects, strict=True))
    assert dict(zip(direct.train_ids, direct.singles, strict=True)) == singles
    via_views = attribution_views(sim, CURRICULUM, None, "t1", pairs=3, removal="zero-weight")[2]
    for pairs in (direct, via_views):
        assert len(pairs.pairs) == 3
        for i, j, joint, additive, interaction in pairs.pairs:
            want = removal_effects(
                sim, CURRICULUM, sim.initial_loss_, columns, [[i, j]], "zero-weight"
            )
            assert joint == pytest.approx(float(want[0, 0]), rel=1e-12)
            assert additive == pytest.approx(singles[i] + singles[j], rel=1e-12)
            assert interaction == pytest.approx(joint - additive, abs=1e-15)


# -- intervals: flags and JSON --------------------------------------------------------------------
def _loo(lower, upper, level=0.9) -> LeaveOneOut:
    n = 4
    return LeaveOneOut(
        ["t0"],
        1.0,
        [f"x{k}" for k in range(n)],
        np.ones(n, dtype=np.int64),
        np.array([-0.5, 0.25, 0.75, -0.25]),
        None if lower is None else np.asarray(lower, dtype=float),
        None if upper is None else np.asarray(upper, dtype=float),
        level,
    )


def test_uncertain_means_the_interval_includes_zero_ends_included() -> None:
    loo = _loo([-1.0, 0.0, 0.5, -2.0], [1.0, 2.0, 1.0, 0.0])
    #          straddles, starts at 0, above 0, ends at 0
    assert loo.uncertain().tolist() == [True, True, False, True]
    assert _loo([-0.5, 0.2, 0.3, -3.0], [-0.1, 0.9, 0.4, -1.0]).uncertain().tolist() == [
        False,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize("missing", ["both", "lower", "upper"])
def test_without_both_interval_ends_nothing_is_uncertain(missing: str) -> None:
    ends = {"both": (None, None), "lower": (None, [1.0] * 4), "upper": ([-1.0] * 4, None)}
    loo = _loo(*ends[missing], level=None)
    flags = loo.uncertain()
    assert flags.dtype == np.bool_ and flags.tolist() == [False] * 4
    payload = loo.to_json()
    assert all(set(row) == {"train_id", "count", "effect"} for row in payload["effects"])
    assert payload["interval_level"] is None and payload["interval"] is None


def test_leave_one_out_json_carries_the_intervals_and_their_meaning() -> None:
    loo = _loo([-1.0, 0.0, 0.5, -2.0], [1.0, 2.0, 1.0, 0.0], level=0.8)
    payload = loo.to_json()
    assert payload["interval_level"] == 0.8 and payload["interval"] == INTERVAL_NOTE
    rows = payload["effects"]
    assert [r["interval_includes_zero"] for r in rows] == [True, True, False, True]
    assert [(r["lower"], r["upper"]) for r in rows][2] == (0.5, 1.0)


# -- ties ----------------------------------------------------------------------------------------
def test_ties_are_broken_by_order() -> None:
    """Equal |change| steps: the earlier step first; equal |effect| examples: the pairs take
    the first ones in leave-one-out order (most helpful first, then id order)."""
    change = np.array([0.5, -1.0, 1.0, 0.5, -0.5, 1.0, -1.0, 0.5, 1.0, -0.5, 1.0, 0.5])
    steps = StepContributions(["t0"], np.r_[0.0, np.cumsum(change)], change, None)
    assert steps.top_steps(12) == [2, 3, 6, 7, 9, 11, 1, 4, 5, 8, 10, 12]
    # one single-example step each: effect = 2 B (batch weight b / 1), so |effect| ties
    B = [0.15, -0.15, -0.05, 0.05, -0.1, -0.1, -0.15, 0.1, 0.05, -0.15, 0.05, -0.05]
    sim = known_simulator(additive=True, pool=len(B))
    sim.B_[0] = B
    curriculum = [[f"x{k}"] for k in range(len(B))]
    loo = leave_one_out(sim, curriculum, None, "t0")
    np.testing.assert_allclose(loo.effects, np.sort(2 * np.array(B)), atol=1e-12)
    by_size = sorted(
        loo.train_ids, key=lambda i: -round(abs(loo.effects[loo.train_ids.index(i)]), 9)
    )
    pairs = pair_interactions(sim, curriculum, None, "t0", top=5, loo=loo)
    assert pairs.train_ids == by_size[:5]  # the three at 0.3, then the first two at 0.2


def test_attribution_views_give_90_percent_intervals_by_default() -> None:
    """A calibrated simulator's views carry each effect's 90% interval unless asked otherwise:
    the same as `leave_one_out` at level 0.9, and narrower at 0.5."""
    from simfluence.synth import SynthConfig, generate

    config = SynthConfig(pool=12, tests=3, runs=6, per_run=8, batch=4, epochs=2, seed=4)
    runs = generate(config)[0]
    sim = LinearSimulator(l2=1.0).calibrate(runs, n_folds=3)
    run = runs.runs[0]
    loo, _, _, payload = attribution_views(sim, run.curriculum, None, "test-1", pairs=0)
    at_90 = leave_one_out(sim, run.curriculum, None, "test-1", level=0.9)
    assert loo.level == 0.9 and payload["leave_one_out"]["interval_level"] == 0.9
    np.testing.assert_array_equal(loo.lower, at_90.lower)
    np.testing.assert_array_equal(loo.upper, at_90.upper)
    at_50 = leave_one_out(sim, run.curriculum, None, "test-1", level=0.5)
    assert np.all(at_50.upper - at_50.lower < loo.upper - loo.lower)


def test_attribution_views_are_the_three_views_of_the_same_question() -> None:
    """`attribution_views` passes the initial loss, the level and the removal rule to each view
    and defaults to the top 10 steps, 10 pairs and 90% intervals."""
    sim = known_simulator(pool=11, seed=3)
    extra = [[f"x{k}", f"x{k + 1}"] for k in range(3, 10, 2)]  # x3..x10
    curriculum = [*CURRICULUM, *extra, ["x0"], ["x2", "x1"], ["x1"]]  # 14 steps, 11 examples
    sim.calibration_residuals_ = np.random.default_rng(0).normal(0, 0.05, (30, 15, 2))
    sim.calibration_scale_ = np.ones((15, 2))
    initial = np.array([1.8, 1.2])
    loo, _, _, payload = attribution_views(
        sim, curriculum, initial, "t1", level=0.8, removal="zero-weight"
    )
    expected = leave_one_out(sim, curriculum, initial, "t1", 0.8, "zero-weight")
    assert payload["leave_one_out"] == expected.to_json() == loo.to_json()
    assert payload["steps"] == step_contributions(sim, curriculum, initial, "t1").to_json(10)
    assert (
        payload["pairs"]
        == pair_interactions(sim, curriculum, initial, "t1", 10, expected, "zero-weight").to_json()
    )
    default = attribution_views(sim, curriculum, initial, "t1")[3]
    assert default["leave_one_out"] == leave_one_out(sim, curriculum, initial, "t1").to_json()
    assert default["steps"] == step_contributions(sim, curriculum, initial, "t1").to_json(10)
    assert len(default["pairs"]["pairs"]) == 45  # the pairs of the top 10 examples of 11
    assert attribution_views(sim, curriculum, initial, "t1", pairs=2)[2] is not None
    assert attribution_views(sim, curriculum, initial, "t1", pairs=1)[2] is None


@pytest.mark.parametrize("removal", ["renormalize", "zero-weight"])
def test_leave_one_out_effects_are_the_removal_effects_of_each_example(removal: str) -> None:
    """Per example, the mean over the chosen test examples of ``L_T(with) - L_T(without)``
    under the chosen removal rule (and the two rules differ here)."""
    sim = known_simulator(pool=4, seed=5)
    curriculum = [*CURRICULUM, ["x3", "x1"]]
    loo = leave_one_out(sim, curriculum, None, ["t0", "t1"], None, removal)
    groups = [[i] for i in loo.train_ids]
    expected = removal_effects(
        sim, curriculum, sim.initial_loss_, np.array([0, 1]), groups, removal
    ).mean(axis=1)
    np.testing.assert_allclose(loo.effects, expected, rtol=1e-12)
    other = "zero-weight" if removal == "renormalize" else "renormalize"
    assert not np.allclose(
        loo.effects, leave_one_out(sim, curriculum, None, ["t0", "t1"], None, other).effects
    )
