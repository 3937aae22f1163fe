"""Replaying a recorded run from its step-0 checkpoint, bit for bit (shared by `unrolled` and
`dvemb`, the methods that answer "which examples helped, in the run I trained?").

`load_recorded_run` rebuilds everything a replay needs from a run set: the workload (`Task`),
its pool and test examples, the run's curriculum and learning rates, its optimizer (the
recorded description and gradient clipping), the step-0 checkpoint and every other saved
checkpoint (to check the replay against). `replay_parameters` then repeats the run's optimizer
steps exactly as `simfluence.recording.loop` computed them (the batch-mean loss, then the
optimizer's update: ``p.add_(grad, alpha=-lr)`` for plain SGD, or its differentiable copy in
`simfluence.attribution.optimizers` for SGD with momentum, Adam and AdamW, starting from empty
state at step 0), so the replayed parameters equal the saved checkpoints to the last bit on the
machine that recorded them.
Parameters are a dict ``name -> tensor`` of the model's trainable parameters; the model instance
is never modified (`torch.func.functional_call`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from simfluence.attribution.optimizers import (
    FunctionalOptimizer,
    State,
    UnsupportedOptimizerError,
    functional_optimizer,
)
from simfluence.errors import SimfluenceError
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import prepare_for_runset, task_for_runset, task_label
from simfluence.runlog.runs import Run, RunSet

__all__ = [
    "REPLAY_TOLERANCE",
    "RecordedRun",
    "Replay",
    "ReplayError",
    "ReplayTrace",
    "check_plain_sgd",
    "load_recorded_run",
    "replay_optimizer",
    "task_for_runs",
]

#: default tolerance of the replay checks: max |replayed - recorded| (loss or parameter)
REPLAY_TOLERANCE = 1e-6

Params = dict[str, torch.Tensor]
Inputs = dict[str, torch.Tensor]


class ReplayError(SimfluenceError):
    """Replaying a recorded run did not reproduce it, or cannot (another optimizer)."""


def task_for_runs(runs: RunSet, workload: str | None = None) -> tuple[Task, dict[str, Any]]:
    """The task that recorded `runs` (`simfluence.recording.tasks.task_for_runset`: the
    manifest's task reference, so a user's own `Task` is found too; `workload`: another
    reference to it), and the manifest's ``config``."""
    task = task_for_runset(runs, workload)
    return task, runs.metadata["config"]


def replay_optimizer(
    task: Task,
    model: nn.Module,
    lr: float,
    description: dict[str, Any] | None = None,
    max_grad_norm: float | None = None,
) -> FunctionalOptimizer:
    """The differentiable copy of the optimizer a run trained with: the recorded
    `description` (``config["optimizer"]``; None: the task's own, as the recorder rebuilds
    it), over `model`'s trainable parameters, clipping at `max_grad_norm` when recorded.
    `ReplayError` naming the task and optimizer when there is no copy (see
    `simfluence.attribution.optimizers`)."""
    from simfluence.recording.optim import rebuild_optimizer

    try:
        return functional_optimizer(
            rebuild_optimizer(task, model, lr, description), model, max_grad_norm
        )
    except UnsupportedOptimizerError as exc:
        raise ReplayError(f"task {task_label(task)!r} {exc}") from None


def check_plain_sgd(
    task: Task,
    model: nn.Module,
    lr: float,
    description: dict[str, Any] | None = None,
    max_grad_norm: float | None = None,
) -> None:
    """Raise `ReplayError` unless the run trained with plain SGD (no momentum, weight decay,
    clipping, Nesterov or maximize): what DVEmb's formula assumes."""
    optimizer = replay_optimizer(task, model, lr, description, max_grad_norm)
    if not optimizer.is_plain_sgd:
        raise ReplayError(
            f"task {task_label(task)!r} trains with {optimizer.name} (or SGD with momentum or "
            "weight decay); DVEmb assumes plain SGD: use unrolled, which replays it exactly"
        )


class TaskLoss(nn.Module):
    """``task.example_losses(model, inputs)`` as a module, so `functional_call` applies."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return self.task.example_losses(self.model, inputs)


class Replay:
    """A model's per-example loss as a function of its trainable parameters, and SGD steps.

    Args:
        task: the workload.
        model: an instance of its architecture (its own parameter values are not used).
        checkpoint: ``state_dict`` at step 0; must hold every trainable parameter. Buffers and
            frozen parameters are taken from it when present, else from `model`.

    Attributes:
        start: the step-0 trainable parameters, ``name -> tensor``.
    """

    def __init__(self, task: Task, model: nn.Module, checkpoint: Mapping[str, torch.Tensor]):
        self.task = task
        self.model = model
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ReplayError("the model has no trainable parameters")
        for name in names:
            if name not in checkpoint:
                raise ReplayError(f"the step-0 checkpoint is missing parameter {name!r}")
            if checkpoint[name].shape != dict(model.named_parameters())[name].shape:
                raise ReplayError(
                    f"step-0 checkpoint parameter {name!r} has shape "
                    f"{tuple(checkpoint[name].shape)}, the model expects another"
                )
        state = model.state_dict()
        self._fixed = {
            f"model.{n}": checkpoint.get(n, t).detach().clone()
            for n, t in state.items()
            if n not in names
        }
        self.start: Params = {n: checkpoint[n].detach().clone() for n in names}
        self._wrapper = TaskLoss(task, model)

    def losses(self, params: Params, inputs: Inputs) -> torch.Tensor:
        """Per-example losses ``(n,)`` with `params` substituted (differentiable)."""
        full = dict(self._fixed)
        full.update({f"model.{n}": t for n, t in params.items()})
        return functional_call(self._wrapper, full, (inputs,))

    def sgd_step(self, params: Params, inputs: Inputs, lr: float) -> Params:
        """One SGD step on the batch-mean loss, computed exactly as the runner computes it."""
        leaves, grads = self._batch_gradients(params, inputs)
        return {
            n: p.detach().add(g, alpha=-lr) for (n, p), g in zip(leaves.items(), grads, strict=True)
        }

    def step(
        self,
        params: Params,
        state: State,
        inputs: Inputs,
        lr: float,
        step: int,
        optimizer: FunctionalOptimizer | None,
    ) -> tuple[Params, State]:
        """Step `step` (1-based) of the run: its optimizer's update on the batch-mean loss,
        bit for bit as the runner computes it (`optimizer` None: plain SGD, no state)."""
        if optimizer is None:
            return self.sgd_step(params, inputs, lr), state
        leaves, grads = self._batch_gradients(params, inputs)
        with torch.no_grad():
            plain = {n: p.detach() for n, p in leaves.items()}
            return optimizer.step(plain, dict(zip(plain, grads, strict=True)), state, step, lr)

    def _batch_gradients(
        self, params: Params, inputs: Inputs
    ) -> tuple[Params, tuple[torch.Tensor, ...]]:
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            loss = self.losses(leaves, inputs).mean()
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return leaves, grads

    def test_losses(self, params: Params, tests: Examples, chunk: int = 256) -> np.ndarray:
        """Losses ``(M,)`` at `params`, scored as the recorder scores them (eval, no grad)."""
        out = []
        with _mode(self.model, train=False), torch.no_grad():
            for s in range(0, len(tests), chunk):
                rows = range(s, min(s + chunk, len(tests)))
                out.append(self.losses(params, tests.take(rows)).double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def example_gradients(self, params: Params, examples: Examples, chunk: int = 64) -> Params:
        """Per-example loss gradients ``name -> (n, *shape)`` at `params` (eval mode)."""

        def single(p: Params, row: Inputs) -> torch.Tensor:
            return self.losses(p, {k: v.unsqueeze(0) for k, v in row.items()}).sum()

        parts: dict[str, list[torch.Tensor]] = {n: [] for n in params}
        with _mode(self.model, train=False):
            for s in range(0, len(examples), chunk):
                rows = examples.take(range(s, min(s + chunk, len(examples))))
                g = vmap(grad(single), in_dims=(None, 0))(params, rows)
                for n in parts:
                    parts[n].append(g[n].detach())
        return {n: torch.cat(v) for n, v in parts.items()}


@contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """The model in train or eval mode for the block, restored afterwards."""
    before = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(before)


@dataclass
class ReplayTrace:
    """What `replay_parameters` keeps of a replayed run.

    Attributes:
        kept: ``{step: parameters}`` after the kept steps (always 0 and the last).
        states: ``{step: optimizer state}`` at the same steps (empty tuples for plain SGD).
        rng: the torch RNG state before every step (tasks with dropout).
        error: the largest difference from the saved checkpoints.
    """

    kept: dict[int, Params]
    states: dict[int, State]
    rng: list[torch.Tensor]
    error: float


def replay_parameters(
    replay: Replay,
    batches: Sequence[Inputs],
    lrs: Sequence[float],
    *,
    optimizer: FunctionalOptimizer | None = None,
    keep: Callable[[int], bool] = lambda t: True,
    saved: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    tolerance: float = REPLAY_TOLERANCE,
    before_step: Callable[[int, Params], None] | None = None,
) -> ReplayTrace:
    """Repeat the run's optimizer steps from `replay.start` (train mode, as the runner trains;
    `optimizer` None: plain SGD), keeping the parameters and optimizer state after the steps
    ``t`` where ``keep(t)``; seed torch as the run did before calling. A saved checkpoint
    farther than `tolerance` from the replay is a ``ReplayError``. ``before_step(t, params)``
    is called with ``theta_{t-1}`` before step ``t``."""
    params = replay.start
    state: State = {} if optimizer is None else optimizer.initial_state(params)
    trace = ReplayTrace({0: params}, {0: state}, [], 0.0)
    with _mode(replay.model, train=True):
        for t, (inputs, lr) in enumerate(zip(batches, lrs, strict=True), start=1):
            if before_step is not None:
                before_step(t, params)
            trace.rng.append(torch.get_rng_state())
            params, state = replay.step(params, state, inputs, float(lr), t, optimizer)
            if saved and t in saved:
                trace.error = max(trace.error, compare_parameters(params, saved[t], t, tolerance))
            if keep(t) or t == len(batches):
                trace.kept[t], trace.states[t] = params, state
    return trace


def check_final_losses(
    final_loss: np.ndarray, recorded: np.ndarray | None, tolerance: float = REPLAY_TOLERANCE
) -> float:
    """max |replayed - recorded| final test loss; `ReplayError` beyond `tolerance`."""
    if recorded is None:
        return 0.0
    diff = float(np.max(np.abs(final_loss - np.asarray(recorded, dtype=np.float64))))
    if not diff <= tolerance:
        raise ReplayError(
            f"replaying the run gave final test losses up to {diff:.3g} away from the recorded "
            f"ones (tolerance {tolerance:g}): the task, checkpoint or data differ from the "
            "recording's"
        )
    return diff


def compare_parameters(
    params: Params, saved: Mapping[str, torch.Tensor], step: int, tol: float
) -> float:
    """max |replayed - saved| over the saved trainable parameters after `step`;
    `ReplayError` naming the parameter beyond `tol`."""
    worst = 0.0
    for name, value in params.items():
        if name in saved:
            diff = float((value - saved[name].to(value.dtype)).abs().max())
            if not diff <= tol:
                raise ReplayError(
                    f"replaying the run: parameter {name!r} after step {step} is {diff:.3g} "
                    f"away from the saved checkpoint (tolerance {tol:g})"
                )
            worst = max(worst, diff)
    return worst


@dataclass
class RecordedRun:
    """Everything needed to replay one recorded run.

    Attributes:
        task, model: the workload and an instance of its architecture.
        pool, tests: the run set's examples, rebuilt by ``task.prepare``.
        run: the recorded `Run` (curriculum, losses ``(T + 1, M)``, seed, lr).
        lrs: ``(T,)`` learning rate of every step (the protocol's where not recorded).
        checkpoint: the ``state_dict`` at step 0.
        saved: ``{step: state_dict}`` of the other saved checkpoints.
        optimizer: the recorded optimizer description (``config["optimizer"]``; None: the
            task's own).
        max_grad_norm: the recorded gradient clipping (None: none).
    """

    task: Task
    model: nn.Module
    pool: Examples
    tests: Examples
    run: Run
    lrs: list[float]
    checkpoint: dict[str, torch.Tensor]
    saved: dict[int, dict[str, torch.Tensor]]
    optimizer: dict[str, Any] | None = None
    max_grad_norm: float | None = None

    def replay_optimizer(self) -> FunctionalOptimizer:
        """The differentiable copy of the optimizer this run trained with."""
        return replay_optimizer(
            self.task, self.model, self.lrs[0], self.optimizer, self.max_grad_norm
        )

    def batches(self) -> list[Inputs]:
        """The model inputs of every step's batch."""
        return batch_inputs(self.pool, self.run.curriculum)


def batch_inputs(pool: Examples, curriculum: Sequence[Sequence[str]]) -> list[Inputs]:
    """The model inputs of every batch of `curriculum`; `ReplayError` for an unknown id."""
    row_of = {i: r for r, i in enumerate(pool.ids)}
    out = []
    for step, batch in enumerate(curriculum, start=1):
        try:
            out.append(pool.take([row_of[i] for i in batch]))
        except KeyError as exc:
            raise ReplayError(
                f"step {step}: training id {exc.args[0]!r} is not in the pool"
            ) from None
    return out


def load_recorded_run(
    runs: RunSet,
    run_id: str,
    *,
    workload: str | None = None,
    directory: str | None = None,
    task: Task | None = None,
) -> RecordedRun:
    """Rebuild run `run_id` of `runs` for replaying; `SimfluenceError` naming what is missing
    (no step-0 checkpoint: record with ``--checkpoints 0,...``)."""
    from simfluence.recording.checkpoints import load_checkpoint

    run = runs.run(run_id)
    if task is None:
        task, config = task_for_runs(runs, workload)
    else:
        config = runs.metadata["config"]
    pool, tests = prepare_for_runset(task, runs)
    folder = directory or runs.source
    if folder is None:
        raise SimfluenceError("the run set has no directory to find checkpoints in")
    checkpoint = load_checkpoint(folder, run_id, 0)
    steps = [s for s in run.metadata.get("checkpoint_steps") or [] if 0 < s <= run.n_steps]
    saved = {s: load_checkpoint(folder, run_id, s) for s in steps}
    default = float(config["lr"])
    lrs = [
        float(v) if run.lr is not None and np.isfinite(v) else default
        for v in (run.lr if run.lr is not None else [default] * run.n_steps)
    ]
    return RecordedRun(
        task,
        task.make_model(config["seed"]),
        pool,
        tests,
        run,
        lrs,
        checkpoint,
        saved,
        optimizer=config.get("optimizer"),
        max_grad_norm=config.get("max_grad_norm"),
    )
