"""The local search's moves on layouts, without a simulator: which neighbours `_propose` makes,
how `_combine` merges disjoint improvements, what one `_round` returns, and the argument checks.
A stub objective (the sum of fixed per-example values over the first epoch's set) makes every
expected answer computable by hand."""

from __future__ import annotations

import numpy as np
import pytest

from simfluence.counterfactual.search.moves import _combine, _is_exhaustive, _propose, _round
from simfluence.counterfactual.search.optimize import _check_sizes
from simfluence.errors import SimfluenceError


class _SetValue:
    """Objective of layouts ``(N, E, K)``: the sum of `values` over each layout's first epoch."""

    def __init__(self, values: list[float]) -> None:
        self.values = np.asarray(values, dtype=float)
        self.count = 0

    def __call__(self, layouts: np.ndarray) -> np.ndarray:
        self.count += len(layouts)
        return self.values[layouts[:, 0]].sum(axis=1)


def _members(layout: np.ndarray) -> frozenset[int]:
    return frozenset(int(i) for i in layout[0])


def test_all_swap_ins_when_they_fit_the_share_then_cross_batch_position_swaps() -> None:
    layout = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    pool = np.arange(8)
    neighbours, touched = _propose(layout, pool, 60, 2, np.random.default_rng(0))
    assert len(neighbours) <= 60 and len(neighbours) == len(touched)
    swap_ins, swaps = [], []
    for n, t in zip(neighbours, touched, strict=True):
        if _members(n) != _members(layout):
            swap_ins.append(n)
            (out_,) = _members(layout) - _members(n)
            (in_,) = _members(n) - _members(layout)
            assert t == {out_, in_}
            np.testing.assert_array_equal(n == in_, layout == out_)  # at all its positions
        else:
            swaps.append((n, t))
    expected = {(a, b) for a in range(4) for b in range(4, 8)}
    found = {(min(t), max(t)) for t in touched if max(t) >= 4}
    assert found == expected and len(swap_ins) == 16  # every swap-in, once
    assert swaps  # and position swaps for the rest of the count
    for n, t in swaps:
        epochs, cells = np.nonzero(n != layout)
        assert len(cells) == 2 and epochs[0] == epochs[1]
        assert cells[0] // 2 != cells[1] // 2  # across two batches
        e = epochs[0]
        assert n[e, cells[0]] == layout[e, cells[1]] and n[e, cells[1]] == layout[e, cells[0]]
        assert t == {int(layout[e, cells[0]]), int(layout[e, cells[1]])}


def test_swap_ins_are_sampled_without_repeats_when_there_are_more_than_their_share() -> None:
    layout = np.array([[0, 1, 2, 3]])
    neighbours, touched = _propose(layout, np.arange(10), 12, 2, np.random.default_rng(1))
    swap_ins = [t for n, t in zip(neighbours, touched, strict=True) if _members(n) != {0, 1, 2, 3}]
    assert len(swap_ins) == 6 and len(set(swap_ins)) == 6  # half of 12, all different


def test_a_single_batch_proposes_only_swap_ins_up_to_the_whole_count() -> None:
    layout = np.array([[0, 1]])
    neighbours, touched = _propose(layout, np.arange(8), 16, 2, np.random.default_rng(2))
    assert len(neighbours) == 12 and len(set(touched)) == 12  # 2 x 6, all of them
    assert _is_exhaustive(layout, np.arange(8), 12, 2)
    assert not _is_exhaustive(layout, np.arange(8), 11, 2)
    assert not _is_exhaustive(np.array([[0, 1, 2]]), np.arange(4), 99, 2)


def test_combine_applies_disjoint_proposals_in_order() -> None:
    layout = np.array([[0, 1, 2, 3]])
    proposals = np.array([[[4, 1, 2, 3]], [[5, 1, 2, 3]], [[0, 1, 3, 2]], [[0, 6, 2, 3]]])
    touched = [frozenset({0, 4}), frozenset({0, 5}), frozenset({2, 3}), frozenset({1, 6})]
    combined, taken = _combine(layout, proposals, touched, np.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(combined, [[4, 6, 3, 2]])  # the second conflicts with the first
    assert taken == 3
    combined, taken = _combine(layout, proposals, touched, np.array([1, 0]))
    np.testing.assert_array_equal(combined, [[5, 1, 2, 3]])
    assert taken == 1


def test_a_round_takes_the_best_disjoint_improvements_together() -> None:
    values = [5.0, 4.0, 0.0, 1.0, 2.0, 3.0]
    layout, pool = np.array([[0, 1]]), np.arange(6)
    evaluate = _SetValue(values)
    new, value, taken, exhaustive = _round(
        evaluate, layout, 9.0, pool, 512, 2, 8, np.random.default_rng(0)
    )
    assert _members(new) == {2, 3} and value == 1.0 and taken == 2 and exhaustive
    assert evaluate.count == 8 + 1  # every swap-in, then the combination
    # at most two improvements considered: the second conflicts, so the best single one
    new, value, taken, _ = _round(evaluate, layout, 9.0, pool, 512, 2, 2, np.random.default_rng(0))
    assert _members(new) == {2, 1} and value == 4.0 and taken == 1


def test_a_round_without_improvement_or_neighbours_keeps_the_layout() -> None:
    values = [0.0, 0.0, 1.0, 2.0]
    layout = np.array([[0, 1]])
    for pool, exhaustive in [(np.arange(4), True), (np.arange(2), True)]:
        new, value, taken, done = _round(
            _SetValue(values), layout, 0.0, pool, 512, 2, 8, np.random.default_rng(0)
        )
        assert new is layout and value == 0.0 and taken == 0 and done is exhaustive


@pytest.mark.parametrize(
    ("best", "gain", "improves"),
    [(100.0, 5e-11, False), (100.0, 2e-10, True), (0.5, 1.5e-12, True), (0.5, 0.5e-12, False)],
)
def test_an_improvement_must_beat_a_relative_tolerance(best: float, gain: float, improves: bool):  # type: ignore[no-untyped-def]
    """Gains under ``1e-12 * max(1, |best|)`` are rounding, not improvements."""
    values = [best / 2, best / 2, best / 2 - gain]
    _, value, taken, _ = _round(
        _SetValue(values), np.array([[0, 1]]), best, np.arange(3), 512, 2, 8,
        np.random.default_rng(0),
    )  # fmt: skip
    assert (taken > 0) is improves
    assert value == (best - gain if improves else best)


class _TableValue:
    """Objective of layouts ``(N, 1, K)``: a value per set of members (`table`), else 1e9."""

    def __init__(self, table: dict[frozenset[int], float]) -> None:
        self.table = table
        self.count = 0

    def __call__(self, layouts: np.ndarray) -> np.ndarray:
        self.count += len(layouts)
        return np.array([self.table.get(_members(n), 1e9) for n in layouts])


@pytest.mark.parametrize(
    ("together", "members", "value", "taken"),
    [(6.0, {2, 3}, 6.0, 2), (9.0, {0, 3}, 7.0, 1), (7.0, {0, 3}, 7.0, 1)],
    ids=["better", "worse", "tie"],
)
def test_two_disjoint_improvements_are_combined_only_when_strictly_better(
    together: float, members: set[int], value: float, taken: int
) -> None:
    """Exactly two improving swap-ins (0 -> 2 and 1 -> 3, disjoint): their combination is
    evaluated and taken only when it beats the best single move; a tie keeps the single move.
    The objective need not be additive (here it is a table), so a combination can be worse."""
    table = {frozenset({2, 1}): 8.0, frozenset({0, 3}): 7.0, frozenset({2, 3}): together}
    evaluate = _TableValue(table)
    new, got, accepted, _ = _round(
        evaluate, np.array([[0, 1]]), 10.0, np.arange(4), 512, 2, 8, np.random.default_rng(0)
    )
    assert _members(new) == members and got == value and accepted == taken
    assert evaluate.count == 4 + 1  # the four swap-ins, then their combination


def test_max_accept_one_takes_the_best_single_move_without_a_combination() -> None:
    evaluate = _SetValue([5.0, 4.0, 0.0, 1.0, 2.0, 3.0])
    new, value, taken, _ = _round(
        evaluate, np.array([[0, 1]]), 9.0, np.arange(6), 512, 2, 1, np.random.default_rng(0)
    )
    assert _members(new) == {2, 1} and value == 4.0 and taken == 1
    assert evaluate.count == 8  # the swap-ins only: one move cannot be combined


def test_a_gain_of_exactly_the_tolerance_is_not_an_improvement() -> None:
    best = 100.0
    at_tolerance = best - 1e-12 * best
    evaluate = _TableValue({frozenset({2, 1}): at_tolerance})
    new, value, taken, _ = _round(
        evaluate, np.array([[0, 1]]), best, np.arange(3), 512, 2, 8, np.random.default_rng(0)
    )
    assert taken == 0 and value == best and _members(new) == {0, 1}


def test_sizes_are_checked() -> None:
    _check_sizes(1, 1, 1, 1)  # the smallest search there is
    _check_sizes(5, 1, 3, 5)
    for args in [(2, 0, 1, 5), (2, 2, 0, 5), (0, 1, 1, 5), (6, 1, 1, 5)]:
        with pytest.raises(SimfluenceError):
            _check_sizes(*args)


def test_candidates_are_the_consumed_examples_unless_asked_otherwise() -> None:
    from types import SimpleNamespace

    from simfluence.counterfactual.search.starts import _candidates

    ids = ["a", "b", "c", "d"]
    featurized = SimpleNamespace(
        train_ids_=ids, consumed_=[True, False, True, False], seen_=[True] * 4
    )
    np.testing.assert_array_equal(_candidates(featurized, None, False), [0, 2])
    np.testing.assert_array_equal(_candidates(featurized, None, True), [0, 1, 2, 3])
    linear = SimpleNamespace(train_ids_=ids, seen_=[False, True, True, True])
    np.testing.assert_array_equal(_candidates(linear, None, False), [1, 2, 3])
    np.testing.assert_array_equal(_candidates(linear, ["d", "b", "d"], False), [1, 3])
    with pytest.raises(SimfluenceError, match="unknown training id 'z'"):
        _candidates(linear, ["b", "z"], False)


def test_swap_ins_that_exactly_fit_their_share_are_all_proposed_in_order() -> None:
    """Four members, two outsiders, a share of 8: all 8 swap-ins, member-major, in order."""
    layout = np.array([[0, 1, 2, 3]])
    _, touched = _propose(layout, np.arange(6), 16, 2, np.random.default_rng(0))
    assert touched[:8] == [frozenset((a, b)) for a in range(4) for b in (4, 5)]


def test_sampled_swap_ins_never_repeat() -> None:
    """Nine swap-ins for a share of 8: eight different ones (drawn without replacement)."""
    layout = np.array([[0, 1, 2]])
    for seed in range(3):
        neighbours, touched = _propose(layout, np.arange(6), 16, 1, np.random.default_rng(seed))
        swap_ins = [t for n, t in zip(neighbours, touched, strict=True) if _members(n) != {0, 1, 2}]
        assert len(swap_ins) == 8 and len(set(swap_ins)) == 8


def test_equally_good_moves_go_to_the_first_proposed() -> None:
    """Among many improving moves of the same value (here 30 swap-ins to examples worth 0,
    after 5 worth 0.5), the round takes the first one proposed."""
    values = [1.0] + [0.5] * 5 + [0.0] * 30
    layout = np.array([[0]])
    new, value, taken, _ = _round(
        _SetValue(values), layout, 1.0, np.arange(36), 64, 1, 1, np.random.default_rng(0)
    )
    assert value == 0.0 and taken == 1
    np.testing.assert_array_equal(new, [[6]])


def test_batches_of_one_without_outsiders_get_every_proposal_as_a_position_swap() -> None:
    """No out-of-set example (no swap-in) and batches of one: any two different cells lie in
    different batches, so each of the `count` proposals is a position swap."""
    layout = np.array([[0, 1, 2]])
    neighbours, touched = _propose(layout, np.arange(3), 12, 1, np.random.default_rng(0))
    assert len(neighbours) == 12
    for n, t in zip(neighbours, touched, strict=True):
        assert (n != layout).sum() == 2 and len(t) == 2


def test_the_greedy_start_breaks_ties_by_pool_order() -> None:
    """The greedy start takes the candidates of lowest leave-one-out effect (the objective with
    them minus without them: here each one's own worth); among equally good ones (30 worth 0
    after 5 worth 1), the first in pool order."""
    from simfluence.counterfactual.search.starts import _greedy_layout

    values = [1.0] * 5 + [0.0] * 30
    layout = _greedy_layout(_SetValue(values), np.arange(35), 2, 1, np.random.default_rng(0))
    assert sorted(layout[0].tolist()) == [5, 6]
