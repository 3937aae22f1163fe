"""Example features from a workload, for featurized simulators (PyTorch side).

Kinds:

* ``"gradients"`` (every task, the default): the gradient of each example's loss with respect
  to the trainable parameters at the initial model (``task.make_model(seed)``, where every run
  starts), through `Task.example_losses` alone. With ``D`` parameters it is kept exact when
  ``D <= 2 * dim``, else compressed to ``dim`` values by a CountSketch (each parameter adds its
  signed gradient into one of ``dim`` buckets, chosen by a seeded hash; inner products are
  preserved in expectation, at ``O(D)`` per example, never a ``D x dim`` matrix). TracIn scores
  a pair by the inner product of such gradients; a featurized simulator learns what to do with
  them.
* any name in ``task.feature_kinds``: whatever the task's `Task.example_features` hook returns
  (the built-in workloads offer ``"embedding"``: the frozen encoder's output or the input, and
  ``"activations"``: the trainable model's last hidden layer at initialization; both with the
  label appended as a one-hot).

`write_features` stores them beside a recorded run set (``DIR/features.npz``, see
`simfluence.runlog.features`) without recording anything again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simfluence.attribution.gradients import FunctionalLoss
from simfluence.errors import SimfluenceError
from simfluence.recording.loop import torch_threads
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import task_label
from simfluence.runlog.features import ExampleFeatures, save_features
from simfluence.runlog.runs import RunSet
from simfluence.runlog.store import load_runset
from simfluence.simulators.registry import simulator_class

DEFAULT_KIND = "gradients"
#: CountSketch width of gradient features (exact gradients when D <= 2 * this)
DEFAULT_DIM = 2048
#: per-example gradients held at once: about this many floats
_GRADIENT_BUDGET = 1 << 25


def feature_kinds(task: Task) -> list[str]:
    """The kinds of features `task` offers: ``"gradients"``, then the task's own."""
    return [DEFAULT_KIND, *task.feature_kinds]


def count_sketch(
    grads: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor, dim: int
) -> torch.Tensor:
    """``(m, dim)``: row ``r`` is ``sum_j signs[j] grads[r, j] e_{buckets[j]}``."""
    out = torch.zeros(grads.shape[0], dim, dtype=grads.dtype)
    out.index_add_(1, buckets, grads * signs)
    return out


def gradient_features(
    task: Task, model: nn.Module, examples: Examples, dim: int = DEFAULT_DIM, seed: int = 0
) -> np.ndarray:
    """Per-example loss gradients at `model`'s parameters, ``(n, D)`` or sketched ``(n, dim)``.

    The sketch's hash depends on `seed` and ``D`` only, so training and test examples (and
    later calls) share it.
    """
    loss = FunctionalLoss(task, model, model.state_dict())
    exact = loss.dim <= 2 * dim
    if not exact:
        generator = torch.Generator().manual_seed(seed)
        buckets = torch.randint(dim, (loss.dim,), generator=generator)
        signs = (torch.randint(2, (loss.dim,), generator=generator) * 2 - 1).to(loss.theta.dtype)
    chunk = max(1, _GRADIENT_BUDGET // loss.dim)
    rows = []
    for start in range(0, len(examples), chunk):
        grads = loss.gradients(examples.take(range(start, min(start + chunk, len(examples)))))
        grads = grads.detach()
        rows.append(grads if exact else count_sketch(grads, buckets, signs, dim))
    return torch.cat(rows).double().numpy()


def example_features(
    task: Task,
    model: nn.Module,
    examples: Examples,
    kind: str = DEFAULT_KIND,
    dim: int = DEFAULT_DIM,
) -> np.ndarray:
    """``(n, d)`` features of `examples` of the given kind; `SimfluenceError` for an unknown kind
    or a hook that returns something other than finite ``(n, d)`` numbers."""
    if kind == DEFAULT_KIND:
        return gradient_features(task, model, examples, dim)
    if kind not in task.feature_kinds:
        raise SimfluenceError(
            f"task {task_label(task)!r} has no feature kind {kind!r}; kinds: "
            f"{', '.join(feature_kinds(task))}"
        )
    with torch.no_grad():
        out = task.example_features(examples, model, kind)
    if out is None:
        raise SimfluenceError(f"task {task_label(task)!r}: example_features gave None for {kind!r}")
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != 2 or out.shape[0] != len(examples) or not np.isfinite(out).all():
        raise SimfluenceError(
            f"task {task_label(task)!r}: example_features({kind!r}) must return finite (n, d) "
            f"values for n = {len(examples)} examples, got shape {out.shape}"
        )
    return out


def workload_features(
    task: Task, pool: Examples, tests: Examples, model: nn.Module, kind: str, dim: int
) -> ExampleFeatures:
    """Features of a pool and its test examples, with their provenance and cost."""
    start = time.perf_counter()
    with torch_threads(model):
        train = example_features(task, model, pool, kind, dim)
        test = example_features(task, model, tests, kind, dim)
    seconds = time.perf_counter() - start
    if train.shape[1] != test.shape[1]:
        raise SimfluenceError(
            f"task {task_label(task)!r}: training features have {train.shape[1]} dimensions, test "
            f"features {test.shape[1]}"
        )
    meta = {
        "source": f"task {task_label(task)}",
        "kind": kind,
        "dim": int(train.shape[1]),
        "seconds": round(seconds, 3),
    }
    return ExampleFeatures(train, test, meta)


def ensure_features(
    directory: str | os.PathLike[str],
    runs: RunSet,
    methods: Sequence[str],
    task: Task | str | None = None,
) -> RunSet:
    """`runs` (recorded in `directory` by `record_runs`) with features, computed with the
    default kind and stored when some of `methods` need them and the run set has none
    (`task` as in `write_features`)."""
    if runs.features is not None or not any(
        getattr(simulator_class(m), "needs_features", False) for m in methods
    ):
        return runs
    runs.features = write_features(directory, task)
    return runs


def write_features(
    directory: str | os.PathLike[str],
    task: Task | str | None = None,
    kind: str = DEFAULT_KIND,
    dim: int = DEFAULT_DIM,
) -> ExampleFeatures:
    """Compute features for a run set recorded by `record_runs` and store them in it.

    `task` defaults to the task the manifest names (`task_for_runset`); a string is a task
    reference used in its place (`--task`, when the stored one no longer works). It must
    rebuild the run set's pool and test ids. Nothing is trained: the features come from the
    initial model.

    Raises `SimfluenceError` (one line) when the task cannot be rebuilt or does not rebuild the
    ids, or for a kind the task does not offer.
    """
    from simfluence.recording.tasks import prepare_for_runset, task_for_runset

    runs = load_runset(directory)
    if task is None or isinstance(task, str):
        try:
            task = task_for_runset(runs, task)
        except SimfluenceError as exc:
            raise SimfluenceError(f"{exc}; or supply features with --from FILE") from None
    pool, tests = prepare_for_runset(task, runs)
    config = runs.metadata["config"]
    model = task.make_model(config["seed"])
    features = workload_features(task, pool, tests, model, kind, dim)
    save_features(Path(directory), features, runs.train_ids, runs.test_ids)
    return features
