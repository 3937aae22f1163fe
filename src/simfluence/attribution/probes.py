"""Zero-weight probes: what adding an example a run never consumed would have done to it.

A recorded run's metagradients (`simfluence.attribution.unrolled`) answer for the examples it
consumed. An example it never consumed (a third of the pool in the built-in protocols, which
draw 128 of 200 examples per run) gets nothing from that run, so as a simulator of other
curricula ``unrolled`` averaged each example's effect over only the runs that consumed it.

A *probe* is a consumption at weight 0: the example's loss enters its step's batch loss as
``0 x loss / |c_t|`` (``|c_t|`` counts the real consumptions only), so the run is unchanged to
the last bit, yet the metagradient of that weight is the first-order effect of adding the
example there: ``L_T(with it) - L_T(without) ~ d L_T / d w_probe`` (the same sign convention:
negative = adding it lowers the final loss). Every example the run did not consume is probed
as often as the run consumed an example on average, once in each of that many equal spans of
the run, at a random step (`probe_schedule`), so its probes spread over training as a real
example's consumptions do. Every run then answers for the whole pool.

Measured on 50% subsets of the pool (dattri's LDS protocol, 20 subsets retrained;
`benchmarks/bench_static.py`, 16 recorded runs, 8 averaged): digits-logreg 0.867 -> 0.918,
digits-mlp 0.887 -> 0.906; 32 runs of digits-logreg averaged: 0.895 -> 0.924. A probe at every
step instead of a few (the mean over all steps): 0.925, no better, at a cost of the pool times
the steps in per-example gradients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = ["PROBE_SEED", "probe_schedule"]

#: mixed with the run's seed into the random steps of its probes
PROBE_SEED = 104_729


def probe_schedule(
    curriculum: Sequence[Sequence[str]], pool_ids: Sequence[str], seed: int
) -> list[list[str]]:
    """The probes of each of the run's ``T`` steps: the ids of `pool_ids` that `curriculum`
    never consumed, each ``k`` times (``k``: the run's consumptions per consumed example,
    rounded, at most ``T``), once in each of ``k`` equal spans of the steps, at a step drawn
    from `seed`. Empty lists when the run consumed every example (or none)."""
    consumed = Counter(i for batch in curriculum for i in batch)
    n_steps = len(curriculum)
    out: list[list[str]] = [[] for _ in range(n_steps)]
    absent = [i for i in pool_ids if i not in consumed]
    if not absent or not consumed:
        return out
    times = min(n_steps, max(1, round(sum(consumed.values()) / len(consumed))))
    rng = np.random.default_rng([seed % 2**32, PROBE_SEED])
    for example in absent:
        for k in range(times):
            low, high = k * n_steps // times, (k + 1) * n_steps // times
            out[int(rng.integers(low, high))].append(example)
    return out
