"""TracIn-CP and Grad-Dot scores as additive Simfluence parameters ``B_i(z)``.

Both are Simfluence-Linear with ``alpha = 1``: ``L_t(z) = L_{t-1}(z) + sum_{i in c_t} B_i(z)``.

Sign and units (the convention of every function in `simfluence.attribution`)
---------------------------------------------------------------------------
``scores[j, i] = B_i(z_j)`` is the predicted change of test example ``z_j``'s loss caused by
consuming training example ``i`` **once** in an SGD step. A **negative** entry means that
consuming ``i`` once lowers ``z_j``'s loss (``i`` is a proponent of ``z_j``).

TracIn-CP::

    B_i(z) = - sum_k  w_k * eta_k / b * grad l(z; theta_k) . grad l(z_i; theta_k)

* ``theta_k``: the k-th checkpoint, ``eta_k``: the learning rate of the step taken from it.
* ``b``: the training batch size. The training loss is the batch *mean*, so one example's
  share of an SGD step is ``-(eta / b) grad l(z_i)``; its first-order effect on the test loss
  is the term above. An example that appears twice in a batch counts twice (Simfluence sums
  ``B_i`` over the batch multiset), consistent with this per-consumption unit.
* ``w_k``: checkpoint weights, **1 by default** (the plain TracIn-CP sum, as in Pruthi et al.
  and Captum). The sum over checkpoints is then *not* an average: with K checkpoints the score
  is K per-step estimates added up. Use ``checkpoint_weights=[1/K] * K`` for the average
  (the per-step effect at a "typical" checkpoint, the natural unit for a simulator that adds
  ``B_i`` at every consumption), or the number of optimiser steps each checkpoint stands for
  to approximate the total effect over a whole run (TracIn's sum over all steps, e.g. ``S`` for
  checkpoints saved every ``S`` steps) -- that is a total, not a per-consumption effect.

Grad-Dot is the same formula at one checkpoint (usually the final one), ``K = 1``, ``w = 1``.

Relation to Captum: ``captum.influence.TracInCP(...).influence(test)`` returns
``sum_k lr_k * g_test . g_train`` (positive = proponent, no ``1/b``); hence
``tracin_cp_scores(...) == -captum_scores / b`` for equal checkpoints and learning rates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from simfluence.attribution.gradients import (
    FunctionalLoss,
    RandomProjection,
    iter_per_example_gradients,
)
from simfluence.recording.task import Examples, Task

__all__ = ["grad_dot_scores", "gradient_similarity", "tracin_cp_scores"]


def _as_list(values: Sequence[float] | float, n: int, what: str) -> list[float]:
    if isinstance(values, int | float):
        return [float(values)] * n
    out = [float(v) for v in values]
    if len(out) != n:
        raise ValueError(f"got {len(out)} {what} for {n} checkpoints")
    return out


def gradient_similarity(
    task: Task,
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    pool: Examples,
    tests: Examples,
    projection: RandomProjection | None = None,
    *,
    chunk_size: int = 256,
    dtype: torch.dtype | None = None,
    precondition: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw gradient dot products ``G[j, i] = grad l(z_j) . grad l(z_i)`` at one checkpoint.

    Returns a float64 tensor ``(n_test, n_train)`` (no sign flip, no learning rate). With a
    projection, the dot products of the projected gradients. `precondition`: shape ``(D,)``
    (flattened like the gradients), multiplies every *training* gradient element-wise before
    the product: ``G[j, i] = g_j . (P * g_i)`` (Adam's ``1 / (sqrt(v_hat) + eps)``: the
    direction an Adam step moves the parameters for example ``i``). Memory: the ``n_test``
    test gradients are kept (``n_test * D`` floats) and pool gradients are streamed in chunks.
    """
    fl = FunctionalLoss(task, model, checkpoint, dtype)
    kwargs = {"chunk_size": chunk_size, "projection": projection, "loss": fl}
    pool_kwargs = dict(kwargs)
    if precondition is not None:
        scale = precondition.to(fl.theta.device, fl.theta.dtype)
        pool_kwargs["projection"] = (
            (lambda g: g * scale) if projection is None else (lambda g: projection(g * scale))
        )
    out = torch.zeros(len(tests), len(pool), dtype=torch.float64)
    if len(tests) == 0 or len(pool) == 0:
        return out
    test_grads = torch.cat(
        [g for _, g in iter_per_example_gradients(task, model, checkpoint, tests, **kwargs)]
    )
    for start, g in iter_per_example_gradients(task, model, checkpoint, pool, **pool_kwargs):
        out[:, start : start + g.shape[0]] = (test_grads @ g.T).to("cpu", torch.float64)
    return out


def tracin_cp_scores(
    task: Task,
    model: nn.Module,
    checkpoints: Sequence[Mapping[str, torch.Tensor]],
    lrs: Sequence[float] | float,
    pool: Examples,
    tests: Examples,
    batch_size: int,
    projection: RandomProjection | None = None,
    *,
    checkpoint_weights: Sequence[float] | None = None,
    chunk_size: int = 256,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """TracIn-CP additive parameters ``B_i(z)`` (see the module docstring for the convention).

    Args:
        task: the workload; gradients are of ``task.example_losses``.
        model: an instance of the architecture (its own weights are not used or changed).
        checkpoints: ``K`` dicts ``name -> tensor`` (``model.state_dict()`` style).
        lrs: learning rate ``eta_k`` of each checkpoint (a single float: the same for all).
        pool: the ``n_train`` training examples.
        tests: the ``n_test`` test examples.
        batch_size: ``b``, the training batch size (the training loss is a batch mean).
        projection: optional `RandomProjection`, applied to train and test gradients alike.
        checkpoint_weights: ``w_k``; default 1 for every checkpoint (plain sum).
        chunk_size: examples per ``vmap(grad)`` call.
        dtype: optional compute dtype (``torch.float64`` for references).

    Returns:
        float64 array ``(n_test, n_train)``:
        ``-sum_k w_k * eta_k / b * grad l(z; theta_k) . grad l(z_i; theta_k)``.
        Negative = consuming ``i`` once lowers ``z``'s loss.

    Raises:
        ValueError: empty checkpoint list, length mismatches, ``batch_size < 1``, or a
            checkpoint that does not match the model (the message names the parameter).
    """
    if len(checkpoints) == 0:
        raise ValueError("need at least one checkpoint")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    etas = _as_list(lrs, len(checkpoints), "learning rates")
    weights = (
        [1.0] * len(checkpoints)
        if checkpoint_weights is None
        else _as_list(checkpoint_weights, len(checkpoints), "checkpoint weights")
    )
    total = torch.zeros(len(tests), len(pool), dtype=torch.float64)
    for checkpoint, eta, w in zip(checkpoints, etas, weights, strict=True):
        sim = gradient_similarity(
            task, model, checkpoint, pool, tests, projection, chunk_size=chunk_size, dtype=dtype
        )
        total += (w * eta / batch_size) * sim
    return (-total).numpy()


def grad_dot_scores(
    task: Task,
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    lr: float,
    pool: Examples,
    tests: Examples,
    batch_size: int,
    projection: RandomProjection | None = None,
    *,
    chunk_size: int = 256,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Grad-Dot: TracIn at a single checkpoint (usually the final one).

    Returns float64 ``(n_test, n_train)``: ``-(lr / b) * grad l(z) . grad l(z_i)`` at
    ``checkpoint``. Negative = consuming ``i`` once lowers ``z``'s loss.
    """
    return tracin_cp_scores(
        task,
        model,
        [checkpoint],
        [lr],
        pool,
        tests,
        batch_size,
        projection,
        chunk_size=chunk_size,
        dtype=dtype,
    )
