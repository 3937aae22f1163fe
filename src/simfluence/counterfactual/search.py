"""Curriculum search: the curriculum of ``K`` pool examples that a simulator predicts is best.

The layout is the recording protocol's: the same ``K`` examples are consumed once per epoch for
``E`` epochs, each epoch in its own order, cut into consecutive batches of ``b`` (the last one
may be smaller). A layout is an integer array ``(E, K)`` of pool indices whose rows are
permutations of the same ``K``-subset. The search looks for the subset *and* the orders.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simfluence.counterfactual.attribution import _initial, test_columns
from simfluence.errors import SimfluenceError
from simfluence.simulators.base import Simulator
from simfluence.simulators.dynamics import DynamicsSimulator

#: floats gathered per evaluation chunk (bounds memory at about 16 bytes each)
_CHUNK_FLOATS = 4_000_000


@dataclass
class SearchResult:
    """Outcome of `optimize_curriculum`.

    Attributes:
        curriculum: ``E * ceil(K / b)`` batches of training ids.
        objective: its predicted objective (mean simulated final loss of the chosen tests).
        random_objectives: shape ``(n_random,)``, the objective of each random start (random
            curricula of the same size and layout: the baseline to beat).
        greedy_objective: the objective of the greedy start, or None when it was not used.
        history: one entry per round: ``round``, ``evaluations`` so far, ``objective`` after
            the round, ``accepted`` moves.
        evaluations: curricula rolled out in all.
        seconds: wall time.
    """

    curriculum: list[list[str]]
    objective: float
    random_objectives: np.ndarray
    greedy_objective: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0


class _Evaluator:
    """Objective of many layouts ``(N, E, K)`` at once: ``(N,)`` mean final loss of `columns`.

    Dynamics simulators are rolled out directly from the layouts (a gather of the parameters
    of every position, summed per batch, then ``T`` vectorized steps), the same arithmetic as
    `rollout`; other simulators go through `simulate_many`.
    """

    def __init__(
        self,
        simulator: Simulator,
        columns: np.ndarray,
        initial: np.ndarray,
        batch_size: int,
    ) -> None:
        self.simulator = simulator
        self.columns = columns
        self.initial = initial
        self.batch_size = batch_size
        self.count = 0
        if isinstance(simulator, DynamicsSimulator):
            self.AT = None if simulator.A_ is None else simulator.A_[columns].T.copy()
            self.BT = simulator.B_[columns].T.copy()

    def curriculum(self, layout: np.ndarray) -> list[list[str]]:
        ids = self.simulator.train_ids_
        b = self.batch_size
        return [[ids[i] for i in row[s : s + b]] for row in layout for s in range(0, row.size, b)]

    def __call__(self, layouts: np.ndarray) -> np.ndarray:
        self.count += len(layouts)
        if not isinstance(self.simulator, DynamicsSimulator):
            curricula = [self.curriculum(layout) for layout in layouts]
            trajs = self.simulator.simulate_many(curricula, self.initial)
            return np.array([t[-1, self.columns].mean() for t in trajs])
        n, epochs, size = layouts.shape
        step = max(1, _CHUNK_FLOATS // (epochs * size * len(self.columns)))
        return np.concatenate([self._dynamics(layouts[s : s + step]) for s in range(0, n, step)])

    def _dynamics(self, layouts: np.ndarray) -> np.ndarray:
        sim = self.simulator
        size = layouts.shape[2]
        starts = np.arange(0, size, self.batch_size)
        counts = np.diff(np.append(starts, size))
        weight = sim.batch_size_ / counts if sim.batch_weighting == "mean" else np.ones(len(starts))
        weight = weight[None, None, :, None]
        n = len(layouts)
        beta = (np.add.reduceat(self.BT[layouts], starts, axis=2) * weight).reshape(
            n, -1, self.BT.shape[1]
        )
        loss = np.broadcast_to(self.initial[self.columns], (n, len(self.columns))).copy()
        if self.AT is None:
            return (loss + beta.sum(axis=1)).mean(axis=1)
        alpha = (np.add.reduceat(self.AT[layouts], starts, axis=2) * weight).reshape(beta.shape)
        for t in range(beta.shape[1]):
            loss *= alpha[:, t]
            loss += beta[:, t]
        return loss.mean(axis=1)


def _candidates(
    simulator: Simulator, candidates: Sequence[str] | None, include_unseen: bool
) -> np.ndarray:
    index = {t: k for k, t in enumerate(simulator.train_ids_)}
    if candidates is not None:
        unknown = [c for c in candidates if str(c) not in index]
        if unknown:
            raise SimfluenceError(f"unknown training id {unknown[0]!r} among the candidates")
        return np.unique([index[str(c)] for c in candidates])
    pool = np.arange(len(simulator.train_ids_))
    seen = getattr(simulator, "seen_", None)
    if seen is None or include_unseen:
        return pool
    return pool[np.asarray(seen, dtype=bool)]


def _random_layouts(
    pool: np.ndarray, size: int, epochs: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``(count, E, K)``: random subsets, reshuffled every epoch (the recording protocol)."""
    out = np.empty((count, epochs, size), dtype=np.int64)
    for n in range(count):
        chosen = rng.choice(pool, size=size, replace=False)
        for e in range(epochs):
            out[n, e] = rng.permutation(chosen)
    return out


def _greedy_layout(
    evaluate: _Evaluator, pool: np.ndarray, size: int, epochs: int, rng: np.random.Generator
) -> np.ndarray:
    """The `size` candidates most helpful by leave-one-out on a reference layout that consumes
    every candidate once per epoch (removing one candidate closes the gap it leaves), each
    epoch in a fresh random order."""
    reference = np.stack([rng.permutation(pool) for _ in range(epochs)])
    without = np.stack(
        [np.stack([row[row != i] for row in reference]) for i in pool]
    )  # (C, E, C - 1)
    effects = evaluate(reference[None])[0] - evaluate(without)  # negative = helpful
    chosen = pool[np.argsort(effects, kind="stable")[:size]]
    return np.stack([rng.permutation(chosen) for _ in range(epochs)])


def _propose(
    layout: np.ndarray, pool: np.ndarray, count: int, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[frozenset[int]]]:
    """Up to `count` neighbours ``(N, E, K)`` of `layout` and the pool indices each touches.

    Half are swap-ins (an in-set example replaced, at all its positions, by an out-of-set
    candidate), half position swaps within one epoch across two batches; when a kind has no
    more possibilities than its share, all of them are proposed.
    """
    members = layout[0]
    outside = np.setdiff1d(pool, members)
    moves: list[tuple[str, int, int, int]] = []
    n_in = len(members) * len(outside)
    share = count // 2 if len(members) > batch_size else count
    if n_in:
        picks = np.arange(n_in) if n_in <= share else rng.choice(n_in, share, replace=False)
        moves += [
            ("in", int(members[p // len(outside)]), int(outside[p % len(outside)]), 0)
            for p in picks
        ]
    epochs, size = layout.shape
    if size > batch_size:
        for _ in range(count - len(moves)):
            e = int(rng.integers(epochs))
            p, q = rng.choice(size, 2, replace=False)
            if p // batch_size != q // batch_size:
                moves.append(("pos", int(p), int(q), e))
    return _apply_moves(layout, moves)


def _apply_moves(
    layout: np.ndarray, moves: list[tuple[str, int, int, int]]
) -> tuple[np.ndarray, list[frozenset[int]]]:
    out = np.repeat(layout[None], len(moves), axis=0)
    touched = []
    for n, (kind, a, b, e) in enumerate(moves):
        if kind == "in":
            out[n][layout == a] = b
            touched.append(frozenset((a, b)))
        else:
            out[n, e, a], out[n, e, b] = layout[e, b], layout[e, a]
            touched.append(frozenset((int(layout[e, a]), int(layout[e, b]))))
    return out, touched


def _combine(
    layout: np.ndarray, proposals: np.ndarray, touched: list[frozenset[int]], order: np.ndarray
) -> tuple[np.ndarray, int]:
    """Apply the improving proposals in `order` that touch disjoint examples, together: each
    proposal differs from `layout` only where it touched, so its differing cells are copied."""
    combined, used, taken = layout.copy(), set(), 0
    for k in order:
        if used & touched[k]:
            continue
        used |= touched[k]
        diff = proposals[k] != layout
        combined[diff] = proposals[k][diff]
        taken += 1
    return combined, taken


def optimize_curriculum(
    simulator: Simulator,
    size: int,
    batch_size: int,
    epochs: int = 1,
    objective: str | Sequence[str] = "mean",
    initial_loss: np.ndarray | None = None,
    seed: int = 0,
    n_random: int = 64,
    greedy: bool = True,
    proposals: int = 512,
    max_accept: int = 8,
    patience: int = 3,
    max_evaluations: int = 200_000,
    max_seconds: float | None = 60.0,
    candidates: Sequence[str] | None = None,
    include_unseen: bool = False,
) -> SearchResult:
    """Find the curriculum of `size` pool examples (subset and order, laid out like the
    recording protocol: `epochs` epochs over the same examples, batches of `batch_size`) that
    `simulator` predicts minimizes `objective`.

    Method (every batch of candidates is evaluated in one vectorized rollout):

    1. Starts: the best of `n_random` random curricula in the protocol, and (`greedy`) the
       `size` candidates most helpful by simulated leave-one-out on a reference curriculum that
       consumes every candidate once per epoch, in random order.
    2. Batched stochastic local search from the better start: each round proposes up to
       `proposals` neighbours (swap-ins: an in-set example replaced, at all its positions, by an
       out-of-set one; position swaps of two examples in different batches of one epoch); all
       of them are rolled out at once. The improving ones that touch disjoint examples (at most
       `max_accept`) are applied together when that beats the best single one, else the best
       single one is.
    3. Stop after `patience` rounds without improvement (one round suffices when every
       neighbour was proposed), or when `max_evaluations` rollouts or `max_seconds` are spent.

    Args:
        objective: ``"mean"``: the mean simulated final loss over all test examples; or a list
            of test ids: the mean over those.
        initial_loss: shape ``(M,)``, or None for the simulator's mean recorded one.
        candidates: pool ids allowed; default: those the simulator saw in its fitted runs
            (``seen_``), or all of them with `include_unseen`.

    Returns:
        a `SearchResult`; lower objective is better (a loss).
    """
    start_time = time.perf_counter()
    columns = _objective_columns(simulator, objective)
    pool = _candidates(simulator, candidates, include_unseen)
    _check_sizes(size, batch_size, epochs, len(pool))
    rng = np.random.default_rng(seed)
    evaluate = _Evaluator(simulator, columns, _initial(simulator, initial_loss), batch_size)
    randoms = _random_layouts(pool, size, epochs, max(n_random, 1), rng)
    random_values = evaluate(randoms)
    layout, best = randoms[np.argmin(random_values)], float(random_values.min())
    greedy_value = None
    if greedy:
        candidate = _greedy_layout(evaluate, pool, size, epochs, rng)
        greedy_value = float(evaluate(candidate[None])[0])
        if greedy_value < best:
            layout, best = candidate, greedy_value
    history: list[dict[str, Any]] = []
    idle = 0
    deadline = None if max_seconds is None else start_time + max_seconds
    while idle < patience and evaluate.count < max_evaluations:
        if deadline is not None and time.perf_counter() > deadline:
            break
        layout, best, accepted, exhaustive = _round(
            evaluate, layout, best, pool, proposals, batch_size, max_accept, rng
        )
        history.append(
            {
                "round": len(history) + 1,
                "evaluations": evaluate.count,
                "objective": best,
                "accepted": accepted,
            }
        )
        idle = 0 if accepted else (patience if exhaustive else idle + 1)
    return SearchResult(
        evaluate.curriculum(layout),
        best,
        random_values,
        greedy_value,
        history,
        evaluate.count,
        time.perf_counter() - start_time,
    )


def _round(
    evaluate: _Evaluator,
    layout: np.ndarray,
    best: float,
    pool: np.ndarray,
    proposals: int,
    batch_size: int,
    max_accept: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float, int, bool]:
    """One round of local search: ``(layout, objective, moves accepted, all neighbours
    proposed)``."""
    neighbours, touched = _propose(layout, pool, proposals, batch_size, rng)
    exhaustive = _is_exhaustive(layout, pool, proposals, batch_size)
    if not len(neighbours):
        return layout, best, 0, True
    values = evaluate(neighbours)
    tol = 1e-12 * max(1.0, abs(best))
    improving = np.flatnonzero(values < best - tol)
    if not improving.size:
        return layout, best, 0, exhaustive
    order = improving[np.argsort(values[improving], kind="stable")][: max(max_accept, 1)]
    layout_1, value_1, taken = neighbours[order[0]], float(values[order[0]]), 1
    if order.size > 1:
        combined, count = _combine(layout, neighbours, touched, order)
        value = float(evaluate(combined[None])[0])
        if count > 1 and value < value_1:
            layout_1, value_1, taken = combined, value, count
    return layout_1, value_1, taken, exhaustive


def _is_exhaustive(layout: np.ndarray, pool: np.ndarray, proposals: int, batch_size: int) -> bool:
    """Whether `_propose` proposed every swap-in (position swaps are sampled, so only when
    there are none: a single batch per epoch)."""
    n_in = layout.shape[1] * (len(pool) - layout.shape[1])
    return layout.shape[1] <= batch_size and n_in <= proposals


def _objective_columns(simulator: Simulator, objective: str | Sequence[str]) -> np.ndarray:
    if isinstance(objective, str):
        if objective != "mean":
            return test_columns(simulator, [objective])
        simulator._check_fitted()
        return np.arange(len(simulator.test_ids_))
    return test_columns(simulator, objective)


def _check_sizes(size: int, batch_size: int, epochs: int, n_candidates: int) -> None:
    if batch_size < 1 or epochs < 1:
        raise SimfluenceError("batch size and epochs must be at least 1")
    if not 1 <= size <= n_candidates:
        raise SimfluenceError(
            f"size {size}: must be between 1 and the {n_candidates} candidate training examples"
        )
