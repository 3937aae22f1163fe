"""Record many runs of a `Task` on random curricula, in the paper's protocol (resumable).

Each run draws ``per_run`` training examples of the pool, then trains ``epochs`` epochs over them
in freshly shuffled batches of ``batch`` (`simfluence.curricula.random_curriculum`), always from
the same initial model ``task.make_model(seed)``, with the task's optimizer
``task.make_optimizer(model, lr)`` (plain SGD unless the task overrides it; or the algorithm and
schedule of an `OptimizerSpec` around it, `simfluence.recording.optim`) on the mean of
``task.example_losses`` over the batch. Every test example is scored before training and after
every step. Every protocol option defaults to the task's (`Task.defaults`).

Runs are independent work units (`RunWork`): a backend (`simfluence.backends`) trains them one
after another in this process (the default), in a pool of local processes, or as Ray tasks.
A worker rebuilds the task from the manifest's task reference (``metadata["task_spec"]``,
`simfluence.recording.tasks`), trains one run index and writes that run's files itself; only
this process writes the manifest. The model trains on ``device``.

Layout of the run-set directory (see `simfluence.runlog.store` for the run files)::

    DIR/manifest.json                          pool + test ids; metadata: config (the protocol
                                               and the optimizer), task_spec, task
    DIR/runs/run-0000.parquet ...              one file per finished run
    DIR/checkpoints/run-0000/step-20.pt ...    the model's state_dict at the requested steps

The manifest's ``metadata["task_spec"]`` is ``{"ref", "kwargs"}``
(`simfluence.recording.tasks.task_reference`): later commands rebuild the task from it.
``config["optimizer"]`` is the optimizer's class name and hyper-parameters as built by
``task.make_optimizer`` (e.g. ``{"name": "SGD", "lr": 0.1, "momentum": 0, ...}``).

Run ``r`` is called ``run-{r:04d}``. Its ``seed`` (stored in the run) is
``np.random.SeedSequence([seed, r]).generate_state(1)[0]``; ``np.random.default_rng(run.seed)``
drew its curriculum and ``torch.manual_seed(run.seed)`` was set before it trained, so the same
arguments give bit-identical losses on the same machine with the same threads per run, whatever
the backend (the backend is not part of the recording's configuration; the device is stored in
every run's metadata).

Files are written atomically and a run's checkpoints before its run file, so an interrupted
recording (Ctrl-C, kill -9) is resumed by calling `record_runs` again with the same arguments
(or none: options left out take the values the directory was recorded with): runs already on
disk are skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from simfluence._atomic import atomic_path
from simfluence.backends import Backend, SerialBackend, close_backend, make_backend
from simfluence.curricula import random_curriculum
from simfluence.errors import SimfluenceError
from simfluence.recording.devices import device_label, resolve_device
from simfluence.recording.optim import (
    OptimizerSpec,
    Schedule,
    optimizer_config,
    rebuild_optimizer,
)
from simfluence.recording.recorder import Recorder, RecordingError
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import SPEC_KEY, resolve_task, task_label, task_reference
from simfluence.runlog import Run, RunSet, load_runset, read_manifest, write_manifest, write_run
from simfluence.runlog.store import MANIFEST, RUNS_DIR, run_path

CHECKPOINTS_DIR = "checkpoints"
RECORDER_NAME = "simfluence.recording.runner"
#: models with fewer parameters than this are trained on one CPU thread (faster and steadier)
SMALL_MODEL_PARAMS = 1_000_000


def run_id_for(index: int) -> str:
    """The id of run number `index`: ``run-0000``, ``run-0001``, ..."""
    return f"run-{index:04d}"


def run_seed(seed: int, index: int) -> int:
    """The seed of run number `index` of a recording seeded with `seed` (a uint32)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def steps_per_run(per_run: int, batch: int, epochs: int) -> int:
    """``T = epochs * ceil(per_run / batch)``."""
    return epochs * math.ceil(per_run / batch)


def checkpoint_path(directory: str | os.PathLike[str], run_id: str, step: int) -> Path:
    """Where the checkpoint of run `run_id` at step `step` lives."""
    return Path(directory) / CHECKPOINTS_DIR / run_id / f"step-{int(step)}.pt"


def require_checkpoint(directory: str | os.PathLike[str], run_id: str, step: int) -> Path:
    """The path of run `run_id`'s checkpoint at `step`; `SimfluenceError` naming the run and
    step (and the steps that were saved) when there is none."""
    path = checkpoint_path(directory, run_id, step)
    if not path.is_file():
        saved = (
            sorted(int(p.stem.removeprefix("step-")) for p in path.parent.glob("step-*.pt"))
            if path.parent.is_dir()
            else []
        )
        hint = f"saved steps: {saved}" if saved else "no checkpoints were saved for this run"
        raise SimfluenceError(
            f"{directory}: no checkpoint of run {run_id!r} at step {step} ({hint}; record with "
            "--checkpoints to save some)"
        )
    return path


def load_checkpoint(
    directory: str | os.PathLike[str], run_id: str, step: int
) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` saved for run `run_id` at step `step` (0 = before training).

    Raises `SimfluenceError` naming the run and step when there is no such checkpoint.
    """
    path = require_checkpoint(directory, run_id, step)
    return torch.load(path, map_location="cpu", weights_only=True)


def record_runs(
    task: Task,
    directory: str | os.PathLike[str],
    *,
    runs: int | None = None,
    pool: int | None = None,
    per_run: int | None = None,
    tests: int | None = None,
    batch: int | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    checkpoints: Sequence[int] | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    task_ref: str | None = None,
    reserve: float | None = None,
    reserve_from: int | None = None,
    optimizer: OptimizerSpec | None = None,
    device: str | None = None,
    backend: str | Backend | None = None,
) -> RunSet:
    """Record `runs` runs of `task` on random curricula into `directory`; returns them.

    Every protocol option left out (None) takes the value `directory` was recorded with when
    resuming, else the task's default (`Task.defaults`; `seed` 0). `checkpoints` are steps in
    ``0..T`` at which the model's ``state_dict`` is saved for every run (`load_checkpoint`);
    by default `checkpoint_steps(T)`, 4 evenly spaced steps from 0 (what the gradient methods
    need; ``[]`` saves none). Every run has ``T = epochs * ceil(per_run / batch)`` steps; its
    losses have shape ``(T + 1, tests)``. Resumes an interrupted recording in `directory`
    (the same options are required; `runs` may grow). `num_threads` is the number of torch CPU
    threads while training in this process (default: 1 for models under a million parameters,
    else unchanged); worker processes use their backend's threads (default 1).
    `task_ref` is the reference the task was made from (`resolve_task`), stored in the
    manifest so later commands (and worker processes) rebuild the task; by default it is
    inferred from its class.

    `optimizer`: algorithm and schedule around ``task.make_optimizer`` (default: the task's
    own, constant rate); the optimizer built is stored as ``config["optimizer"]``, a schedule as
    ``config["schedule"]``. `device`: ``auto``, ``cpu`` (default), ``cuda`` or ``cuda:K``.
    `backend`: ``serial`` (default), ``process:N``, ``ray[:ADDRESS]`` or a
    `simfluence.backends` object; other than serial, the task must be rebuildable from its
    reference (a built-in workload, an importable class, a ``file.py:Class`` or a plugin).

    The never-seen protocol: with ``reserve = f > 0`` a share `f` of the pool (drawn by `seed`,
    listed in the manifest's ``metadata["reserved_ids"]``) is consumed only by the runs whose
    index is at least `reserve_from` (the held-out runs: by default the last ``round(5 * runs /
    32)``, the runs `simfluence evaluate` holds out by default); those runs draw from the whole
    pool, every other run from the rest. Left out (None), `reserve` is the share `directory`
    was recorded with when resuming, else 0.

    Raises `SimfluenceError` on bad options, or when `directory` holds a different recording.
    """
    spec = optimizer or OptimizerSpec()
    directory = Path(directory)
    options = _protocol(
        task,
        directory,
        runs=runs,
        pool=pool,
        per_run=per_run,
        tests=tests,
        batch=batch,
        epochs=epochs,
        lr=lr,
        seed=seed,
        checkpoints=checkpoints,
    )
    config = _check_config(task, **options)
    runs, pool, tests, seed = options["runs"], options["pool"], options["tests"], options["seed"]
    if reserve is None:  # resuming: the share the directory was recorded with, else none
        recorded = _recorded_config(directory)
        reserve = recorded.get("reserve", 0.0)
        if reserve_from is None:
            reserve_from = recorded.get("reserve_from")
    config |= _check_reserve(reserve, reserve_from, runs, pool, options["per_run"])
    n_steps = config["steps"]
    spec.schedule_.check_steps(n_steps)
    resolve_device(device)  # an unavailable device fails before anything is written
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
    initial = task.make_model(seed)
    config.update(optimizer_config(spec, task, copy.deepcopy(initial), config["lr"]))
    metadata = {
        "recorder": RECORDER_NAME,
        "config": {k: v for k, v in config.items() if k != "runs"},
        "runs": runs,
        SPEC_KEY: _spec(task, task_ref),
        "task": _jsonable(task.describe()),
    }

    if "reserve" in config:
        metadata["reserved_ids"] = reserved_ids(pool_examples.ids, config["reserve"], seed)
    # a backend that cannot start, or a task no worker can rebuild, fails before anything is
    # written
    runner = make_backend(backend)
    serial = isinstance(runner, SerialBackend)
    work = RunWork(
        None if serial else worker_task_reference(task, metadata[SPEC_KEY], runner.name),
        str(directory),
        metadata["config"],
        device,
        runner.threads,
    )
    _prepare_directory(directory, pool_examples.ids, test_examples.ids, metadata)
    todo = [r for r in range(runs) if not run_path(directory, run_id_for(r)).is_file()]
    bar = tqdm(
        total=len(todo) * n_steps,
        unit="step",
        disable=not progress or not todo,
        desc=f"recording {task_label(task)}",
        dynamic_ncols=True,
    )
    try:
        if serial:
            work.bind(task, pool_examples, test_examples, initial, on_step=lambda: bar.update(1))
            threads = num_threads if num_threads is not None else runner.threads
            with bar, torch_threads(initial, threads):
                for done, (_, index) in enumerate(runner.map_unordered(work, todo), start=1):
                    bar.set_postfix_str(f"runs {done}/{len(todo)} ({run_id_for(index)} done)")
        else:
            with bar:
                bar.set_postfix_str(f"runs 0/{len(todo)} on {runner.name}")
                for done, _ in enumerate(runner.map_unordered(work, todo), start=1):
                    bar.update(n_steps)
                    bar.set_postfix_str(f"runs {done}/{len(todo)} on {runner.name}")
    finally:
        if runner is not backend:
            close_backend(runner)
    return load_runset(directory).subset([run_id_for(r) for r in range(runs)])


def checkpoint_steps(n_steps: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced steps from 0 to ``n_steps`` inclusive (TracIn-CP's checkpoints)."""
    return sorted({round(k * n_steps / (count - 1)) for k in range(count)})


def record_defaults(
    task: Task,
    directory: str | os.PathLike[str],
    runs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    reserve: float = 0.0,
) -> RunSet:
    """`record_runs` with the task's default protocol (`task.defaults`) and checkpoints at
    4 evenly spaced steps (what the gradient methods need); `runs` overrides the number;
    `reserve` as in `record_runs`."""
    d = task.defaults
    protocol = {**dataclasses.asdict(d), "runs": runs or d.runs}
    n_steps = steps_per_run(d.per_run, d.batch, d.epochs)
    return record_runs(
        task,
        directory,
        **protocol,
        seed=seed,
        checkpoints=checkpoint_steps(n_steps),
        progress=progress,
        reserve=reserve,
    )


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


def _recorded_config(directory: Path) -> dict[str, Any]:
    """The config (and ``runs``) `directory` was recorded with by `record_runs`; {} if none."""
    if not (directory / MANIFEST).is_file():
        return {}
    try:
        meta = read_manifest(directory).get("metadata") or {}
    except SimfluenceError:
        return {}
    if meta.get("recorder") != RECORDER_NAME:
        return {}
    return {**(meta.get("config") or {}), "runs": meta.get("runs")}


def _protocol(task: Task, directory: Path, **given: Any) -> dict[str, Any]:
    """The options of a recording: the given ones, else those `directory` was recorded with,
    else the task's defaults (checkpoints: `checkpoint_steps` of the run length)."""
    recorded = _recorded_config(directory)
    defaults = {**dataclasses.asdict(task.defaults), "seed": 0}
    out = {}
    for key, default in defaults.items():
        value = given[key]
        if value is None:
            value = recorded[key] if recorded.get(key) is not None else default
        out[key] = value
    if given["checkpoints"] is not None:
        out["checkpoints"] = given["checkpoints"]
    elif "checkpoints" in recorded:
        out["checkpoints"] = recorded["checkpoints"]
    else:
        per_run, batch, epochs = out["per_run"], out["batch"], out["epochs"]
        valid = all(isinstance(v, int) and v > 0 for v in (per_run, batch, epochs))
        n_steps = steps_per_run(per_run, batch, epochs) if valid else 0
        out["checkpoints"] = checkpoint_steps(n_steps) if valid else []
    return out


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
                _save_checkpoint(directory, run_id, step, model)
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
        )
        write_run(directory, run, prepared.tests.ids)
        return index


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


def _check_reserve(
    reserve: float, reserve_from: int | None, runs: int, pool: int, per_run: int
) -> dict[str, Any]:
    """Config entries of the never-seen protocol (none when `reserve` is 0, so the config of
    an ordinary recording is unchanged)."""
    reserve = float(reserve)
    if not math.isfinite(reserve) or not 0 <= reserve < 1:
        raise SimfluenceError(f"--reserve {reserve}: must be a share of the pool in [0, 1)")
    if reserve == 0:
        if reserve_from is not None:
            raise SimfluenceError("--reserve-from needs --reserve")
        return {}
    first = runs - max(1, round(runs * 5 / 32)) if reserve_from is None else reserve_from
    if isinstance(first, bool) or not isinstance(first, int | np.integer) or not 0 < first < runs:
        raise SimfluenceError(
            f"--reserve-from {first!r}: must be a run index between 1 and {runs - 1} (runs from "
            "it on are the held-out runs that may draw the reserved examples)"
        )
    open_pool = pool - round(reserve * pool)
    if per_run > open_pool:
        raise SimfluenceError(
            f"--reserve {reserve}: leaves {open_pool} examples for the training runs, fewer than "
            f"--per-run {per_run}"
        )
    return {"reserve": reserve, "reserve_from": int(first)}


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
) -> Run:
    """Train a fresh copy of `initial` on `curriculum` (``task.make_optimizer(model, lr)`` on
    the batch-mean loss, as the runner does) and score every test example before training and
    after every step.

    `optimizer`: a recorded optimizer description (``config["optimizer"]``,
    `simfluence.recording.optim.rebuild_optimizer`); None: the task's own. `schedule`: the
    learning-rate schedule over this curriculum's steps (default: constant).
    `on_step(step, model)` is called at step 0 (before training) and after every step.
    `weights`: optional per-example loss weights, one list per batch (same lengths as the
    curriculum); the step then minimises ``sum_k w_k loss_k / |batch|`` (weight 0 keeps an
    example in its batch without effect: "zero-weight" removal). None: the plain batch mean.
    `device`: where to train (model and examples are moved there; default: the CPU).
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
    )
    if on_step:
        on_step(0, model)
    steps = _train_steps(
        task, model, opt, scheduler, pool_examples, row_of, curriculum, weights, run_id
    )
    for step, batch_ids, step_lr in steps:
        recorder.step(batch_ids, lr=step_lr)
        if on_step:
            on_step(step, model)
    return recorder.run()


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
) -> np.ndarray:
    """The test losses, shape ``(M,)``, after training exactly as `train_on_curriculum` does
    (bit-identical), scoring only once at the end: for leave-one-out retraining."""
    row_of = {train_id: row for row, train_id in enumerate(pool_examples.ids)}
    device = resolve_device(device)
    pool_examples, test_examples = pool_examples.to(device), test_examples.to(device)
    model, opt, scheduler = _start_training(
        task, initial, curriculum, lr, seed, weights, optimizer, schedule, device
    )
    for _ in _train_steps(task, model, opt, scheduler, pool_examples, row_of, curriculum, weights):
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
) -> Iterator[tuple[int, Sequence[str], float]]:
    """Take the curriculum's optimizer steps (stepping `scheduler`, when there is one, after
    each); yield ``(step, batch ids, its lr)`` after each."""
    for step, batch_ids in enumerate(curriculum, start=1):
        step_lr = float(optimizer.param_groups[0]["lr"])
        batch_weights = None if weights is None else weights[step - 1]
        _train_step(
            task, model, optimizer, pool_examples, row_of, batch_ids, batch_weights, step, run_id
        )
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
) -> None:
    """One optimizer step on the batch-mean loss (or ``sum w_k loss_k / |batch|``)."""
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


def _save_checkpoint(directory: Path, run_id: str, step: int, model: torch.nn.Module) -> None:
    state = {name: t.detach().to("cpu").clone() for name, t in model.state_dict().items()}
    with atomic_path(checkpoint_path(directory, run_id, step)) as tmp:
        torch.save(state, tmp)


def _check_config(
    task: Task,
    runs: int,
    pool: int,
    per_run: int,
    tests: int,
    batch: int,
    epochs: int,
    lr: float,
    seed: int,
    checkpoints: Sequence[int],
) -> dict[str, Any]:
    for flag, value in [
        ("--runs", runs),
        ("--pool", pool),
        ("--per-run", per_run),
        ("--tests", tests),
        ("--batch", batch),
        ("--epochs", epochs),
    ]:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise SimfluenceError(f"{flag} {value!r}: must be a whole number of at least 1")
    if per_run > pool:
        raise SimfluenceError(f"--per-run {per_run}: must not exceed the pool size {pool}")
    if batch > per_run:
        raise SimfluenceError(f"--batch {batch}: must not exceed --per-run {per_run}")
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise SimfluenceError(f"--lr {lr}: must be a positive number")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise SimfluenceError(f"--seed {seed!r}: must be a whole number >= 0")
    n_steps = steps_per_run(per_run, batch, epochs)
    steps: list[int] = []
    for step in checkpoints:
        if isinstance(step, bool) or not isinstance(step, int | np.integer):
            raise SimfluenceError(f"--checkpoints: {step!r} is not a step number")
        if not 0 <= step <= n_steps:
            raise SimfluenceError(
                f"--checkpoints: step {step} is outside 0..{n_steps} (a run has {n_steps} steps: "
                f"{epochs} epochs x ceil({per_run} / {batch}) batches)"
            )
        steps.append(int(step))
    return {
        "workload": task_label(task),
        "runs": int(runs),
        "pool": int(pool),
        "per_run": int(per_run),
        "tests": int(tests),
        "batch": int(batch),
        "epochs": int(epochs),
        "lr": lr,
        "seed": int(seed),
        "steps": n_steps,
        "checkpoints": sorted(set(steps)),
    }


def _prepare_directory(
    directory: Path, train_ids: list[str], test_ids: list[str], metadata: dict[str, Any]
) -> None:
    """Create the manifest, or check that the existing one is this recording's."""
    if directory.exists() and not directory.is_dir():
        raise SimfluenceError(f"{directory}: exists and is not a directory")
    if not (directory / MANIFEST).is_file():
        if directory.is_dir() and any(directory.iterdir()):
            raise SimfluenceError(
                f"{directory}: is not empty and has no {MANIFEST}; choose an empty or new directory"
            )
        write_manifest(directory, train_ids, test_ids, metadata)
        return
    manifest = read_manifest(directory)
    old = manifest.get("metadata", {})
    hint = "choose another directory, or rerun with the options it was recorded with"
    if old.get("recorder") != RECORDER_NAME:
        raise SimfluenceError(
            f"{directory}: holds a run set that was not recorded by `simfluence record`; {hint}"
        )
    old_config = old.get("config") or {}
    # recordings older than the optimizer key: compare what they recorded
    new_config = {
        k: v for k, v in metadata["config"].items() if k in old_config or k != "optimizer"
    }
    for key, before, now in (
        ("config", old_config, new_config),
        ("task", old.get("task"), metadata["task"]),
    ):
        if before != now:
            diffs = _diff(before or {}, now)
            raise SimfluenceError(
                f"{directory}: holds a recording with a different {key} ({diffs}); {hint}"
            )
    if manifest["train_ids"] != train_ids or manifest["test_ids"] != test_ids:
        raise SimfluenceError(
            f"{directory}: its pool or test ids differ from this recording's; {hint}"
        )
    spec = _resumed_spec(directory, old.get(SPEC_KEY), metadata[SPEC_KEY], hint)
    if old.get("runs") != metadata["runs"] or old.get(SPEC_KEY) != spec:
        updated = {**old, "runs": metadata["runs"], SPEC_KEY: spec}
        write_manifest(directory, train_ids, test_ids, updated)
    _remove_stale_temporaries(directory)


def _resumed_spec(
    directory: Path, old: dict[str, Any] | None, new: dict[str, Any], hint: str
) -> dict[str, Any]:
    """The task reference to keep when resuming: the newest one that works. The same class
    with other constructor arguments is another task; a changed reference (the file moved, a
    subclass) is judged by the task's name and description only."""
    same_class = old and old.get("ref") == new.get("ref") and new.get("kwargs") is not None
    if same_class and old.get("kwargs") != new["kwargs"]:
        raise SimfluenceError(
            f"{directory}: holds a recording of the task with other constructor arguments "
            f"({_diff(old.get('kwargs') or {}, new['kwargs'])}); {hint}"
        )
    return new if new.get("ref") is not None or not old else old


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary files an interrupted (killed) recording left behind."""
    for folder in [directory / RUNS_DIR, *(directory / CHECKPOINTS_DIR).glob("*")]:
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The first differing keys, ``key: X there, Y now`` (nested dicts by dotted key)."""
    parts = []
    for k in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(_diff(a, b, f"{prefix}{k}."))
        else:
            parts.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return "; ".join(parts[:3])


def _jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (so a manifest compares equal to a fresh description)."""
    return json.loads(json.dumps(obj, default=str))


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
