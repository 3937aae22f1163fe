"""Helpers shared by the workloads: the on-disk cache and deterministic data splits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from simfluence._atomic import atomic_path


def cache_dir() -> Path:
    """The simfluence cache folder: ``$SIMFLUENCE_CACHE`` or ``~/.cache/simfluence``.

    The folder is created if missing.
    """
    root = os.environ.get("SIMFLUENCE_CACHE") or os.path.join("~", ".cache", "simfluence")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_tensors_atomic(target: str | os.PathLike[str], obj: object) -> None:
    """`torch.save` `obj` to `target` atomically (temporary file, then `os.replace`)."""
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def split_rows(
    n_rows: int, pool: int, tests: int, seed: int, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint (pool_rows, test_rows) drawn from ``range(n_rows)`` by `seed`.

    Raises `ValueError` if ``pool + tests > n_rows``. The rows are in permutation order, so a
    larger `pool` extends a smaller one's pool (for the same seed and `tests`, the test rows are
    the last ones of the permutation and do not depend on `pool`).
    """
    if pool < 1 or tests < 1:
        raise ValueError(
            f"{source}: pool and tests must be positive, got pool={pool}, tests={tests}"
        )
    if pool + tests > n_rows:
        raise ValueError(
            f"{source} has {n_rows} examples but pool={pool} + tests={tests} = "
            f"{pool + tests} were asked for"
        )
    perm = np.random.RandomState(seed).permutation(n_rows)
    test_rows = perm[n_rows - tests :]
    pool_rows = perm[:pool]
    return pool_rows, test_rows
