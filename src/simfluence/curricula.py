"""Curricula: random ones in the paper's protocol (and, later, counterfactual edits).

A curriculum is a list of ``T`` batches; a batch is a list of training ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simfluence.errors import SimfluenceError


def random_curriculum(
    pool_ids: Sequence[str],
    per_run: int,
    batch_size: int,
    epochs: int,
    rng: np.random.Generator,
) -> list[list[str]]:
    """The paper's protocol: draw `per_run` of the pool without replacement, then for each epoch
    reshuffle them and cut consecutive batches of `batch_size` (the last one may be smaller).

    Returns ``epochs * ceil(per_run / batch_size)`` batches.
    """
    if not 0 < per_run <= len(pool_ids):
        raise SimfluenceError(
            f"--per-run {per_run}: must be between 1 and the pool size {len(pool_ids)}"
        )
    if batch_size < 1 or epochs < 1:
        raise SimfluenceError("--batch and --epochs must be at least 1")
    chosen = rng.choice(len(pool_ids), size=per_run, replace=False)
    batches: list[list[str]] = []
    for _ in range(epochs):
        order = rng.permutation(chosen)
        for start in range(0, per_run, batch_size):
            batches.append([str(pool_ids[i]) for i in order[start : start + batch_size]])
    return batches
