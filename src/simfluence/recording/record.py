"""Record many runs of a `Task` on random curricula, in the paper's protocol (resumable).

Each run draws ``per_run`` training examples of the pool, then trains ``epochs`` epochs over them
in freshly shuffled batches of ``batch`` (`simfluence.curricula.random_curriculum`), always from
the same initial model ``task.make_model(seed)``, with the task's optimizer
``task.make_optimizer(model, lr)`` (plain SGD unless the task overrides it; or the algorithm and
schedule of an `OptimizerSpec` around it, `simfluence.recording.optim`) on the mean of
``task.example_losses`` over the batch (`simfluence.recording.loop`). Every test example is
scored before training and after every step. The options are a `RecordingProtocol`
(`simfluence.recording.protocol`); every option left out defaults to the task's.

Runs are independent work units (`simfluence.recording.workers.RunWork`): a backend
(`simfluence.backends`) trains them in this process (the default), in a pool of local processes,
or as Ray tasks; only this process writes the manifest. The model trains on ``device``.

The run-set directory (`simfluence.runlog.layout`) holds the manifest (pool and test ids;
metadata: the config, i.e. the protocol and the optimizer, the task reference ``task_spec``,
the task's description), one run file per finished run (``run-0000`` ...) and the checkpoints
(`simfluence.recording.checkpoints`). ``config["optimizer"]`` is the optimizer's class name and
hyper-parameters as built by ``task.make_optimizer`` (e.g. ``{"name": "SGD", "lr": 0.1, ...}``).

One process records into a directory at a time (a lock, `simfluence._lock`: a second one is
refused with one line; the lock dies with its process). Files are written atomically and a
run's checkpoints before its run file, so an interrupted recording (Ctrl-C, kill -9, a full
disk: `SimfluenceError` naming the file) is resumed by calling `record_runs` again with the
same protocol (or an empty one: options left out take the values the directory was recorded
with): runs already on disk are skipped (`simfluence.recording.directory`). The same protocol gives
bit-identical losses on the same machine with the same threads per run, whatever the backend.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from simfluence._lock import exclusive_lock
from simfluence.backends import Backend, SerialBackend, close_backend, make_backend, map_units
from simfluence.errors import SimfluenceError
from simfluence.recording.devices import resolve_device
from simfluence.recording.directory import (
    RECORDER_NAME,
    prepare_directory,
    recorded_config,
    remove_stale_temporaries,
)
from simfluence.recording.loop import torch_threads
from simfluence.recording.optim import optimizer_config
from simfluence.recording.protocol import RecordingProtocol
from simfluence.recording.reserve import reserved_ids
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import SPEC_KEY, task_label, task_reference
from simfluence.recording.workers import InThisProcess, RunWork, worker_task_reference
from simfluence.runlog import RunSet, load_runset
from simfluence.runlog.layout import lock_path, run_id_for, run_path
from simfluence.trust import remember_trusted


def record_runs(
    task: Task,
    directory: str | os.PathLike[str],
    protocol: RecordingProtocol | None = None,
    *,
    task_ref: str | None = None,
    device: str | None = None,
    backend: str | Backend | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> RunSet:
    """Record the runs of `protocol` of `task` on random curricula into `directory`; returns
    them.

    Every field of `protocol` left out (None; no protocol: all of them) takes the value
    `directory` was recorded with when resuming, else the task's default
    (`RecordingProtocol.resolve`). Every run has ``T = epochs * ceil(per_run / batch)`` steps;
    its losses have shape ``(T + 1, tests)``. Resumes an interrupted recording in `directory`
    (the same protocol is required; ``runs`` may grow).

    `task_ref`: the reference the task was made from (`resolve_task`), stored in the manifest
    so later commands (and worker processes) rebuild the task; by default inferred from its
    class. `device`: ``auto``, ``cpu`` (default), ``cuda`` or ``cuda:K``. `backend`: ``serial``
    (default), ``process:N``, ``ray[:ADDRESS]`` or a `simfluence.backends` object; other than
    serial, the task must be rebuildable from its reference. `num_threads`: torch CPU threads
    while training in this process (default: 1 for models under a million parameters, else
    unchanged); worker processes use their backend's threads (default 1).

    Raises `SimfluenceError` on a bad protocol (`ProtocolError`, naming the field), or when
    `directory` holds a different recording.
    """
    directory = Path(directory)
    given = protocol or RecordingProtocol()
    protocol = given.resolve(task, recorded_config(directory))
    config = protocol.to_config(task)
    resolve_device(device)  # an unavailable device fails before anything is written
    # a backend that cannot start fails before anything is written; warm workers start now,
    # importing while this process prepares
    runner = make_backend(backend)
    serial = isinstance(runner, SerialBackend)
    if not serial and hasattr(runner, "start"):
        runner.start()
    try:
        return _record(
            task, directory, protocol, config, task_ref, device, runner, progress, num_threads
        )
    finally:
        if runner is not backend:
            close_backend(runner)


def _record(
    task: Task,
    directory: Path,
    protocol: RecordingProtocol,
    config: dict[str, Any],
    task_ref: str | None,
    device: str | None,
    runner: Backend,
    progress: bool,
    num_threads: int | None,
) -> RunSet:
    """`record_runs` with its backend started (the backend is the caller's to close)."""
    serial = isinstance(runner, SerialBackend)
    pool_examples, test_examples = _prepared_examples(task, protocol)
    initial = task.make_model(protocol.seed)
    config.update(optimizer_config(protocol.optimizer, task, copy.deepcopy(initial), protocol.lr))
    metadata = _metadata(task, task_ref, protocol, config, pool_examples.ids)
    if metadata[SPEC_KEY].get("ref"):  # recorded on this machine: later commands may import it
        remember_trusted(metadata[SPEC_KEY]["ref"])
    # a task no worker can rebuild fails before anything is written
    work = RunWork(
        None if serial else worker_task_reference(task, metadata[SPEC_KEY], runner.name),
        str(directory),
        metadata["config"],
        device,
        runner.threads,
    )
    # one process records into a directory at a time: a second one is refused at once
    with exclusive_lock(lock_path(directory), str(directory)):
        prepare_directory(directory, pool_examples.ids, test_examples.ids, metadata)
        todo = [r for r in range(protocol.runs) if not run_path(directory, run_id_for(r)).is_file()]
        examples = (pool_examples, test_examples, initial)
        threads = num_threads if num_threads is not None else runner.threads
        _record_missing(task, work, runner, todo, protocol.n_steps, examples, threads, progress)
        if not serial:  # a worker killed mid-write (and rerun) leaves its temporary file
            remove_stale_temporaries(directory)
        return load_runset(directory).subset([run_id_for(r) for r in range(protocol.runs)])


def _metadata(
    task: Task,
    task_ref: str | None,
    protocol: RecordingProtocol,
    config: dict[str, Any],
    pool_ids: list[str],
) -> dict[str, Any]:
    """The manifest's metadata of a recording: its protocol, task and reserve."""
    metadata = {
        "recorder": RECORDER_NAME,
        "config": {k: v for k, v in config.items() if k != "runs"},
        "runs": protocol.runs,
        SPEC_KEY: _spec(task, task_ref),
        "task": _jsonable(task.describe()),
    }
    if "reserve" in config:
        metadata["reserved_ids"] = reserved_ids(pool_ids, protocol.reserve, protocol.seed)
    return metadata


def _record_missing(
    task: Task,
    work: RunWork,
    runner: Any,
    todo: list[int],
    n_steps: int,
    examples: tuple[Any, Any, Any],
    threads: int | None,
    progress: bool,
) -> None:
    """Record the runs `todo` with `runner` (here, step by step, when it is the serial backend;
    else whole runs in its workers), with a progress bar and, after the first run, an estimate
    of the whole recording's duration."""
    bar = tqdm(
        total=len(todo) * n_steps,
        unit="step",
        disable=not progress or not todo,
        desc=f"recording {task_label(task)}",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    serial = isinstance(runner, SerialBackend)
    if serial:
        work.bind(task, *examples, on_step=lambda: bar.update(1))
    # runs this process records while the workers start (`backends.map_units`)
    here = InThisProcess(work, lambda: (task, *examples), threads)
    parallel = 1 if serial else max(1, getattr(runner, "workers", 1) or 1)
    pinned = torch_threads(examples[2], threads) if serial else contextlib.nullcontext()
    with bar, pinned:
        if not serial:
            bar.set_postfix_str(f"runs 0/{len(todo)} on {runner.name}")
        for done, (_, index) in enumerate(map_units(runner, work, todo, here), start=1):
            if done == 1 and progress:
                _estimate(bar, time.perf_counter() - started, len(todo), parallel)
            if not serial:
                bar.update(n_steps)
            where = f"({run_id_for(index)} done)" if serial else f"on {runner.name}"
            bar.set_postfix_str(f"runs {done}/{len(todo)} {where}")


def _estimate(bar: Any, first: float, runs: int, parallel: int) -> None:
    """One line: how long the recording will take, from its first run."""
    total = first * math.ceil(runs / parallel)
    bar.write(
        f"estimate: about {_duration(total)} for {runs} runs (the first took {_duration(first)})",
        file=sys.stderr,
    )


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def record_defaults(
    task: Task,
    directory: str | os.PathLike[str],
    runs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    reserve: float = 0.0,
) -> RunSet:
    """`record_runs` with the task's default protocol (`RecordingProtocol.task_defaults`:
    `task.defaults`, checkpoints at 4 evenly spaced steps, what the gradient methods need);
    `runs` overrides the number; `reserve` as in `RecordingProtocol`."""
    protocol = RecordingProtocol.task_defaults(task, runs=runs, seed=seed, reserve=reserve)
    return record_runs(task, directory, protocol, progress=progress)


def _prepared_examples(task: Task, protocol: RecordingProtocol) -> tuple[Examples, Examples]:
    """``task.prepare`` of the protocol's pool, tests and seed, checked."""
    pool, tests, seed = protocol.pool, protocol.tests, protocol.seed
    try:
        pool_examples, test_examples = task.prepare(pool, tests, seed)
    except ValueError as exc:
        if isinstance(exc, SimfluenceError):
            raise
        raise SimfluenceError(f"task {task_label(task)!r}: {exc}") from None
    if len(pool_examples) != pool or len(test_examples) != tests:
        raise SimfluenceError(
            f"task {task_label(task)!r}: prepare({pool}, {tests}, {seed}) returned "
            f"{len(pool_examples)} pool and {len(test_examples)} test examples"
        )
    return pool_examples, test_examples


def _spec(task: Task, ref: str | None) -> dict[str, Any]:
    """The task reference to store; when the task cannot be rebuilt, the reason instead (the
    recording itself works; commands that rebuild the task will need --task)."""
    try:
        return task_reference(task, ref)
    except SimfluenceError as exc:
        warnings.warn(
            f"{exc}: later commands that rebuild the task (gradient methods, validate) will "
            "need --task",
            stacklevel=3,
        )
        return {"ref": None, "kwargs": None, "reason": str(exc)}


def _jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (so a manifest compares equal to a fresh description)."""
    return json.loads(json.dumps(obj, default=str))
