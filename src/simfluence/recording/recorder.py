"""Record a run from your own PyTorch training loop: score every test example after every step.

Example (10 lines)::

    from simfluence.recording import Recorder

    model, opt = make_model(), torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, test_examples, loss_fn, pool=pool_ids, directory="runs/", run_id="a")
    for ids, inputs in batches:  # ids: the training ids of this batch
        opt.zero_grad()
        loss_fn(model, inputs).mean().backward()
        opt.step()
        rec.step(ids, lr=0.1)  # scores all test examples (step t)
    run = rec.finish()  # a simfluence.runlog.Run; also written to runs/runs/a.parquet

``loss_fn(model, chunk)`` returns one loss per example of ``chunk``, shape ``(n,)`` (no
reduction). ``chunk`` is a slice of ``test_examples``: for an `Examples` (or a dict of tensors
sharing their first dimension) a dict of tensors of ``n`` rows; for any other sequence the
sliced sequence (e.g. a list of ``n`` dataset items). `Recorder.from_task` uses a `Task`'s
``example_losses`` as the loss function.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simfluence.errors import CurriculumError, RunLogError, SimfluenceError
from simfluence.recording.task import Examples, Task
from simfluence.runlog import Run, read_manifest, write_manifest, write_run
from simfluence.runlog.layout import MANIFEST

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class RecordingError(SimfluenceError):
    """Recording a run failed because of the user's input (ids, loss function, directory)."""


@dataclass(frozen=True)
class Scoring:
    """Which test examples a `Recorder` scores after each step (sparse scoring).

    Scoring every test example after every step is most of what a recording costs. With
    ``every = K`` all test examples are scored every ``K`` steps; with ``fraction = F`` a
    rotating share ``ceil(F * M)`` of them at every (scored) step, so each is scored about
    every ``1 / F`` of those steps, staggered (a seeded permutation of the test examples,
    walked in order). Step 0 and the last step (``n_steps``, when given) are always scored in
    full. The default scores everything (a complete run).

    Attributes:
        every: score at steps that are multiples of this (at least 1).
        fraction: share of the test examples scored at each of those steps, in ``(0, 1]``.
        n_steps: the run's last step, always fully scored (None: unknown; `Recorder.finish`
            then scores whatever the last recorded step missed).
        seed: seed of the rotation's permutation.
    """

    every: int = 1
    fraction: float = 1.0
    n_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int | np.integer):
            raise RecordingError(f"score every {self.every!r}: must be a whole number >= 1")
        if self.every < 1:
            raise RecordingError(f"score every {self.every}: must be a whole number >= 1")
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise RecordingError(f"score fraction {self.fraction!r}: must be in (0, 1]")

    @property
    def full(self) -> bool:
        """Whether every test example is scored after every step."""
        return self.every == 1 and self.fraction == 1

    def columns(self, step: int, n_tests: int) -> np.ndarray | None:
        """The test columns to score after `step`, ascending; None: all of them."""
        if self.full or step == 0 or (self.n_steps is not None and step >= self.n_steps):
            return None
        if step % self.every:
            return np.empty(0, dtype=np.int64)
        if self.fraction == 1:
            return None
        count = min(n_tests, max(1, math.ceil(self.fraction * n_tests)))
        order = _rotation(self.seed, n_tests)
        start = ((step // self.every - 1) * count) % n_tests
        return np.sort(order[(start + np.arange(count)) % n_tests])


@functools.cache
def _rotation(seed: int, n_tests: int) -> np.ndarray:
    """The seeded order in which a rotating share walks the test examples (drawn once, not at
    every scored step)."""
    order = np.random.default_rng(seed).permutation(n_tests)
    order.flags.writeable = False
    return order


def run_scoring(config: Mapping[str, Any], index: int, seed: int = 0) -> Scoring | None:
    """The `Scoring` of run `index` of a recording with this manifest `config`
    (``score_every``, ``score_fraction``, ``score_full_from``); None: full scoring."""
    full_from = config.get("score_full_from")
    scoring = Scoring(
        int(config.get("score_every", 1)), float(config.get("score_fraction", 1.0)), seed=seed
    )
    if scoring.full or (full_from is not None and index >= full_from):
        return None
    return scoring


class Recorder:
    """Scores the test examples before training and after every optimizer step of one run.

    Attributes:
        test_ids: the ``M`` test ids; column ``j`` of `losses` is ``test_ids[j]``.
        pool: the allowed training ids, or None when any id is accepted.
        curriculum: the ``t`` batches recorded so far (lists of str ids).
        lrs: the learning rate of each recorded step (None where not given).
    """

    def __init__(
        self,
        model: nn.Module,
        test_examples: Examples | Mapping[str, torch.Tensor] | Sequence[Any],
        loss_fn: LossFn,
        *,
        test_ids: Sequence[Any] | None = None,
        pool: Sequence[Any] | None = None,
        directory: str | os.PathLike[str] | None = None,
        run_id: str = "run-0000",
        seed: int | None = None,
        metadata: dict[str, Any] | None = None,
        chunk_size: int = 256,
        device: str | torch.device | None = None,
        scoring: Scoring | None = None,
    ) -> None:
        """Check the inputs and score step 0 (the model before training).

        Args:
            model: the model being trained; put in eval mode while scoring, then restored.
            test_examples: ``M`` test examples: an `Examples`, a dict of tensors with first
                dimension ``M``, or any sliceable sequence of length ``M``.
            loss_fn: ``(model, chunk) -> Tensor (n,)``, one loss per example of the chunk.
            test_ids: the ``M`` test ids (default: ``test_examples.ids`` for an `Examples`,
                else ``"0", "1", ...``).
            pool: the training ids the batches may use (default: the manifest's pool when
                `directory` holds one, else any id).
            directory: a run-set directory to write the run into at `finish` (the manifest is
                created if absent; it needs `pool` then).
            run_id: the run's id, unique in its run set.
            seed: stored with the run (the seed that drew its curriculum, if any).
            metadata: stored with the run.
            chunk_size: test examples scored per forward pass.
            device: where the test tensors go before ``loss_fn`` (an `Examples` or a dict of
                tensors; other sequences are passed as they are). Default: the device of the
                model's first parameter (the CPU for a model without parameters). Losses
                always come back to the CPU as float64.
            scoring: which test examples to score after each step (`Scoring`: every ``K``
                steps, a rotating share); default all of them after every step. Losses not
                scored are NaN in `losses` and missing (null) in the written run.
        """
        self.model = model
        self.loss_fn = loss_fn
        self.run_id = str(run_id)
        self.seed = seed
        self.metadata = dict(metadata or {})
        if chunk_size < 1:
            raise RecordingError(f"chunk_size must be at least 1, got {chunk_size}")
        self.chunk_size = chunk_size
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self._examples = test_examples
        n_tests = _length(test_examples)
        if test_ids is None:
            if isinstance(test_examples, Examples):
                test_ids = test_examples.ids
            else:
                test_ids = [str(j) for j in range(n_tests)]
        self.test_ids: list[str] = [str(i) for i in test_ids]
        if len(self.test_ids) != n_tests:
            raise RecordingError(f"{len(self.test_ids)} test ids for {n_tests} test examples")
        if n_tests == 0:
            raise RecordingError("no test examples to score")
        if len(set(self.test_ids)) != n_tests:
            raise RecordingError("test ids must be unique")
        self.pool: list[str] | None = None if pool is None else [str(i) for i in pool]
        self.directory = None if directory is None else Path(directory)
        self._manifest_exists = False
        if self.directory is not None:
            self._check_directory()
        self._pool_set = None if self.pool is None else set(self.pool)
        self.curriculum: list[list[str]] = []
        self.lrs: list[float | None] = []
        self.scoring = scoring or Scoring()
        self._losses: list[np.ndarray] = [self._score(step=0)]

    @classmethod
    def from_task(
        cls, task: Task, model: nn.Module, test_examples: Examples, **kwargs: Any
    ) -> Recorder:
        """A recorder that scores `test_examples` with ``task.example_losses``."""
        return cls(model, test_examples, task.example_losses, **kwargs)

    # -- recording --------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        """Steps recorded so far (step 0, before training, not counted)."""
        return len(self.curriculum)

    @property
    def losses(self) -> np.ndarray:
        """The losses recorded so far, float64, shape ``(n_steps + 1, M)`` (NaN: not scored)."""
        return np.stack(self._losses)

    @property
    def observed(self) -> np.ndarray:
        """``(n_steps + 1, M)`` bool: which losses were scored."""
        return ~np.isnan(self.losses)

    def step(self, batch_ids: Sequence[Any], lr: float | None = None) -> np.ndarray:
        """Record one optimizer step: the ids of the batch it consumed and its learning rate.

        Call it after ``optimizer.step()``. Scores the test examples `scoring` asks for (by
        default every one) and appends the step.
        Returns this step's losses, shape ``(M,)`` (NaN where not scored). On a bad id or a
        bad loss it raises a `SimfluenceError` naming the step and records nothing;
        earlier steps are kept.
        """
        step = self.n_steps + 1
        if isinstance(batch_ids, str | bytes) or not isinstance(
            batch_ids, Sequence | np.ndarray | torch.Tensor
        ):
            raise CurriculumError(
                f"run {self.run_id!r}: step {step}: the batch must be a list of training ids, "
                f"got {batch_ids!r}"
            )
        ids = [_id_str(i) for i in batch_ids]  # ints, numpy or 0-d tensors become str
        if not ids:
            raise CurriculumError(f"run {self.run_id!r}: step {step}: empty batch")
        if self._pool_set is not None:
            for train_id in ids:
                if train_id not in self._pool_set:
                    raise CurriculumError(
                        f"run {self.run_id!r}: step {step}: training id {train_id!r} is not in "
                        f"the pool ({len(self._pool_set)} ids)"
                    )
        if lr is not None:
            lr = float(lr)
            if not math.isfinite(lr):
                raise RecordingError(f"run {self.run_id!r}: step {step}: learning rate is {lr}")
        losses = self._score(step, self.scoring.columns(step, len(self.test_ids)))
        self.curriculum.append(ids)
        self.lrs.append(lr)
        self._losses.append(losses)
        return losses

    def run(self) -> Run:
        """The run recorded so far (without writing it). Needs at least one step."""
        if not self.curriculum:
            raise RecordingError(f"run {self.run_id!r}: no training step was recorded")
        lr = (
            None
            if all(v is None for v in self.lrs)
            else np.array([np.nan if v is None else v for v in self.lrs], dtype=np.float64)
        )
        losses = self.losses
        return Run(
            run_id=self.run_id,
            curriculum=[list(b) for b in self.curriculum],
            losses=losses,
            seed=self.seed,
            lr=lr,
            metadata=dict(self.metadata),
            observed=None if self.scoring.full else ~np.isnan(losses),
        )

    def finish(self) -> Run:
        """The recorded run; written atomically into `directory` when one was given.

        Under sparse `scoring`, the test examples the last step did not score are scored
        now (call it right after the last step: the model must still be in that state)."""
        last = self._losses[-1] if self.curriculum else None
        if last is not None and np.isnan(last).any():
            missing = np.flatnonzero(np.isnan(last))
            last[missing] = self._score(self.n_steps, missing)[missing]
        run = self.run()
        if self.directory is not None:
            if not (self.directory / MANIFEST).is_file():
                assert self.pool is not None  # checked in __init__
                write_manifest(self.directory, self.pool, self.test_ids, {})
            else:
                self._check_directory()
            write_run(self.directory, run, self.test_ids)
        return run

    # -- internals --------------------------------------------------------------------------
    def _check_directory(self) -> None:
        assert self.directory is not None
        if not (self.directory / MANIFEST).is_file():
            if self.pool is None:
                raise RecordingError(
                    f"{self.directory}: has no manifest yet; give the pool of training ids "
                    "(pool=...) so the recorder can create it"
                )
            if len(set(self.pool)) != len(self.pool):
                raise RecordingError("the pool of training ids has duplicates")
            return
        manifest = read_manifest(self.directory)
        where = self.directory / MANIFEST
        if [str(i) for i in manifest["test_ids"]] != self.test_ids:
            raise RunLogError(
                f"{where}: its test ids differ from this recorder's ({len(manifest['test_ids'])} "
                f"vs {len(self.test_ids)} ids); record into another directory"
            )
        pool = [str(i) for i in manifest["train_ids"]]
        if self.pool is not None and set(self.pool) - set(pool):
            extra = sorted(set(self.pool) - set(pool))[0]
            raise RunLogError(
                f"{where}: training id {extra!r} of the given pool is not in the manifest's pool"
            )
        self.pool = pool
        self._pool_set = set(pool)

    def _chunk(self, start: int, stop: int) -> Any:
        examples = self._examples
        if isinstance(examples, Examples):
            rows = examples.take(range(start, stop))
        elif isinstance(examples, Mapping):
            rows = {name: tensor[start:stop] for name, tensor in examples.items()}
        else:
            return examples[start:stop]
        return {name: tensor.to(self.device) for name, tensor in rows.items()}

    def _rows(self, columns: np.ndarray) -> Any:
        examples = self._examples
        if isinstance(examples, Examples):
            rows = examples.take([int(c) for c in columns])
        elif isinstance(examples, Mapping):
            index = torch.as_tensor(columns, dtype=torch.long)
            rows = {name: tensor[index] for name, tensor in examples.items()}
        else:
            return [examples[int(c)] for c in columns]
        return {name: tensor.to(self.device) for name, tensor in rows.items()}

    def _score(self, step: int, columns: np.ndarray | None = None) -> np.ndarray:
        """The loss of every test example now (only `columns`, when given: NaN elsewhere),
        float64, shape ``(M,)``."""
        n_tests = len(self.test_ids)
        out = np.empty(n_tests, dtype=np.float64)
        if columns is not None:
            out[:] = np.nan
            if not len(columns):  # a step sparse scoring skips: no forward pass at all
                return out
        n_scored = n_tests if columns is None else len(columns)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, n_scored, self.chunk_size):
                    stop = min(start + self.chunk_size, n_scored)
                    if columns is None:
                        chunk = self._chunk(start, stop)
                        where: slice | np.ndarray = slice(start, stop)
                    else:
                        where = columns[start:stop]
                        chunk = self._rows(where)
                    values = self.loss_fn(self.model, chunk)
                    if not isinstance(values, torch.Tensor):
                        # float64: a list of Python floats would otherwise become float32
                        values = torch.as_tensor(values, dtype=torch.float64)
                    if tuple(values.shape) != (stop - start,):
                        raise RecordingError(
                            f"run {self.run_id!r}: step {step}: the loss function returned shape "
                            f"{tuple(values.shape)} for {stop - start} test examples; expected "
                            f"({stop - start},), one loss per example with no reduction"
                        )
                    out[where] = values.detach().to("cpu", torch.float64).numpy()
        finally:
            self.model.train(was_training)
        bad = ~np.isfinite(out) if columns is None else ~np.isfinite(out[columns])
        if columns is not None and bad.any():
            bad = np.isin(np.arange(n_tests), columns[bad])
        if bad.any():
            col = int(np.argmax(bad))
            raise RecordingError(
                f"run {self.run_id!r}: step {step}: loss of test example "
                f"{self.test_ids[col]!r} is {out[col]} ({int(bad.sum())} non-finite in all); "
                f"training diverged? {self.n_steps} steps so far are kept (Recorder.run())"
            )
        return out


def _length(examples: Any) -> int:
    if isinstance(examples, Mapping):
        lengths = {int(t.shape[0]) for t in examples.values()}
        if len(lengths) != 1:
            raise RecordingError(
                "the test tensors must share their first dimension (one row per test example)"
            )
        return lengths.pop()
    try:
        return len(examples)
    except TypeError:
        raise RecordingError(
            f"test examples must be an Examples, a dict of tensors or a sequence, got "
            f"{type(examples).__name__}"
        ) from None


def _id_str(train_id: Any) -> str:
    if isinstance(train_id, torch.Tensor | np.generic):
        train_id = train_id.item()
    return str(train_id)
