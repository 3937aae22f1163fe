"""One round of the batched local search: neighbours of a layout (swap-ins, position swaps),
all evaluated at once, the improving ones that touch disjoint examples combined."""

from __future__ import annotations

import numpy as np

from simfluence.counterfactual.search.evaluator import _Evaluator


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
