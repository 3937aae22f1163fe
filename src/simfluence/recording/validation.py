"""Validation against real retraining: how far can each kind of counterfactual answer be trusted?

Held-out random runs (the paper's protocol) measure only part of what users ask. Here the
workload is actually trained on new curricula of several kinds, none of them recorded before,
and every simulator (fitted on *all* recorded runs) predicts them from the recorded step-0 loss:

* ``random``: new random curricula in the recording protocol;
* ``leave-out``: one new random base curriculum with a different random tenth of its distinct
  examples removed from each variant (batches shrink; empty ones vanish);
* ``reorder``: the base curriculum's multiset in new random orders (same batch sizes);
* ``repeat``: the base with a different random tenth of its examples consumed twice where they
  occur;
* ``optimized``: curricula searched by `simfluence.counterfactual.search.optimize_curriculum`
  (the first method given, usually ``linear``) to minimize the mean final test loss, one search
  per seed, each bounded by a number of rollouts (`SEARCH_EVALUATIONS`), never by wall-clock
  time unless asked: the same call gives the same curricula; their *actual* mean final test
  loss is compared with the random curricula's.

The retraining is the expensive part. ``subsets`` retrains score only the final losses (its
LDS needs nothing else). Each curriculum is an independent work unit
(`RetrainWork`), so a backend (`simfluence.backends`: local processes, Ray) trains several at
once, with the same losses as one after another (the seed of curriculum ``k`` of a kind is
``seed + k`` whatever the backend).

Per kind and method: all-steps MSE and final-step Spearman (as in `simfluence.metrics`), and the
linear datamodeling score (LDS, as TRAK and dattri define it): for each test example, the
Spearman correlation across the kind's curricula between predicted and actual final loss, then
the mean over test examples. The JSON (see `validate`) is what `simfluence validate --json`
writes; every random choice is seeded, so two identical calls give identical results (the
command line keeps its wall-clock timing apart, under ``"timing"``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from simfluence import evaluation, metrics
from simfluence.backends import Backend, SerialBackend, close_backend, make_backend, map_units
from simfluence.counterfactual.search import assess_curriculum, optimize_curriculum
from simfluence.curricula import random_curriculum, remove, reorder, repeat
from simfluence.errors import SimfluenceError
from simfluence.evaluation.cost import measure_cost
from simfluence.metrics import linear_datamodeling_score
from simfluence.recording.devices import resolve_device
from simfluence.recording.loo import LOO_KINDS, split_timing, validate_loo
from simfluence.recording.loop import train_on_curriculum
from simfluence.recording.optim import Schedule
from simfluence.recording.recorder import Scoring
from simfluence.recording.subsets import mean_over_seeds, subset_curricula
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import prepare_for_runset
from simfluence.recording.workers import InThisProcess, prepared_in_worker, worker_task_reference
from simfluence.runlog.runs import Curriculum, RunSet
from simfluence.simulators.base import Simulator

#: kinds of new curricula; the leave-one-out kinds ("loo", "loo-weight0") live in
#: `simfluence.recording.loo` and retrain a held-out recorded run instead
CURRICULUM_KINDS = ("random", "leave-out", "reorder", "repeat", "optimized")
#: ``subsets``: dattri's LDS protocol (random 50% subsets of the pool; `recording.subsets`)
KINDS = (*CURRICULUM_KINDS, "subsets", *LOO_KINDS)
#: kinds scored on final losses only (LDS over subsets): their retrains score the test examples
#: at step 0 and the last step, not after every step (scoring is most of a large model's
#: training cost); their all-steps MSE is then over that last step
FINAL_ONLY_KINDS = ("subsets",)
#: `Scoring` of those retrains: every ``10**9`` steps is never, step 0 and the last in full
FINAL_ONLY = Scoring(every=10**9)
#: share of the base curriculum's distinct examples left out or repeated per variant
EDIT_FRACTION = 0.1
#: rollouts per ``optimized`` search (about what 5 s of search did on digits-mlp, 2-core VM)
SEARCH_EVALUATIONS = 10_000


def make_curricula(
    kind: str,
    count: int,
    runs: RunSet,
    seed: int,
    optimizer: Simulator | None = None,
    search_evaluations: int = SEARCH_EVALUATIONS,
    search_seconds: float | None = None,
) -> list[Curriculum]:
    """`count` new curricula of `kind` in the protocol of `runs` (manifest ``config``).

    ``optimized`` curricula are searched with `optimizer` (fitted), at most
    `search_evaluations` rollouts each (and `search_seconds`, when given: results then depend
    on the machine's speed).
    """
    config = runs.metadata["config"]
    pool, per_run, batch, epochs = (
        runs.train_ids,
        config["per_run"],
        config["batch"],
        config["epochs"],
    )

    def rng(*key: int) -> np.random.Generator:
        return np.random.default_rng([seed, 7_919, *key])  # apart from the recorded runs' seeds

    base = random_curriculum(pool, per_run, batch, epochs, rng(0))
    distinct = sorted({i for b in base for i in b})
    n_edit = max(1, round(EDIT_FRACTION * len(distinct)))
    if kind == "random":
        return [random_curriculum(pool, per_run, batch, epochs, rng(1, k)) for k in range(count)]
    if kind == "leave-out":
        return [
            remove(base, rng(2, k).choice(distinct, n_edit, replace=False)) for k in range(count)
        ]
    if kind == "reorder":
        return [reorder(base, rng(3, k)) for k in range(count)]
    if kind == "repeat":
        return [
            repeat(base, rng(4, k).choice(distinct, n_edit, replace=False), 2) for k in range(count)
        ]
    if kind == "optimized":
        if optimizer is None:
            raise SimfluenceError("optimized curricula need a fitted simulator to search with")
        return [
            optimize_curriculum(
                optimizer,
                per_run,
                batch,
                epochs,
                seed=seed * 1000 + k,
                max_evaluations=search_evaluations,
                max_seconds=search_seconds,
                recorded=runs,
            ).curriculum
            for k in range(count)
        ]
    raise SimfluenceError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")


def _score_kind(
    true: list[np.ndarray],
    predicted: dict[str, list[np.ndarray]],
    simulators: dict[str, Simulator] | None = None,
    kind: str | None = None,
) -> dict[str, dict[str, Any]]:
    true_final = np.stack([t[-1] for t in true])
    out: dict[str, dict[str, Any]] = {}
    for name, pred in predicted.items():
        out[name] = {
            "all_steps_mse": metrics.all_steps_mse(true, pred).mean,
            "final_step_spearman": metrics.final_step_spearman(true, pred).mean,
            "lds": linear_datamodeling_score(true_final, np.stack([p[-1] for p in pred])),
        }
        simulator = (simulators or {}).get(name)
        if kind == "reorder" and getattr(simulator, "order_blind", False):
            out[name]["order_blind"] = True  # same prediction for every order: LDS 0
        if simulator is not None and simulator.is_calibrated:
            out[name] |= interval_scores(simulator, true, pred)
    return out


def interval_scores(
    simulator: Simulator, true: list[np.ndarray], predicted: list[np.ndarray]
) -> dict[str, Any]:
    """How the calibrated `simulator`'s 90% intervals did on curricula actually trained:
    `evaluation.interval_scores` (``coverage_90``, ``interval_width_90``), plus
    ``final_coverage_90`` over (curriculum, test) final losses and ``mean_final_in_interval``:
    per curriculum, whether its actual mean final test loss fell inside the interval of the
    simulated one (`Simulator.objective_interval`)."""
    bands, scores = evaluation.interval_scores(simulator, true, predicted)
    columns = np.arange(true[0].shape[1])
    inside_mean = []
    for t, p in zip(true, predicted, strict=True):
        low, high = simulator.objective_interval(p, columns)
        inside_mean.append(bool(low <= t[-1].mean() <= high))
    finals = np.concatenate(
        [(t[-1] >= b.lower[-1]) & (t[-1] <= b.upper[-1]) for t, b in zip(true, bands, strict=True)]
    )
    return scores | {
        "final_coverage_90": float(np.mean(finals)),
        "mean_final_in_interval": inside_mean,
    }


@dataclass
class RetrainWork:
    """The work unit of validation: ``work((k, curriculum))`` trains the run set's initial model
    on `curriculum` with seed ``seed + k`` and returns its losses ``(T + 1, M)``.

    Picklable: a worker rebuilds the task from `task_ref` once; `bind` gives it live objects.
    """

    task_ref: dict[str, Any] | None
    config: dict[str, Any]
    seed: int
    device: str | None = None
    threads: int | None = None
    _live: tuple[Task, Examples, Examples, torch.nn.Module] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None}

    def bind(self, task: Task, pool: Examples, tests: Examples, initial: torch.nn.Module) -> None:
        """Use these live objects (this process) instead of rebuilding the task."""
        self._live = (task, pool, tests, initial)

    def _prepared(self) -> tuple[Task, Examples, Examples, torch.nn.Module]:
        if self._live is not None:
            return self._live
        p = prepared_in_worker(self.task_ref, self.config, self.device)
        return p.task, p.pool, p.tests, p.initial

    def __call__(self, item: tuple[str, int, Curriculum]) -> np.ndarray:
        kind, k, curriculum = item
        task, pool, tests, initial = self._prepared()
        if self.threads is not None and self._live is None:
            torch.set_num_threads(self.threads)
        run = train_on_curriculum(
            task,
            initial,
            pool,
            tests,
            curriculum,
            self.config["lr"],
            self.seed + k,
            run_id=f"{kind}-{k}",
            optimizer=self.config.get("optimizer"),
            schedule=Schedule.from_config(self.config.get("schedule")),
            device=self.device,
            max_grad_norm=self.config.get("max_grad_norm"),
            scoring=FINAL_ONLY if kind in FINAL_ONLY_KINDS else None,
        )
        return run.losses


def validate(
    task: Task,
    runs: RunSet,
    simulators: dict[str, Simulator],
    kinds: Sequence[str] = CURRICULUM_KINDS,
    count: int = 20,
    seed: int = 0,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
    search_evaluations: int = SEARCH_EVALUATIONS,
    search_seconds: float | None = None,
    max_examples: int | None = None,
    groups: int = 20,
    device: str | None = None,
    backend: str | Backend | None = None,
    smoothness_directions: int = 0,
    subsets: int | None = None,
    subset_seeds: int = 1,
) -> dict[str, Any]:
    """Train `task` on `count` new curricula of each kind and score every simulator.

    ``subsets`` (dattri's protocol, `simfluence.recording.subsets`): `subsets` (default
    `count`) random halves of the pool, each trained `subset_seeds` times; losses and
    predictions are averaged over a subset's seeds before scoring. Each simulator's fit cost
    goes to ``result["timing"]["fit"][NAME]`` (``seconds``, ``peak_rss_mb``) and the retraining's
    to ``result["timing"]["retrain"]`` (``seconds``, ``trainings``): cost in training runs.

    The leave-one-out kinds (``loo``, ``loo-weight0``) hold out the last `count` recorded runs
    instead and retrain their curricula without each example (at most `max_examples`) and
    without `groups` random tenths: `simfluence.recording.loo.validate_loo` (on the same
    `backend` and `device`), whose block of the JSON goes under ``"kinds"`` too (with
    `smoothness_directions` > 0, how close to linear each held-out run's final loss is in the
    example weights, ``"smoothness"``).

    Their wall-clock seconds (``truth_seconds``, and per method ``seconds`` and
    ``fit_seconds``) are moved to ``result["timing"][KIND]`` (`split_timing`), so that the rest
    of the result is deterministic.

    The simulators are fitted on all of `runs` here. ``optimized`` searches are bounded by
    `search_evaluations` rollouts (and by `search_seconds` only when given). The curricula are
    trained on `device` (default: the CPU) by `backend` (default: one after another in this
    process; see `simfluence.backends`), with the recorded optimizer and schedule. Returns the
    JSON-able dict::

        {"kinds": {KIND: {"curricula": C, "methods": {NAME: {"all_steps_mse",
                   "final_step_spearman", "lds"}}}},
         "curricula_per_kind": C, "seed": seed, "search_evaluations": N,
         "warnings": {NAME: [str, ...]},   # e.g. a gradient method on Adam runs
         "optimized": {"actual_mean_test_loss", "random_mean_test_losses": [...],
                       "fraction_of_random_beaten", "predicted_mean_test_loss",
                       "actual_mean_test_losses_per_search": [...]}}   # when both kinds ran

    ``fraction_of_random_beaten``: the share of the random curricula whose actual mean final
    test loss is higher than the first optimized curriculum's.

    Every simulator that can be calibrated (`Simulator.calibrate` on `runs`) also reports, per
    kind, ``coverage_90``, ``interval_width_90``, ``final_coverage_90`` and
    ``mean_final_in_interval`` (`interval_scores`); ``optimized`` adds the search's own
    prediction inside its trust region, ``predicted_interval_90`` and ``actual_in_interval``.
    """
    config = runs.metadata.get("config") or {}
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SimfluenceError(f"unknown kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
    if not simulators:
        raise SimfluenceError("validation needs at least one method")
    loo_kinds = [k for k in kinds if k in LOO_KINDS]
    kinds = [k for k in kinds if k not in LOO_KINDS]
    if kinds and count < 2:  # checked before any leave-one-out retraining
        raise SimfluenceError("--curricula must be at least 2 (LDS correlates across curricula)")
    result: dict[str, Any] = {"kinds": {}, "curricula_per_kind": count, "seed": seed}
    if loo_kinds:
        loo = validate_loo(
            task, runs, simulators, loo_kinds, count, seed, max_examples, groups, progress,
            smoothness_directions,
            device=device, backend=backend,
        )  # fmt: skip
        result["kinds"].update(loo)
        result["timing"] = split_timing(loo)
    if not kinds:
        return result
    pool, tests = prepare_for_runset(task, runs)
    resolve_device(device)
    fit_cost: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    for name, simulator in simulators.items():
        try:
            with measure_cost(fit_cost.setdefault(name, {})):
                simulator.fit(runs)
        except SimfluenceError as exc:  # reported; the other methods are still validated
            failed[name] = str(exc)
    if len(failed) == len(simulators):
        raise SimfluenceError(f"no method could be fitted: {failed}")
    simulators = {n: s for n, s in simulators.items() if n not in failed}
    for name in failed:
        fit_cost.pop(name, None)
    for simulator in simulators.values():
        with contextlib.suppress(SimfluenceError):  # e.g. one recorded run: no intervals
            simulator.calibrate(runs)
    initial_loss = np.mean([r.initial_loss for r in runs.runs], axis=0)
    wrap = progress or (lambda items, total: items)
    result["failed"] = failed
    unanswered: dict[str, dict[str, str]] = {}
    result["unanswered"] = unanswered
    result["search_evaluations"] = search_evaluations
    result["warnings"] = {
        name: list(getattr(sim, "warnings_", None) or []) for name, sim in simulators.items()
    }
    searcher = next(iter(simulators.values()))
    curricula = {
        kind: subset_curricula(runs, subsets or count, subset_seeds, seed)
        if kind == "subsets"
        else make_curricula(kind, count, runs, seed, searcher, search_evaluations, search_seconds)
        for kind in kinds
    }
    started = time.perf_counter()
    trained = _retrain(task, pool, tests, config, seed, curricula, device, backend, wrap)
    result.setdefault("timing", {})["fit"] = fit_cost
    result["timing"]["retrain"] = {
        "seconds": time.perf_counter() - started,
        "trainings": sum(len(c) for c in curricula.values()),
    }
    actual_mean: dict[str, list[float]] = {}
    searched: list[float] = []
    for kind in kinds:
        true = trained[kind]
        predicted = _predictions(simulators, curricula[kind], initial_loss, kind, unanswered)
        if kind == "subsets":
            true = mean_over_seeds(true, subset_seeds)
            predicted = {n: mean_over_seeds(p, subset_seeds) for n, p in predicted.items()}
        if kind == "optimized":
            searched = [float(p[-1].mean()) for p in predicted[next(iter(simulators))]]
            searched_in_region = [
                assess_curriculum(searcher, c, recorded=runs)[:2] for c in curricula[kind]
            ]
        result["kinds"][kind] = {
            "curricula": len(curricula[kind]),
            "methods": _score_kind(true, predicted, simulators, kind),
        }
        actual_mean[kind] = [float(t[-1].mean()) for t in true]
    if "optimized" in actual_mean and "random" in actual_mean:
        best = actual_mean["optimized"][0]
        randoms = actual_mean["random"]
        result["optimized"] = {
            "actual_mean_test_loss": best,
            "predicted_mean_test_loss": searched[0],
            "random_mean_test_losses": randoms,
            "fraction_of_random_beaten": float(np.mean([best < r for r in randoms])),
            "actual_mean_test_losses_per_search": actual_mean["optimized"],
        }
        result["optimized"] |= _optimized_intervals(searched_in_region, actual_mean["optimized"])
    return result


def _predictions(
    simulators: dict[str, Simulator],
    curricula: list[Curriculum],
    initial_loss: np.ndarray,
    kind: str,
    unanswered: dict[str, dict[str, str]],
) -> dict[str, list[np.ndarray]]:
    """Every simulator's rollouts of one kind's curricula; a simulator that cannot answer
    them (a `SimfluenceError`: e.g. an example no run it was fitted on consumed) goes to
    ``unanswered[name][kind]`` with the reason, and the others are still scored."""
    predicted = {}
    for name, simulator in simulators.items():
        try:
            predicted[name] = simulator.simulate_many(curricula, initial_loss)
        except SimfluenceError as exc:
            unanswered.setdefault(name, {})[kind] = str(exc)
    return predicted


def _retrain(
    task: Task,
    pool: Examples,
    tests: Examples,
    config: dict[str, Any],
    seed: int,
    curricula: dict[str, list[Curriculum]],
    device: str | None,
    backend: str | Backend | None,
    wrap: Callable[[Iterable[Any], int], Iterable[Any]],
) -> dict[str, list[np.ndarray]]:
    """The actual losses ``(T + 1, M)`` of every curriculum of every kind, in order."""
    runner = make_backend(backend)
    items = [(kind, k, c) for kind, block in curricula.items() for k, c in enumerate(block)]
    serial = isinstance(runner, SerialBackend)
    work = RetrainWork(
        None if serial else worker_task_reference(task, None, runner.name),
        config,
        seed,
        device,
        runner.threads,
    )
    losses: dict[int, np.ndarray] = {}
    # serial: every unit here; a process pool: units here while its workers start
    here = InThisProcess(
        work, lambda: (task, pool, tests, task.make_model(config["seed"])), runner.threads
    )
    try:
        units = (
            runner.map_unordered(here, items) if serial else map_units(runner, work, items, here)
        )
        for position, loss in wrap(units, len(items)):
            losses[position] = loss
    finally:
        if runner is not backend:
            close_backend(runner)
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in curricula}
    for position, (kind, _, _) in enumerate(items):
        out[kind].append(losses[position])
    return out


def _optimized_intervals(
    predictions: list[tuple[float, tuple[float, float] | None]], actual: list[float]
) -> dict[str, Any]:
    """The searches' own predictions (`assess_curriculum`: inside the trust region, or the
    recorded outcome of a recorded curriculum), their 90% intervals, and whether the actual
    mean final test loss fell inside (first search, then all of them)."""
    value, interval = predictions[0]
    out: dict[str, Any] = {"predicted_mean_test_loss_in_trust_region": value}
    if interval is not None:
        out["predicted_interval_90"] = list(interval)
        out["actual_in_interval"] = bool(interval[0] <= actual[0] <= interval[1])
        out["actual_in_interval_per_search"] = [
            bool(i is not None and i[0] <= a <= i[1])
            for (_, i), a in zip(predictions, actual, strict=True)
        ]
    return out
