"""Where a search starts: the candidate pool, random layouts in the recording protocol, and the
greedy layout of the most helpful candidates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simfluence.counterfactual.search.evaluator import _Evaluator
from simfluence.errors import SimfluenceError
from simfluence.simulators.base import Simulator


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
    # consumed by a fitted run (featurized simulators have effects for every example, seen_,
    # but the trust region keeps to those the runs consumed, consumed_)
    seen = getattr(simulator, "consumed_", getattr(simulator, "seen_", None))
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
