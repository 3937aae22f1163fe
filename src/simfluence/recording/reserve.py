"""The unseen reserve (the never-seen protocol): pool examples only the held-out runs may draw.

With ``reserve = f > 0`` (`simfluence.recording.protocol.RecordingProtocol`) a share `f` of the
pool, drawn by the recording's seed, is listed in the manifest's ``metadata["reserved_ids"]``
and consumed only by the runs whose index is at least ``reserve_from``; every other run draws
from the rest of the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def reserved_ids(pool_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The ``round(fraction * P)`` pool ids kept for the held-out runs (seeded, in pool order)."""
    count = round(fraction * len(pool_ids))
    rng = np.random.default_rng([seed, 104_729])  # apart from the runs' and validation's seeds
    chosen = set(rng.choice(len(pool_ids), size=count, replace=False).tolist())
    return [train_id for k, train_id in enumerate(pool_ids) if k in chosen]


def drawable_ids(pool_ids: Sequence[str], config: dict[str, Any], index: int) -> list[str]:
    """The ids run `index` draws from: the whole pool, or the unreserved part of it."""
    if "reserve" not in config or index >= config["reserve_from"]:
        return list(pool_ids)
    reserved = set(reserved_ids(pool_ids, config["reserve"], config["seed"]))
    return [train_id for train_id in pool_ids if train_id not in reserved]
