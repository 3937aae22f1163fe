"""The training loop of a recorded run: one curriculum, from one initial model, scored every step.

`train_on_curriculum` trains a fresh copy of the initial model on a curriculum with the task's
optimizer (or a recorded optimizer description) on the batch-mean loss and scores every test
example before training and after every step; `final_test_losses` trains exactly the same way
(bit for bit) and scores once at the end, for leave-one-out retraining. `torch_threads` runs a
block on a number of torch CPU threads (one for small models: faster and steadier).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from simfluence.errors import SimfluenceError
from simfluence.recording.devices import resolve_device
from simfluence.recording.optim import Schedule, rebuild_optimizer
from simfluence.recording.recorder import Recorder, RecordingError, Scoring
from simfluence.recording.task import Examples, Task
from simfluence.runlog import Run

#: models with fewer parameters than this are trained on one CPU thread (faster and steadier)
SMALL_MODEL_PARAMS = 1_000_000


def train_on_curriculum(
    task: Task,
    initial: torch.nn.Module,
    pool_examples: Examples,
    test_examples: Examples,
    curriculum: Sequence[Sequence[str]],
    lr: float,
    seed: int,
    *,
    run_id: str = "run",
    row_of: dict[str, int] | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    metadata: dict[str, Any] | None = None,
    weights: Sequence[Sequence[float]] | None = None,
    optimizer: dict[str, Any] | None = None,
    schedule: Schedule | None = None,
    device: str | torch.device | None = None,
    max_grad_norm: float | None = None,
    scoring: Scoring | None = None,
) -> Run:
    """Train a fresh copy of `initial` on `curriculum` (``task.make_optimizer(model, lr)`` on
    the batch-mean loss, as a recording does) and score every test example before training and
    after every step.

    `optimizer`: a recorded optimizer description (``config["optimizer"]``,
    `simfluence.recording.optim.rebuild_optimizer`); None: the task's own. `schedule`: the
    learning-rate schedule over this curriculum's steps (default: constant). `max_grad_norm`:
    clip the gradients to this total 2-norm before every step (``clip_grad_norm_``, as Hugging
    Face's ``Trainer`` does by default; None: no clipping; ``config["max_grad_norm"]``).
    `on_step(step, model)` is called at step 0 (before training) and after every step.
    `weights`: optional per-example loss weights, one list per batch (same lengths as the
    curriculum); the step then minimises ``sum_k w_k loss_k / |batch|`` (weight 0 keeps an
    example in its batch without effect: "zero-weight" removal). None: the plain batch mean.
    `device`: where to train (model and examples are moved there; default: the CPU).
    `scoring`: sparse scoring (`Scoring`: every ``K`` steps, a rotating share of the test
    examples; step 0 and the last step always in full); None: every test example every step.
    Returns the `Run` (losses of shape ``(T + 1, M)``, on the CPU); nothing is written.
    """
    row_of = row_of or {train_id: row for row, train_id in enumerate(pool_examples.ids)}
    device = resolve_device(device)
    pool_examples, test_examples = pool_examples.to(device), test_examples.to(device)
    model, opt, scheduler = _start_training(
        task, initial, curriculum, lr, seed, weights, optimizer, schedule, device
    )
    recorder = Recorder.from_task(
        task,
        model,
        test_examples,
        pool=pool_examples.ids,
        run_id=run_id,
        seed=seed,
        metadata=metadata or {},
        scoring=None if scoring is None else replace(scoring, n_steps=len(curriculum)),
    )
    if on_step:
        on_step(0, model)
    steps = _train_steps(
        task, model, opt, scheduler, pool_examples, row_of, curriculum, weights, run_id,
        max_grad_norm,
    )  # fmt: skip
    for step, batch_ids, step_lr in steps:
        recorder.step(batch_ids, lr=step_lr)
        if on_step:
            on_step(step, model)
    return recorder.finish()


def final_test_losses(
    task: Task,
    initial: torch.nn.Module,
    pool_examples: Examples,
    test_examples: Examples,
    curriculum: Sequence[Sequence[str]],
    lr: float,
    seed: int,
    *,
    weights: Sequence[Sequence[float]] | None = None,
    optimizer: dict[str, Any] | None = None,
    schedule: Schedule | None = None,
    device: str | torch.device | None = None,
    max_grad_norm: float | None = None,
) -> np.ndarray:
    """The test losses, shape ``(M,)``, after training exactly as `train_on_curriculum` does
    (bit-identical), scoring only once at the end: for leave-one-out retraining."""
    row_of = {train_id: row for row, train_id in enumerate(pool_examples.ids)}
    device = resolve_device(device)
    pool_examples, test_examples = pool_examples.to(device), test_examples.to(device)
    model, opt, scheduler = _start_training(
        task, initial, curriculum, lr, seed, weights, optimizer, schedule, device
    )
    steps = _train_steps(
        task, model, opt, scheduler, pool_examples, row_of, curriculum, weights,
        max_grad_norm=max_grad_norm,
    )  # fmt: skip
    for _ in steps:
        pass
    return Recorder.from_task(task, model, test_examples).losses[0]


def _start_training(
    task: Task,
    initial: torch.nn.Module,
    curriculum: Sequence[Sequence[str]],
    lr: float,
    seed: int,
    weights: Sequence[Sequence[float]] | None,
    optimizer: dict[str, Any] | None = None,
    schedule: Schedule | None = None,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """A fresh copy of `initial` (on `device`) in training mode, its optimizer (the recorded
    `optimizer` description, `rebuild_optimizer`; None: the task's own) and the scheduler of
    `schedule` (None for a constant rate), after seeding torch (the start of every run,
    recorded or retrained)."""
    _check_weights(curriculum, weights)
    torch.manual_seed(seed)
    model = copy.deepcopy(initial).to(device or "cpu")
    model.train()
    opt = rebuild_optimizer(task, model, lr, optimizer)
    return model, opt, (schedule or Schedule()).scheduler(opt, len(curriculum))


def _train_steps(
    task: Task,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    pool_examples: Examples,
    row_of: dict[str, int],
    curriculum: Sequence[Sequence[str]],
    weights: Sequence[Sequence[float]] | None,
    run_id: str = "run",
    max_grad_norm: float | None = None,
) -> Iterator[tuple[int, Sequence[str], float]]:
    """Take the curriculum's optimizer steps (stepping `scheduler`, when there is one, after
    each); yield ``(step, batch ids, its lr)`` after each."""
    for step, batch_ids in enumerate(curriculum, start=1):
        step_lr = float(optimizer.param_groups[0]["lr"])
        batch_weights = None if weights is None else weights[step - 1]
        _train_step(
            task, model, optimizer, pool_examples, row_of, batch_ids, batch_weights, step, run_id,
            max_grad_norm,
        )  # fmt: skip
        if scheduler is not None:
            scheduler.step()
        yield step, batch_ids, step_lr


def _train_step(
    task: Task,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pool_examples: Examples,
    row_of: dict[str, int],
    batch_ids: Sequence[str],
    weights: Sequence[float] | None,
    step: int,
    run_id: str = "run",
    max_grad_norm: float | None = None,
) -> None:
    """One optimizer step on the batch-mean loss (or ``sum w_k loss_k / |batch|``), its
    gradients clipped to `max_grad_norm` first when given."""
    optimizer.zero_grad(set_to_none=True)
    try:
        inputs = pool_examples.take([row_of[i] for i in batch_ids])
    except KeyError as exc:
        raise RecordingError(
            f"run {run_id!r}: step {step}: training id {exc.args[0]!r} is not in the pool"
        ) from None
    losses = task.example_losses(model, inputs)
    if losses.shape != (len(batch_ids),):
        raise RecordingError(
            f"run {run_id!r}: step {step}: example_losses returned shape "
            f"{tuple(losses.shape)} for a batch of {len(batch_ids)}"
        )
    if weights is None:
        losses.mean().backward()
    else:
        w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
        ((losses * w).sum() / len(batch_ids)).backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


def _check_weights(
    curriculum: Sequence[Sequence[str]], weights: Sequence[Sequence[float]] | None
) -> None:
    if weights is None:
        return
    if len(weights) != len(curriculum):
        raise SimfluenceError(
            f"weights: {len(weights)} batches of weights for a curriculum of {len(curriculum)}"
        )
    for step, (batch, w) in enumerate(zip(curriculum, weights, strict=True), start=1):
        if len(w) != len(batch):
            raise SimfluenceError(
                f"weights: step {step}: {len(w)} weights for a batch of {len(batch)} examples"
            )


@contextmanager
def torch_threads(model: torch.nn.Module, n: int | None = None) -> Iterator[None]:
    """Run the block on `n` torch threads; by default 1 for models under `SMALL_MODEL_PARAMS`
    parameters (much faster for tiny models) and unchanged otherwise."""
    if n is None and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        n = 1
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
