"""The distributed work of a recording: one run is one picklable work unit (`RunWork`).

A backend (`simfluence.backends`) trains the units one after another in this process, in a pool
of local processes, or as Ray tasks. A worker rebuilds the task from the manifest's task
reference (``metadata["task_spec"]``, `simfluence.recording.tasks`; `worker_task_reference`
checks that it can), prepares its examples and initial model once (`prepared_in_worker`), trains
the run indices it is given and writes each run's files itself.

Run ``r``'s ``seed`` is ``np.random.SeedSequence([seed, r]).generate_state(1)[0]`` (`run_seed`):
``np.random.default_rng(run.seed)`` draws its curriculum and ``torch.manual_seed(run.seed)`` is
set before it trains, so a run's losses do not depend on the backend.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simfluence.curricula import random_curriculum
from simfluence.errors import SimfluenceError
from simfluence.recording.checkpoints import save_checkpoint
from simfluence.recording.devices import device_label, resolve_device
from simfluence.recording.loop import torch_threads, train_on_curriculum
from simfluence.recording.optim import Schedule
from simfluence.recording.recorder import run_scoring
from simfluence.recording.reserve import drawable_ids
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import resolve_task, task_label, task_reference
from simfluence.runlog import write_run
from simfluence.runlog.layout import run_id_for


def run_seed(seed: int, index: int) -> int:
    """The seed of run number `index` of a recording seeded with `seed` (a uint32)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def worker_task_reference(task: Task, spec: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """A task reference (``{"ref", "kwargs"}``) that worker processes rebuild `task` from,
    checked to rebuild a task of the same class here.

    `spec`: the reference stored in the run set's manifest (``metadata["task_spec"]``); None:
    inferred from `task`'s class (`task_reference`). Raises `SimfluenceError` saying why
    when the task cannot be rebuilt (a class defined inside a function or interactively).
    """
    label = task_label(task)
    if spec is None:
        try:
            spec = task_reference(task)
        except SimfluenceError as exc:
            spec = {"ref": None, "reason": str(exc)}
    if not spec.get("ref"):
        reason = spec.get("reason", "no reference was stored")
        raise SimfluenceError(
            f"backend {where}: task {label!r} cannot be rebuilt in a worker process "
            f"({reason}); or run without --workers/--ray"
        )
    try:
        rebuilt = resolve_task(spec["ref"], spec.get("kwargs"))
    except SimfluenceError as exc:
        raise SimfluenceError(
            f"backend {where}: task {label!r} cannot be rebuilt in a worker process from "
            f"{spec['ref']!r} ({exc}); define it in an importable module or file, or run "
            "without --workers/--ray"
        ) from None
    if type(rebuilt).__qualname__ != type(task).__qualname__:
        raise SimfluenceError(
            f"backend {where}: task reference {spec['ref']!r} rebuilds a "
            f"{type(rebuilt).__name__}, not a {type(task).__name__}"
        )
    return {"ref": spec["ref"], "kwargs": spec.get("kwargs") or {}}


@dataclass
class _Prepared:
    """What every run of a recording shares: the task, its examples (on the device), the
    initial model and the pool's row of every id."""

    task: Task
    pool: Examples
    tests: Examples
    initial: torch.nn.Module
    row_of: dict[str, int]
    device: torch.device


#: per worker process: the recording it prepared last (rebuilding a task can take seconds)
_PREPARED: dict[str, _Prepared] = {}


@dataclass
class RunWork:
    """The work unit of a recording: ``work(index)`` trains run `index` and writes its run
    file (and checkpoints) into `directory` atomically; returns the index.

    Picklable: a worker process rebuilds the task from `task_ref` (``{"ref", "kwargs"}``) and
    prepares its examples once, then reuses them for every run it is given. In this process,
    `bind` hands it the live task instead.
    """

    task_ref: dict[str, Any] | None
    directory: str
    config: dict[str, Any]
    device: str | None = None
    threads: int | None = None
    _live: _Prepared | None = field(default=None, repr=False)
    _on_step: Callable[[], None] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None, "_on_step": None}

    def bind(
        self,
        task: Task,
        pool: Examples,
        tests: Examples,
        initial: torch.nn.Module,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        """Use these live objects (this process) instead of rebuilding the task."""
        device = resolve_device(self.device)
        self._live = _prepare(task, pool, tests, initial, device)
        self._on_step = on_step

    def _prepared(self) -> _Prepared:
        if self._live is not None:
            return self._live
        return prepared_in_worker(self.task_ref, self.config, self.device)

    def __call__(self, index: int) -> int:
        prepared = self._prepared()
        if self.threads is not None and self._live is None:
            torch.set_num_threads(self.threads)
        config = self.config
        directory = Path(self.directory)
        run_id = run_id_for(index)
        seed = run_seed(config["seed"], index)
        curriculum = random_curriculum(
            drawable_ids(prepared.pool.ids, config, index),
            config["per_run"],
            config["batch"],
            config["epochs"],
            np.random.default_rng(seed),
        )
        ckpt_steps = set(config["checkpoints"])

        def on_step(step: int, model: torch.nn.Module) -> None:
            if step in ckpt_steps:
                save_checkpoint(directory, run_id, step, model)
            if step and self._on_step is not None:
                self._on_step()

        run = train_on_curriculum(
            prepared.task,
            prepared.initial,
            prepared.pool,
            prepared.tests,
            curriculum,
            config["lr"],
            seed,
            run_id=run_id,
            row_of=prepared.row_of,
            on_step=on_step,
            metadata={
                "run_index": index,
                "checkpoint_steps": sorted(ckpt_steps),
                "device": device_label(prepared.device),
            },
            optimizer=config.get("optimizer"),
            schedule=Schedule.from_config(config.get("schedule")),
            device=prepared.device,
            max_grad_norm=config.get("max_grad_norm"),
            scoring=run_scoring(config, index, seed),
        )
        write_run(directory, run, prepared.tests.ids)
        return index


class InThisProcess:
    """A work unit run in this process, as a worker runs it: a copy of `work` bound (at its
    first call) to the live task, examples and initial model `bind()` returns, each unit on
    `threads` torch threads (`torch_threads`). What `backends.map_units` takes as ``here``."""

    def __init__(
        self,
        work: Any,
        bind: Callable[[], tuple[Task, Examples, Examples, torch.nn.Module]],
        threads: int | None,
    ) -> None:
        self._work, self._bind, self._threads = work, bind, threads
        self._bound: Any = None
        self._model: torch.nn.Module | None = None

    def __call__(self, item: Any) -> Any:
        if self._bound is None:
            task, pool, tests, self._model = self._bind()
            self._bound = copy.copy(self._work)
            self._bound.bind(task, pool, tests, self._model)
        with torch_threads(self._model, self._threads):
            return self._bound(item)


def prepared_in_worker(
    task_ref: dict[str, Any] | None, config: dict[str, Any], device: str | None
) -> _Prepared:
    """The task `task_ref` (``{"ref", "kwargs"}``) rebuilt in this (worker) process, with the
    examples and initial model of the run set's `config` on `device`; kept for the next unit
    of the same recording or validation (rebuilding a task can take seconds)."""
    if task_ref is None:
        raise SimfluenceError("no task reference to rebuild the task from in a worker process")
    c = config
    key = json.dumps([task_ref, c["pool"], c["tests"], c["seed"], device])
    if key not in _PREPARED:
        _PREPARED.clear()
        task = resolve_task(task_ref["ref"], task_ref["kwargs"])
        pool, tests = task.prepare(c["pool"], c["tests"], c["seed"])
        initial = task.make_model(c["seed"])
        _PREPARED[key] = _prepare(task, pool, tests, initial, resolve_device(device))
    return _PREPARED[key]


def _prepare(
    task: Task, pool: Examples, tests: Examples, initial: torch.nn.Module, device: torch.device
) -> _Prepared:
    row_of = {train_id: row for row, train_id in enumerate(pool.ids)}
    return _Prepared(task, pool.to(device), tests.to(device), initial.to(device), row_of, device)
