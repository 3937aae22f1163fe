"""The ``subsets`` validation kind: dattri's and TRAK's LDS protocol.

Each of `count` random subsets holds 50% of the run set's pool (`SUBSET_FRACTION`); the
run set's initial model is trained on every example of the subset, `epochs` epochs in batches
of `batch` (the recording protocol's), once per *subset seed* (a different random order of the
same subset each time). The actual final test losses of a subset are the mean over its seeds
(dattri averages the models trained on a subset the same way); so are the predictions.

LDS (`simfluence.metrics.linear_datamodeling_score`): for each test example, the Spearman
correlation across the subsets of predicted vs actual final loss, then the mean over test
examples: the definition TRAK (Park et al. 2023) and dattri publish their numbers with (they
correlate a model output such as the margin; a loss is a monotone function of the correct-class
margin for one example only up to the other logits, so compare levels, not third decimals).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simfluence.curricula import random_curriculum
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import Curriculum, RunSet

__all__ = ["SUBSET_FRACTION", "mean_over_seeds", "subset_curricula"]

#: share of the pool in each subset
SUBSET_FRACTION = 0.5


def subset_curricula(runs: RunSet, count: int, seeds: int = 1, seed: int = 0) -> list[Curriculum]:
    """``count * seeds`` curricula, subset-major: curriculum ``j * seeds + s`` trains on subset
    ``j`` in the order of its seed ``s``. Every curriculum has the same number of steps."""
    if count < 2:
        raise SimfluenceError("--subsets must be at least 2 (LDS correlates across subsets)")
    if seeds < 1:
        raise SimfluenceError("--subset-seeds must be at least 1")
    config = runs.metadata["config"]
    pool = list(runs.train_ids)
    size = max(1, round(SUBSET_FRACTION * len(pool)))
    out = []
    for j in range(count):
        chosen = np.random.default_rng([seed, 7_919, 5, j]).choice(pool, size, replace=False)
        members = sorted(str(i) for i in chosen)
        for s in range(seeds):
            rng = np.random.default_rng([seed, 7_919, 6, j, s])
            out.append(random_curriculum(members, size, config["batch"], config["epochs"], rng))
    return out


def mean_over_seeds(trajectories: Sequence[np.ndarray], seeds: int) -> list[np.ndarray]:
    """The mean trajectory of each subset (consecutive groups of `seeds`)."""
    return [
        np.mean(np.stack(trajectories[j : j + seeds]), axis=0)
        for j in range(0, len(trajectories), seeds)
    ]
