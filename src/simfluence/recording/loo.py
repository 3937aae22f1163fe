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
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from simfluence import metrics
from simfluence.counterfactual.attribution import removal_effects
from simfluence.curricula import remove
from simfluence.errors import SimfluenceError
from simfluence.recording.loop import final_test_losses, torch_threads
from simfluence.recording.optim import Schedule
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import prepare_for_runset
from simfluence.runlog.runs import Run, RunSet
from simfluence.simulators.base import Simulator

__all__ = ["LOO_KINDS", "REMOVAL_OF_KIND", "actual_removal_effects", "split_timing", "validate_loo"]

REMOVAL_OF_KIND = {"loo": "renormalize", "loo-weight0": "zero-weight"}
LOO_KINDS = tuple(REMOVAL_OF_KIND)
#: share of the run's distinct examples removed together in each LDS group
GROUP_FRACTION = 0.1
TOP = 10

Progress = Callable[[Iterable[Any], int], Iterable[Any]]


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
    full retrain reproduces the recorded run).
    """
    config = config or {}
    schedule = Schedule.from_config(config.get("schedule"))
    wrap = progress or (lambda items, total: items)
    curriculum = run.curriculum

    def train(weights: list[list[float]] | None, batches: list[list[str]]) -> np.ndarray:
        return final_test_losses(
            task,
            initial_model,
            pool,
            tests,
            batches,
            lr,
            run.seed,
            weights=weights,
            optimizer=config.get("optimizer"),
            schedule=schedule,
            max_grad_norm=config.get("max_grad_norm"),
        )

    with torch_threads(initial_model):
        full = train(None, curriculum)
        out = np.empty((len(tests), len(groups)))
        for g, group in enumerate(wrap(groups, len(groups))):
            gone = set(group)
            if removal == "renormalize":
                out[:, g] = full - train(None, remove(curriculum, sorted(gone)))
            else:
                weights = [[0.0 if i in gone else 1.0 for i in b] for b in curriculum]
                out[:, g] = full - train(weights, curriculum)
    return full, out


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
) -> dict[str, Any]:
    """Leave-one-out validation on the last `count` recorded runs (held out).

    `smoothness_directions` > 0: also measure, per held-out run, how close to linear its final
    test loss is in the consumption weights (`simfluence.attribution.smoothness`, 2 retrains
    per direction, with the metagradients of an ``unrolled`` or ``combined`` method when one
    is validated): ``{KIND: {..., "smoothness": {RUN: Smoothness.to_json()}}}``, the same for
    both kinds (measured once).

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
    initial_model = task.make_model(config["seed"])
    result: dict[str, Any] = {}
    smooth: dict[str, Any] = {}
    for kind in kinds:
        removal = REMOVAL_OF_KIND[kind]
        per_run: dict[str, list[dict[str, float]]] = {name: [] for name in fitted}
        errors: dict[str, str] = {}
        ceilings, truth_seconds, retrains = [], 0.0, 0
        for run in heldout.runs:
            singles, lds_groups = _choose(run, max_examples, groups, seed)
            all_groups = [[i] for i in singles] + lds_groups
            started = time.perf_counter()
            _, actual = actual_removal_effects(
                task,
                initial_model,
                pool,
                tests,
                run,
                config["lr"],
                all_groups,
                removal,
                progress,
                config,
            )
            truth_seconds += time.perf_counter() - started
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
        if smoothness_directions > 0:
            for run in heldout.runs:
                if run.run_id not in smooth:
                    smooth[run.run_id] = _smoothness(
                        task, initial_model, pool, tests, runs, run, fitted, config,
                        smoothness_directions, seed,
                    )  # fmt: skip
            result[kind]["smoothness"] = {r.run_id: smooth[r.run_id] for r in heldout.runs}
    return result


def _smoothness(
    task: Task,
    initial_model: Any,
    pool: Examples,
    tests: Examples,
    runs: RunSet,
    run: Run,
    fitted: dict[str, Simulator],
    config: dict[str, Any],
    directions: int,
    seed: int,
) -> dict[str, Any]:
    """`simfluence.attribution.smoothness.run_smoothness` of a held-out run, as JSON."""
    from simfluence.attribution.smoothness import run_smoothness

    grads = None
    for name in ("unrolled", "combined"):
        simulator = fitted.get(name)
        if simulator is not None and hasattr(simulator, "metagradients"):
            try:
                grads = simulator.metagradients(runs, run.run_id).grads
            except SimfluenceError:
                grads = None
            break
    found = run_smoothness(
        task, initial_model, pool, tests, run, config, directions, seed=seed, metagradients=grads
    )
    return found.to_json()


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
