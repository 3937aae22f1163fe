"""Leave-one-out ground truth: "which examples helped, in the run I trained?", checked by
actually retraining that run's curriculum without them.

A held-out recorded run's curriculum is retrained (bit-identically to the recording) once per
removal, and every method's predicted effects are compared with the actual ones. Two
definitions of "remove example ``i``" (`REMOVAL_OF_KIND`), whose truths rank examples
differently:

* ``loo`` (``renormalize``): every occurrence of ``i`` is dropped and its batches re-averaged
  (the batch mates gain weight; an emptied batch vanishes), as `simfluence.curricula.remove`
  and retraining on a shorter list do;
* ``loo-weight0`` (``zero-weight``): ``i`` stays in its batches with loss weight 0 (the runner's
  per-example weights), which is what influence functions, DVEmb and metagradients estimate.

Effects are ``L_T(with) - L_T(without)`` per test example, negative = helpful. Per method:
mean per-test Spearman and Pearson across the examples, the sign agreement of the 10 examples
it calls most helpful, the effect-size ratio (`simfluence.metrics`), and the LDS over group
removals (``groups`` random sets of 10% of the run's distinct examples, each retrained).
Simulators are fitted on the other recorded runs and answer by simulated removal; methods with
a run-specific answer (a ``run_removal_effects`` method: ``unrolled``, ``dvemb``, ``combined``)
replay the held-out run itself (``combined`` with its simulator fitted on the other runs).

The retrains are independent work units (`RemovalWork`: a chunk of removals of one held-out
run), so a backend (`simfluence.backends`: local processes, Ray) runs several at once, with
the same losses as one after another (every retrain starts from the recording's seed).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from simfluence import metrics
from simfluence.attribution.smoothness import (
    per_batch_weights,
    random_directions,
    smoothness_from_retrains,
    smoothness_weights,
)
from simfluence.backends import Backend, SerialBackend, close_backend, make_backend, map_units
from simfluence.counterfactual.attribution import removal_effects
from simfluence.curricula import remove
from simfluence.errors import SimfluenceError
from simfluence.recording.loop import final_test_losses, torch_threads
from simfluence.recording.optim import Schedule
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import prepare_for_runset
from simfluence.recording.workers import (
    InThisProcess,
    prepared_in_worker,
    worker_task_reference,
)
from simfluence.runlog.runs import Curriculum, Run, RunSet
from simfluence.simulators.base import Simulator

__all__ = ["LOO_KINDS", "REMOVAL_OF_KIND", "actual_removal_effects", "split_timing", "validate_loo"]

REMOVAL_OF_KIND = {"loo": "renormalize", "loo-weight0": "zero-weight"}
LOO_KINDS = tuple(REMOVAL_OF_KIND)
#: share of the run's distinct examples removed together in each LDS group
GROUP_FRACTION = 0.1
#: the `RemovalWork` "removal" whose groups are per-consumption loss weights
WEIGHTS = "weights"
#: a backend's retrains are cut into units of decreasing size, each at most the retrains left
#: over this many times its parallelism ("guided" scheduling: few units, and small ones last,
#: so no worker waits long for another at the end)
GUIDED_SHARE = 2
TOP = 10

Progress = Callable[[Iterable[Any], int], Iterable[Any]]


@dataclass
class RemovalWork:
    """The work unit of leave-one-out validation: ``work((curriculum, seed, removal,
    groups))`` retrains `curriculum` without each group (``None``: the full curriculum) and
    returns the final test losses ``(M, len(groups))``. With `removal` ``"weights"`` a group is
    instead the loss weight of every consumption, one list per batch (the smoothness
    measurement's retrains).

    Picklable: a worker rebuilds the task from `task_ref` once (`prepared_in_worker`); `bind`
    gives it live objects (this process).
    """

    task_ref: dict[str, Any] | None
    config: dict[str, Any]
    device: str | None = None
    threads: int | None = None
    _live: tuple[Task, Examples, Examples, Any] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None}

    def bind(self, task: Task, pool: Examples, tests: Examples, initial: Any) -> None:
        """Use these live objects (this process) instead of rebuilding the task."""
        self._live = (task, pool, tests, initial)

    def __call__(self, item: tuple[Curriculum, int, str, list[list[str] | None]]) -> np.ndarray:
        curriculum, seed, removal, groups = item
        if self._live is not None:
            task, pool, tests, initial = self._live
        else:
            p = prepared_in_worker(self.task_ref, self.config, self.device)
            task, pool, tests, initial = p.task, p.pool, p.tests, p.initial
            if self.threads is not None:
                torch.set_num_threads(self.threads)
        config = self.config
        schedule = Schedule.from_config(config.get("schedule"))
        out = []
        for group in groups:
            weights, batches = None, curriculum
            if group is not None and removal == WEIGHTS:
                weights = group
            elif group is not None and removal == "renormalize":
                batches = remove(curriculum, sorted(set(group)))
            elif group is not None:
                gone = set(group)
                weights = [[0.0 if i in gone else 1.0 for i in b] for b in curriculum]
            out.append(
                final_test_losses(
                    task,
                    initial,
                    pool,
                    tests,
                    batches,
                    config["lr"],
                    seed,
                    weights=weights,
                    optimizer=config.get("optimizer"),
                    schedule=schedule,
                    device=self.device,
                    max_grad_norm=config.get("max_grad_norm"),
                )
            )
        return np.stack(out, axis=1)


def removal_units(
    curriculum: Curriculum, seed: int, removal: str, groups: Sequence[Any], chunk: int
) -> list[tuple[Curriculum, int, str, list[Any]]]:
    """`RemovalWork` items: the full retrain, then the groups, `chunk` retrains per item."""
    todo: list[Any] = [None, *(list(g) for g in groups)]
    return [(curriculum, seed, removal, todo[k : k + chunk]) for k in range(0, len(todo), chunk)]


def guided_units(
    jobs: Sequence[tuple[Run, str, Sequence[Any]]], parallelism: int
) -> tuple[list[tuple[Curriculum, int, str, list[Any]]], list[int]]:
    """Every job's retrains (its full retrain, then its groups) as `RemovalWork` items of
    decreasing size: each holds at most ``1 / (GUIDED_SHARE * parallelism)`` of the retrains
    left (at least one), and never spans two jobs. Returns ``(items, owner)``: ``owner[k]`` is
    the job of item ``k``; a job's items are in order."""
    left = sum(len(groups) + 1 for _, _, groups in jobs)
    items: list[tuple[Curriculum, int, str, list[Any]]] = []
    owner: list[int] = []
    for j, (run, removal, groups) in enumerate(jobs):
        todo: list[Any] = [None, *(list(g) for g in groups)]
        start = 0
        while start < len(todo):
            size = max(1, math.ceil(left / (GUIDED_SHARE * parallelism)))
            items.append((run.curriculum, run.seed, removal, todo[start : start + size]))
            owner.append(j)
            left -= len(items[-1][3])
            start += size
    return items, owner


def actual_removal_effects(
    task: Task,
    initial_model: Any,
    pool: Examples,
    tests: Examples,
    run: Run,
    lr: float,
    groups: Sequence[Sequence[str]],
    removal: str,
    progress: Progress | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Retrain `run`'s curriculum once per group removed; ``(full (M,), effects (M, G))``.

    ``effects[:, g] = L_T(full) - L_T(without group g)`` from real training (seed and initial
    model of the recording, and its optimizer and schedule from the run set's `config`, so the
    full retrain reproduces the recorded run). In this process, one retrain after another.
    """
    work = RemovalWork(None, {**(config or {}), "lr": lr})
    work.bind(task, pool, tests, initial_model)
    wrap = progress or (lambda items, total: items)
    items = removal_units(run.curriculum, run.seed, removal, groups, 1)
    with torch_threads(initial_model):
        losses = np.concatenate([work(item) for item in wrap(items, len(items))], axis=1)
    return losses[:, 0], losses[:, :1] - losses[:, 1:]


def _retrain_removals(
    task: Task,
    pool: Examples,
    tests: Examples,
    config: dict[str, Any],
    jobs: list[tuple[Run, str, list[list[str]]]],
    device: str | None,
    backend: str | Backend | None,
    progress: Progress | None,
) -> list[tuple[np.ndarray, float]]:
    """Per job ``(run, removal, groups)``: the final test losses ``(M, 1 + G)`` of the full
    retrain and of each group's (removed, or its weights for `WEIGHTS`), and the seconds its
    retrains took. All jobs' retrains are spread over `backend` (`guided_units`); while its
    workers start, this process retrains too (`backends.map_units`)."""
    runner = make_backend(backend)
    serial = isinstance(runner, SerialBackend)
    if not serial and hasattr(runner, "start"):
        runner.start()
    try:
        work = RemovalWork(
            None if serial else worker_task_reference(task, None, runner.name),
            config,
            device,
            runner.threads,
        )
        if serial:  # one retrain per unit: the progress bar moves with every retrain
            items, owner = [], []
            for j, (run, removal, groups) in enumerate(jobs):
                chunks = removal_units(run.curriculum, run.seed, removal, groups, 1)
                items += chunks
                owner += [j] * len(chunks)
        else:
            items, owner = guided_units(jobs, runner.parallelism)
        wrap = progress or (lambda values, total: values)
        here = _Timed(
            InThisProcess(
                work, lambda: (task, pool, tests, task.make_model(config["seed"])), runner.threads
            )
        )
        # serial: every unit here; a process pool: units here while its workers start
        units = (
            runner.map_unordered(here, items)
            if serial
            else map_units(runner, _Timed(work), items, here)
        )
        done = dict(wrap(units, len(items)))
    finally:
        if runner is not backend:
            close_backend(runner)
    out = []
    for j in range(len(jobs)):
        mine = [k for k, o in enumerate(owner) if o == j]  # in order: full retrain first
        losses = np.concatenate([done[k][0] for k in mine], axis=1)
        out.append((losses, sum(done[k][1] for k in mine)))
    return out


@dataclass
class _Timed:
    """A work unit that also returns its seconds."""

    work: Callable[[Any], np.ndarray]

    def __call__(self, item: Any) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        result = self.work(item)
        return result, time.perf_counter() - started


def _choose(run: Run, max_examples: int | None, n_groups: int, seed: int) -> tuple[list, list]:
    """The examples removed one at a time (at most `max_examples`, a seeded random choice)
    and the `n_groups` LDS groups (10% of all distinct examples each)."""
    distinct = sorted({i for b in run.curriculum for i in b})
    rng = np.random.default_rng([seed, 104_729])
    singles = distinct
    if max_examples is not None and max_examples < len(distinct):
        singles = sorted(rng.choice(distinct, max_examples, replace=False).tolist())
    size = max(1, round(GROUP_FRACTION * len(distinct)))
    groups = [sorted(rng.choice(distinct, size, replace=False).tolist()) for _ in range(n_groups)]
    return singles, groups


def _predict(
    name: str,
    simulator: Simulator,
    runs: RunSet,
    run: Run,
    groups: list[list[str]],
    removal: str,
) -> np.ndarray:
    """A method's predicted effects ``(M, G)`` of removing each group from `run`."""
    if hasattr(simulator, "run_removal_effects"):
        return simulator.run_removal_effects(runs, run.run_id, groups, removal)
    columns = np.arange(len(runs.test_ids))
    return removal_effects(simulator, run.curriculum, run.initial_loss, columns, groups, removal).T


def score_removals(
    actual: np.ndarray,
    predicted: np.ndarray,
    n_singles: int,
) -> dict[str, float]:
    """Scores of predicted vs actual effects ``(M, n_singles + G)`` (singles first)."""
    a1, p1 = actual[:, :n_singles], predicted[:, :n_singles]
    out = {
        "loo_spearman": metrics.per_test_spearman(a1, p1),
        "loo_pearson": metrics.per_test_pearson(a1, p1),
        "top10_sign_agreement": metrics.top_sign_agreement(a1, p1, TOP),
        "effect_size_ratio": metrics.effect_size_ratio(a1, p1),
    }
    if actual.shape[1] > n_singles + 1:
        out["lds"] = metrics.linear_datamodeling_score(
            actual[:, n_singles:].T, predicted[:, n_singles:].T
        )
    return out


def validate_loo(
    task: Task,
    runs: RunSet,
    simulators: dict[str, Simulator],
    kinds: Sequence[str] = LOO_KINDS,
    count: int = 1,
    seed: int = 0,
    max_examples: int | None = None,
    groups: int = 20,
    progress: Progress | None = None,
    smoothness_directions: int = 0,
    *,
    device: str | None = None,
    backend: str | Backend | None = None,
) -> dict[str, Any]:
    """Leave-one-out validation on the last `count` recorded runs (held out).

    The retrains of every kind and held-out run run on `backend` (default: one after another
    in this process; see `simfluence.backends`) on `device`, with the same results whatever
    the backend.

    `smoothness_directions` > 0: also measure, per held-out run, how close to linear its final
    test loss is in the consumption weights (`simfluence.attribution.smoothness`, 2 retrains
    per direction, on the backend with the removals, with the metagradients of an ``unrolled``
    or ``combined`` method when one is validated):
    ``{KIND: {..., "smoothness": {RUN: Smoothness.to_json()}}}``, the same for both kinds
    (measured once).

    Simulators are fitted (copies) on the other runs; methods with ``run_removal_effects``
    answer from the held-out run itself. Returns ``{KIND: {"runs", "removal", "examples",
    "groups", "retrains", "truth_seconds", "methods": {NAME: {"loo_spearman", "loo_pearson",
    "top10_sign_agreement", "effect_size_ratio", "lds", "seconds", "fit_seconds"}},
    "additive_ceiling_lds"}}`` (``seconds``: the method's answer for the held-out runs, replay
    included; ``fit_seconds``: fitting a simulator on the other runs)
    (metrics averaged over the held-out runs; ``additive_ceiling_lds``, when every example was
    removed singly: the LDS of the sum of the actual single removals; a method that fails
    reports ``{"error": message}``).
    """
    unknown = [k for k in kinds if k not in REMOVAL_OF_KIND]
    if unknown:
        raise SimfluenceError(f"unknown kind {unknown[0]!r}; leave-one-out kinds: {LOO_KINDS}")
    if not 1 <= count < len(runs.runs):
        raise SimfluenceError(
            f"--curricula {count}: leave-one-out holds out that many recorded runs and fits on "
            f"the others; this run set has {len(runs.runs)} runs"
        )
    if max_examples is not None and max_examples < 2:
        raise SimfluenceError(f"--max-examples {max_examples}: must be at least 2")
    config = runs.metadata.get("config") or {}
    pool, tests = prepare_for_runset(task, runs)
    train, heldout = runs.split(count)
    fitted, fit_seconds = {}, {}
    for name, simulator in simulators.items():
        started = time.perf_counter()
        if getattr(simulator, "answers_from_run", False):
            fitted[name] = simulator  # answers from the held-out run itself, unfitted
        else:
            fitted[name] = copy.deepcopy(simulator).fit(train)
        fit_seconds[name] = time.perf_counter() - started
    chosen = {run.run_id: _choose(run, max_examples, groups, seed) for run in heldout.runs}
    jobs = [
        (run, REMOVAL_OF_KIND[kind], [[i] for i in singles] + lds_groups)
        for kind in kinds
        for run in heldout.runs
        for singles, lds_groups in [chosen[run.run_id]]
    ]
    n_removals = len(jobs)
    directions = {}  # the smoothness retrains go on the backend with the removals
    if smoothness_directions > 0:
        for run in heldout.runs:
            directions[run.run_id] = random_directions(
                sum(len(b) for b in run.curriculum), smoothness_directions, seed
            )
            points = [
                per_batch_weights(run.curriculum, w)
                for w in smoothness_weights(directions[run.run_id])
            ]
            jobs.append((run, WEIGHTS, points))
    retrained = _retrain_removals(task, pool, tests, config, jobs, device, backend, progress)
    truths = iter(retrained)
    smoothness_runs = [run for run in heldout.runs if run.run_id in directions]
    smooth = {
        run.run_id: _smoothness(runs, run, fitted, directions[run.run_id], losses[:, 1:])
        for run, (losses, _) in zip(smoothness_runs, retrained[n_removals:], strict=True)
    }
    result: dict[str, Any] = {}
    for kind in kinds:
        removal = REMOVAL_OF_KIND[kind]
        per_run: dict[str, list[dict[str, float]]] = {name: [] for name in fitted}
        errors: dict[str, str] = {}
        ceilings, truth_seconds, retrains = [], 0.0, 0
        for run in heldout.runs:
            singles, lds_groups = chosen[run.run_id]
            all_groups = [[i] for i in singles] + lds_groups
            losses, seconds = next(truths)
            actual = losses[:, :1] - losses[:, 1:]
            truth_seconds += seconds
            retrains += len(all_groups) + 1
            if len(singles) == len({i for b in run.curriculum for i in b}) and groups > 1:
                ceilings.append(_additive_ceiling(actual, singles, lds_groups))
            for name, simulator in fitted.items():
                if name in errors:
                    continue
                started = time.perf_counter()
                try:
                    predicted = _predict(name, simulator, runs, run, all_groups, removal)
                except SimfluenceError as exc:
                    errors[name] = str(exc)
                    continue
                scores = score_removals(actual, predicted, len(singles))
                scores["seconds"] = time.perf_counter() - started
                per_run[name].append(scores)
        methods: dict[str, Any] = {}
        for name, rows in per_run.items():
            if name in errors:
                methods[name] = {"error": errors[name]}
            else:
                methods[name] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
                methods[name]["fit_seconds"] = fit_seconds[name]
        result[kind] = {
            "runs": heldout.run_ids,
            "removal": removal,
            "examples": len(singles),
            "groups": groups,
            "retrains": retrains,
            "truth_seconds": truth_seconds,
            "methods": methods,
        }
        if ceilings:
            result[kind]["additive_ceiling_lds"] = float(np.mean(ceilings))
        if smooth:
            result[kind]["smoothness"] = {r.run_id: smooth[r.run_id] for r in heldout.runs}
    return result


def _smoothness(
    runs: RunSet,
    run: Run,
    fitted: dict[str, Simulator],
    directions: np.ndarray,
    losses: np.ndarray,
) -> dict[str, Any]:
    """`simfluence.attribution.smoothness.measure_smoothness` of a held-out run from its
    retrains at `smoothness_weights` ``(M, 2D)``, with the metagradients of an ``unrolled`` or
    ``combined`` method when one is validated; as JSON."""
    grads = None
    for name in ("unrolled", "combined"):
        simulator = fitted.get(name)
        if simulator is not None and hasattr(simulator, "metagradients"):
            try:
                grads = simulator.metagradients(runs, run.run_id).grads
            except SimfluenceError:
                grads = None
            break
    base = np.asarray(run.losses[-1], dtype=np.float64)
    return smoothness_from_retrains(losses, base, directions, grads).to_json()


def split_timing(blocks: dict[str, Any]) -> dict[str, Any]:
    """Move the wall-clock keys out of `validate_loo`'s blocks (in place), so the blocks are
    deterministic; returns ``{KIND: {"truth_seconds", "methods": {NAME: {"seconds",
    "fit_seconds"}}}}``."""
    timing: dict[str, Any] = {}
    for kind, block in blocks.items():
        methods = {
            name: {k: scores.pop(k) for k in ("seconds", "fit_seconds") if k in scores}
            for name, scores in block["methods"].items()
        }
        timing[kind] = {"truth_seconds": block.pop("truth_seconds"), "methods": methods}
    return timing


def _additive_ceiling(actual: np.ndarray, singles: list[str], groups: list[list[str]]) -> float:
    """LDS of predicting each group removal by the sum of its members' actual single removals."""
    col = {i: k for k, i in enumerate(singles)}
    summed = np.stack([actual[:, [col[i] for i in g]].sum(axis=1) for g in groups], axis=1)
    return metrics.linear_datamodeling_score(actual[:, len(singles) :].T, summed.T)
