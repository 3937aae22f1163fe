"""The search driver `optimize_curriculum`, and `assess_curriculum`: what it would report for a
given curriculum."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from simfluence.counterfactual.attribution.rollouts import _initial, test_columns
from simfluence.counterfactual.search.evaluator import (
    TRUST_REGION,
    _Evaluator,
    trust_region_rollouts,
)
from simfluence.counterfactual.search.moves import _round
from simfluence.counterfactual.search.result import SearchResult, _statement
from simfluence.counterfactual.search.starts import _candidates, _greedy_layout, _random_layouts
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import Simulator


def assess_curriculum(
    simulator: Simulator,
    curriculum: Sequence[Sequence[str]],
    objective: str | Sequence[str] = "mean",
    recorded: RunSet | None = None,
    level: float = 0.9,
) -> tuple[float, tuple[float, float] | None, str]:
    """What `optimize_curriculum` would report for `curriculum` (from the recorded runs' own
    starting point): ``(predicted, interval, source)``.

    `predicted` is the mean final loss of the objective's test examples inside the trust region
    (`trust_region_rollouts`), or, when `curriculum` is one of the `recorded` runs', that run's
    actual one (`source` ``"recorded <run id>"``, else ``"search"``); `interval` its `level`
    interval (None when the simulator is not calibrated).
    """
    columns = _objective_columns(simulator, objective)
    batches = [[str(i) for i in b] for b in curriculum]
    source, predicted = "search", None
    for run in recorded.runs if recorded is not None else []:
        if run.curriculum == batches:
            source, predicted = f"recorded {run.run_id}", float(run.losses[-1, columns].mean())
            break
    if predicted is None:
        predicted = float(trust_region_rollouts(simulator, [batches])[0][-1, columns].mean())
    if not simulator.is_calibrated:
        return predicted, None, source
    return predicted, simulator.mean_loss_interval(predicted, columns, len(batches), level), source


def optimize_curriculum(
    simulator: Simulator,
    size: int,
    batch_size: int,
    epochs: int = 1,
    objective: str | Sequence[str] = "mean",
    initial_loss: np.ndarray | None = None,
    seed: int = 0,
    n_random: int = 64,
    greedy: bool = True,
    proposals: int = 512,
    max_accept: int = 8,
    patience: int = 3,
    max_evaluations: int = 200_000,
    max_seconds: float | None = None,
    candidates: Sequence[str] | None = None,
    include_unseen: bool = False,
    trust_region: bool = True,
    level: float = 0.9,
    recorded: RunSet | None = None,
) -> SearchResult:
    """Find the curriculum of `size` pool examples (subset and order, laid out like the
    recording protocol: `epochs` epochs over the same examples, batches of `batch_size`) that
    `simulator` predicts minimizes `objective`.

    Method (every batch of candidates is evaluated in one vectorized rollout):

    1. Starts: the best of `n_random` random curricula in the protocol, and (`greedy`) the
       `size` candidates most helpful by simulated leave-one-out on a reference curriculum that
       consumes every candidate once per epoch, in random order.
    2. Batched stochastic local search from the better start: each round proposes up to
       `proposals` neighbours (swap-ins: an in-set example replaced, at all its positions, by an
       out-of-set one; position swaps of two examples in different batches of one epoch); all
       of them are rolled out at once. The improving ones that touch disjoint examples (at most
       `max_accept`) are applied together when that beats the best single one, else the best
       single one is.
    3. Stop after `patience` rounds without improvement (one round suffices when every
       neighbour was proposed), or when `max_evaluations` rollouts are spent, or (only when
       given: the result then depends on the machine) `max_seconds`. Bounded by work, the
       same arguments give the same curriculum.

    Safety. A simulator is least reliable exactly where a search drives it: to combinations
    of examples whose fitted effects, compounded, promise more than any recorded run showed.
    So (with `trust_region`) no test example's simulated loss may go below the lowest loss
    recorded for it at that step in any fitted run (`Simulator.envelope_`): no credit for gains
    the recorded runs never showed. The objective is pessimistic when the simulator is
    calibrated: the upper end of the `level` interval of the mean final loss (with the default
    intervals, the point prediction plus a constant, so the envelope is what shapes the search).
    The result says whether even that upper end beats the mean prediction of the random
    curricula of the same layout (`gain_established`), in a plain sentence (`statement`).

    Evidence first. Given the `recorded` runs (those the simulator was fitted on), a recorded
    curriculum of the same layout whose *actual* final loss (objective) is below the found
    curriculum's pessimistic objective is returned instead (`source` names the run): a known
    outcome beats a promise the simulator cannot back. Only from the recorded runs' own
    starting point (`initial_loss` None, or the simulator's mean recorded one).

    Args:
        objective: ``"mean"``: the mean simulated final loss over all test examples; or a list
            of test ids: the mean over those.
        initial_loss: shape ``(M,)``, or None for the simulator's mean recorded one.
        candidates: pool ids allowed; default: those the simulator saw in its fitted runs
            (``consumed_`` where it has one, else ``seen_``), or all of them with
            `include_unseen`.
        trust_region: confine the search to the recorded envelope (above); False searches the
            simulator's unconstrained predictions (not recommended: see the docs).
        level: the interval level of the pessimistic objective and of the reported interval.
        recorded: the fitted runs, to fall back on the best recorded curriculum (above).

    Returns:
        a `SearchResult`; lower objective is better (a loss).
    """
    start_time = time.perf_counter()
    columns = _objective_columns(simulator, objective)
    pool = _candidates(simulator, candidates, include_unseen)
    _check_sizes(size, batch_size, epochs, len(pool))
    rng = np.random.default_rng(seed)
    initial = _initial(simulator, initial_loss)
    envelope = getattr(simulator, "envelope_", None) if trust_region else None
    n_steps = epochs * -(-size // batch_size)
    offsets = (
        simulator.objective_offsets(columns, n_steps, level) if simulator.is_calibrated else None
    )
    evaluate = _Evaluator(
        simulator,
        columns,
        initial,
        batch_size,
        None if envelope is None else np.asarray(envelope, dtype=np.float64),
        0.0 if offsets is None else offsets[1],
    )
    randoms = _random_layouts(pool, size, epochs, max(n_random, 1), rng)
    random_values = evaluate(randoms)
    layout, best = randoms[np.argmin(random_values)], float(random_values.min())
    greedy_value = None
    if greedy:
        candidate = _greedy_layout(evaluate, pool, size, epochs, rng)
        greedy_value = float(evaluate(candidate[None])[0])
        if greedy_value < best:
            layout, best = candidate, greedy_value
    history: list[dict[str, Any]] = []
    idle = 0
    deadline = None if max_seconds is None else start_time + max_seconds
    while idle < patience and evaluate.count < max_evaluations:
        if deadline is not None and time.perf_counter() > deadline:
            break
        layout, best, accepted, exhaustive = _round(
            evaluate, layout, best, pool, proposals, batch_size, max_accept, rng
        )
        history.append(
            {
                "round": len(history) + 1,
                "evaluations": evaluate.count,
                "objective": best,
                "accepted": accepted,
            }
        )
        idle = 0 if accepted else (patience if exhaustive else idle + 1)
    curriculum = evaluate.curriculum(layout)
    predicted = best - evaluate.offset
    random_predicted = random_values - evaluate.offset
    unconstrained = float(simulator.simulate(curriculum, initial)[-1, columns].mean())
    result = SearchResult(
        curriculum,
        best,
        random_values,
        greedy_value,
        history,
        evaluate.count,
        time.perf_counter() - start_time,
        predicted=predicted,
        unconstrained=unconstrained,
        random_predicted=random_predicted,
        trust_region=TRUST_REGION if envelope is not None else "none",
        level=level,
    )
    if recorded is not None and np.allclose(initial, simulator.initial_loss_):
        _prefer_recorded(result, recorded, simulator, columns, size, epochs)
    if offsets is not None:
        result.interval = simulator.mean_loss_interval(result.predicted, columns, n_steps, level)
        result.gain_established = bool(result.interval[1] < random_predicted.mean())
    if result.source != "search":  # the returned curriculum's own pessimistic value
        result.objective = result.interval[1] if result.interval else result.predicted
    result.statement = _statement(result)
    return result


def _prefer_recorded(
    result: SearchResult,
    recorded: RunSet,
    simulator: Simulator,
    columns: np.ndarray,
    size: int,
    epochs: int,
) -> None:
    """Replace the found curriculum by the best recorded one of the same layout when that one's
    actual objective is below the found one's (pessimistic) objective."""
    if list(recorded.test_ids) != list(simulator.test_ids_):
        raise SimfluenceError("the recorded runs have other test examples than the simulator")
    shape = [len(b) for b in result.curriculum]
    same = [
        r
        for r in recorded.runs
        if [len(b) for b in r.curriculum] == shape and _is_layout(r.curriculum, size, epochs)
    ]
    if not same:
        return
    actual = np.array([r.losses[-1, columns].mean() for r in same])
    best = int(np.argmin(actual))
    if actual[best] >= result.objective:
        return
    run = same[best]
    result.curriculum = [list(b) for b in run.curriculum]
    result.predicted = float(actual[best])
    result.unconstrained = float(
        simulator.simulate(run.curriculum, run.initial_loss)[-1, columns].mean()
    )
    result.source = f"recorded {run.run_id}"


def _is_layout(curriculum: Sequence[Sequence[str]], size: int, epochs: int) -> bool:
    """Whether `curriculum` consumes `size` distinct examples `epochs` times each."""
    counts: dict[str, int] = {}
    for batch in curriculum:
        for i in batch:
            counts[i] = counts.get(i, 0) + 1
    return len(counts) == size and set(counts.values()) == {epochs}


def _objective_columns(simulator: Simulator, objective: str | Sequence[str]) -> np.ndarray:
    if isinstance(objective, str):
        if objective != "mean":
            return test_columns(simulator, [objective])
        simulator._check_fitted()
        return np.arange(len(simulator.test_ids_))
    return test_columns(simulator, objective)


def _check_sizes(size: int, batch_size: int, epochs: int, n_candidates: int) -> None:
    if batch_size < 1 or epochs < 1:
        raise SimfluenceError("batch size and epochs must be at least 1")
    if not 1 <= size <= n_candidates:
        raise SimfluenceError(
            f"size {size}: must be between 1 and the {n_candidates} candidate training examples"
        )
