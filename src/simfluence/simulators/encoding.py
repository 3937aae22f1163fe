"""Curricula as batch-weighted count matrices: the input of every rollout and regression.

Batch weighting. Training minimizes the *mean* loss over a batch, so an example in a batch of 3
pulls harder than one in a batch of 4. With ``"mean"`` weighting row ``t`` of a count matrix is
scaled by ``b / |c_t|`` (``b`` the typical batch size); ``"sum"`` keeps the paper's raw counts.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from simfluence.runlog.runs import RunSet, count_matrix

BATCH_WEIGHTINGS = ("mean", "sum")


def weight_batches(
    counts: sparse.csr_matrix, batch_size: float, weighting: str
) -> sparse.csr_matrix:
    """Scale row ``t`` of a ``(T, P)`` count matrix by ``batch_size / |c_t|`` ("mean") or 1."""
    if weighting == "sum":
        return counts
    sizes = np.asarray(counts.sum(axis=1)).ravel()
    return sparse.diags(batch_size / sizes) @ counts


def encode_runs(runs: RunSet, batch_size: float, weighting: str) -> list[sparse.csr_matrix]:
    """The batch-weighted count matrix ``(T_r, P)`` of every run of `runs`, in order."""
    index = runs.train_index
    return [
        weight_batches(
            count_matrix(r.curriculum, index, f"run {r.run_id!r}"), batch_size, weighting
        )
        for r in runs.runs
    ]


__all__ = ["BATCH_WEIGHTINGS", "encode_runs", "weight_batches"]
