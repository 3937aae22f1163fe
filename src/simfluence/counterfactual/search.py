"""Curriculum search: the curriculum of ``K`` pool examples that a simulator predicts is best.

The layout is the recording protocol's: the same ``K`` examples are consumed once per epoch for
``E`` epochs, each epoch in its own order, cut into consecutive batches of ``b`` (the last one
may be smaller). A layout is an integer array ``(E, K)`` of pool indices whose rows are
permutations of the same ``K``-subset. The search looks for the subset *and* the orders.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simfluence.counterfactual.attribution import _initial, test_columns
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import Simulator, soft_floor
from simfluence.simulators.dynamics import DynamicsSimulator, step_times

#: floats gathered per evaluation chunk (bounds memory at about 16 bytes each)
_CHUNK_FLOATS = 4_000_000


@dataclass
class SearchResult:
    """Outcome of `optimize_curriculum`. Every value is a loss: lower is better.

    Attributes:
        curriculum: ``E * ceil(K / b)`` batches of training ids.
        objective: the searched (pessimistic) objective of `curriculum`: the upper end of the
            `level` interval of its mean simulated final loss inside the trust region, or that
            mean itself when the simulator is not calibrated.
        predicted: its mean simulated final loss of the objective's test examples inside the
            trust region (the point prediction).
        interval: ``(low, high)``, the `level` interval of `predicted`, or None (not
            calibrated).
        unconstrained: the same mean simulated without the trust region (what `simulate`
            says); far below `predicted` when the simulator extrapolates.
        random_objectives: shape ``(n_random,)``, the objective of each random start (random
            curricula of the same size and layout: the baseline to beat).
        random_predicted: shape ``(n_random,)``, their point predictions.
        gain_established: whether even the pessimistic objective beats the mean prediction of
            the random curricula (None: not calibrated, nothing to say).
        statement: one sentence for a person: the gain and its uncertainty, or that the gain is
            within the uncertainty and no curriculum is predicted to be reliably better.
        trust_region: what the search was confined to.
        source: ``"search"``, or ``"recorded <run id>"`` when a recorded curriculum's actual
            outcome beat what the search could promise (then `predicted` is that actual
            outcome and `interval` the calibration spread around it).
        greedy_objective: the objective of the greedy start, or None when it was not used.
        history: one entry per round: ``round``, ``evaluations`` so far, ``objective`` after
            the round, ``accepted`` moves.
        evaluations: curricula rolled out in all.
        seconds: wall time.
    """

    curriculum: list[list[str]]
    objective: float
    random_objectives: np.ndarray
    greedy_objective: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    predicted: float = float("nan")
    interval: tuple[float, float] | None = None
    unconstrained: float = float("nan")
    random_predicted: np.ndarray = field(default_factory=lambda: np.empty(0))
    gain_established: bool | None = None
    statement: str = ""
    trust_region: str = ""
    level: float = 0.9
    source: str = "search"

    def to_json(self) -> dict[str, Any]:
        """Everything but the curriculum, JSON-able."""
        return {
            "objective": self.objective,
            "predicted": self.predicted,
            "interval": None if self.interval is None else list(self.interval),
            "level": self.level,
            "unconstrained": self.unconstrained,
            "random_predicted_mean": float(np.mean(self.random_predicted))
            if self.random_predicted.size
            else None,
            "random_objectives": self.random_objectives.tolist(),
            "gain_established": self.gain_established,
            "statement": self.statement,
            "source": self.source,
            "trust_region": self.trust_region,
            "greedy_objective": self.greedy_objective,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "history": self.history,
        }


TRUST_REGION = (
    "candidates consumed in the fitted runs, each once per epoch (the recorded protocol); at "
    "every step no test example's simulated loss may go below the lowest loss recorded for it "
    "at that step in any fitted run (gains beyond that are not credited)"
)


class _Evaluator:
    """Objective of many layouts ``(N, E, K)`` at once: ``(N,)`` mean final loss of `columns`
    plus `offset` (the pessimistic objective), every step floored at the simulator's floor and,
    given an `envelope` ``(T_max + 1, M)``, at the trust region's per-step lowest loss.

    Dynamics simulators are rolled out directly from the layouts (a gather of the parameters
    of every position, summed per batch, then ``T`` vectorized steps), the same arithmetic as
    `rollout`; other simulators go through `simulate_many`.
    """

    def __init__(
        self,
        simulator: Simulator,
        columns: np.ndarray,
        initial: np.ndarray,
        batch_size: int,
        envelope: np.ndarray | None = None,
        offset: float = 0.0,
    ) -> None:
        self.simulator = simulator
        self.columns = columns
        self.initial = initial
        self.batch_size = batch_size
        self.count = 0
        self.envelope = None if envelope is None else envelope[:, columns]
        self.offset = offset
        if isinstance(simulator, DynamicsSimulator):
            self.AT = None if simulator.A_ is None else simulator.A_[columns].T.copy()
            self.BT = simulator.B_[columns].T.copy()
            self.floor = tuple(
                np.broadcast_to(np.asarray(f, dtype=np.float64), initial.shape)[columns].copy()
                for f in (simulator.floor_, simulator.floor_width_)
            )
            self.slopes = None  # time-varying effects: A' and B' of `columns`, transposed
            if simulator.B_slope_ is not None:
                A1 = simulator.A_slope_
                self.slopes = (
                    None if A1 is None else A1[columns].T.copy(),
                    simulator.B_slope_[columns].T.copy(),
                )

    def curriculum(self, layout: np.ndarray) -> list[list[str]]:
        ids = self.simulator.train_ids_
        b = self.batch_size
        return [[ids[i] for i in row[s : s + b]] for row in layout for s in range(0, row.size, b)]

    def __call__(self, layouts: np.ndarray) -> np.ndarray:
        return self.predict(layouts) + self.offset

    def predict(self, layouts: np.ndarray) -> np.ndarray:
        """``(N,)`` mean final loss of `columns` inside the trust region (no offset)."""
        self.count += len(layouts)
        if not isinstance(self.simulator, DynamicsSimulator):
            curricula = [self.curriculum(layout) for layout in layouts]
            if self.envelope is None:
                trajs = self.simulator.simulate_many(curricula, self.initial)
            else:
                trajs = trust_region_rollouts(self.simulator, curricula, self.initial)
            return np.array([t[-1, self.columns].mean() for t in trajs])
        n, epochs, size = layouts.shape
        step = max(1, _CHUNK_FLOATS // (epochs * size * len(self.columns)))
        return np.concatenate([self._dynamics(layouts[s : s + step]) for s in range(0, n, step)])

    def _dynamics(self, layouts: np.ndarray) -> np.ndarray:
        sim = self.simulator
        size = layouts.shape[2]
        starts = np.arange(0, size, self.batch_size)
        counts = np.diff(np.append(starts, size))
        weight = sim.batch_size_ / counts if sim.batch_weighting == "mean" else np.ones(len(starts))
        weight = weight[None, None, :, None]
        n = len(layouts)

        def per_step(table: np.ndarray) -> np.ndarray:  # (n, T, m): batch sums of each step
            sums = np.add.reduceat(table[layouts], starts, axis=2) * weight
            return sums.reshape(n, -1, table.shape[1])

        beta = per_step(self.BT)
        tau = None
        if self.slopes is not None:
            tau = step_times(beta.shape[1], sim.time_scale_)[None, :, None]
            beta += tau * per_step(self.slopes[1])
        loss = np.broadcast_to(self.initial[self.columns], (n, len(self.columns))).copy()
        alpha = None
        if self.AT is not None:
            alpha = per_step(self.AT)
            if tau is not None and self.slopes[0] is not None:
                alpha += tau * per_step(self.slopes[0])
        for t in range(beta.shape[1]):  # `rollout`'s arithmetic, floor included
            if alpha is not None:
                loss *= alpha[:, t]
            loss += beta[:, t]
            if self.envelope is not None:
                np.maximum(loss, self.envelope[min(t + 1, len(self.envelope) - 1)], out=loss)
        return soft_floor(loss, *self.floor).mean(axis=1)  # as `simulate_many` reports it


def trust_region_rollouts(
    simulator: Simulator,
    curricula: Sequence[Sequence[Sequence[str]]],
    initial_loss: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Rollouts ``(T_c + 1, M)`` inside the search's trust region: at every step no simulated
    loss goes below the lowest loss recorded at that step (`Simulator.envelope_`), and the
    rollout continues from there; plain `simulate_many` for a simulator without an envelope."""
    initial = _initial(simulator, initial_loss)
    envelope = getattr(simulator, "envelope_", None)
    if envelope is None:
        return simulator.simulate_many(curricula, initial)
    envelope = np.asarray(envelope, dtype=np.float64)
    if isinstance(simulator, DynamicsSimulator):
        start = np.broadcast_to(initial, (len(curricula), initial.size))
        counts = simulator.encode(curricula)
        trajectories = simulator.rollout_encoded(counts, start, envelope=envelope)
        for traj in trajectories:  # as `simulate_many` reports them
            soft_floor(traj[1:], simulator.floor_, simulator.floor_width_)
        return trajectories
    out = []
    for traj in simulator.simulate_many(curricula, initial):
        rows = np.minimum(np.arange(1, traj.shape[0]), len(envelope) - 1)
        traj[1:] = np.maximum(traj[1:], envelope[rows])
        out.append(traj)
    return out


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


def _candidates(
    simulator: Simulator, candidates: Sequence[str] | None, include_unseen: bool
) -> np.ndarray:
    index = {t: k for k, t in enumerate(simulator.train_ids_)}
    if candidates is not None:
        unknown = [c for c in candidates if str(c) not in index]
        if unknown:
            raise SimfluenceError(f"unknown training id {unknown[0]!r} among the candidates")
        return np.unique([index[str(c)] for c in candidates])
    pool = np.arange(len(simulator.train_ids_))
    # consumed by a fitted run (featurized simulators have effects for every example, seen_,
    # but the trust region keeps to those the runs consumed, consumed_)
    seen = getattr(simulator, "consumed_", getattr(simulator, "seen_", None))
    if seen is None or include_unseen:
        return pool
    return pool[np.asarray(seen, dtype=bool)]


def _random_layouts(
    pool: np.ndarray, size: int, epochs: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``(count, E, K)``: random subsets, reshuffled every epoch (the recording protocol)."""
    out = np.empty((count, epochs, size), dtype=np.int64)
    for n in range(count):
        chosen = rng.choice(pool, size=size, replace=False)
        for e in range(epochs):
            out[n, e] = rng.permutation(chosen)
    return out


def _greedy_layout(
    evaluate: _Evaluator, pool: np.ndarray, size: int, epochs: int, rng: np.random.Generator
) -> np.ndarray:
    """The `size` candidates most helpful by leave-one-out on a reference layout that consumes
    every candidate once per epoch (removing one candidate closes the gap it leaves), each
    epoch in a fresh random order."""
    reference = np.stack([rng.permutation(pool) for _ in range(epochs)])
    without = np.stack(
        [np.stack([row[row != i] for row in reference]) for i in pool]
    )  # (C, E, C - 1)
    effects = evaluate(reference[None])[0] - evaluate(without)  # negative = helpful
    chosen = pool[np.argsort(effects, kind="stable")[:size]]
    return np.stack([rng.permutation(chosen) for _ in range(epochs)])


def _propose(
    layout: np.ndarray, pool: np.ndarray, count: int, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[frozenset[int]]]:
    """Up to `count` neighbours ``(N, E, K)`` of `layout` and the pool indices each touches.

    Half are swap-ins (an in-set example replaced, at all its positions, by an out-of-set
    candidate), half position swaps within one epoch across two batches; when a kind has no
    more possibilities than its share, all of them are proposed.
    """
    members = layout[0]
    outside = np.setdiff1d(pool, members)
    moves: list[tuple[str, int, int, int]] = []
    n_in = len(members) * len(outside)
    share = count // 2 if len(members) > batch_size else count
    if n_in:
        picks = np.arange(n_in) if n_in <= share else rng.choice(n_in, share, replace=False)
        moves += [
            ("in", int(members[p // len(outside)]), int(outside[p % len(outside)]), 0)
            for p in picks
        ]
    epochs, size = layout.shape
    if size > batch_size:
        for _ in range(count - len(moves)):
            e = int(rng.integers(epochs))
            p, q = rng.choice(size, 2, replace=False)
            if p // batch_size != q // batch_size:
                moves.append(("pos", int(p), int(q), e))
    return _apply_moves(layout, moves)


def _apply_moves(
    layout: np.ndarray, moves: list[tuple[str, int, int, int]]
) -> tuple[np.ndarray, list[frozenset[int]]]:
    out = np.repeat(layout[None], len(moves), axis=0)
    touched = []
    for n, (kind, a, b, e) in enumerate(moves):
        if kind == "in":
            out[n][layout == a] = b
            touched.append(frozenset((a, b)))
        else:
            out[n, e, a], out[n, e, b] = layout[e, b], layout[e, a]
            touched.append(frozenset((int(layout[e, a]), int(layout[e, b]))))
    return out, touched


def _combine(
    layout: np.ndarray, proposals: np.ndarray, touched: list[frozenset[int]], order: np.ndarray
) -> tuple[np.ndarray, int]:
    """Apply the improving proposals in `order` that touch disjoint examples, together: each
    proposal differs from `layout` only where it touched, so its differing cells are copied."""
    combined, used, taken = layout.copy(), set(), 0
    for k in order:
        if used & touched[k]:
            continue
        used |= touched[k]
        diff = proposals[k] != layout
        combined[diff] = proposals[k][diff]
        taken += 1
    return combined, taken


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


def _statement(result: SearchResult) -> str:
    """The search's answer in one or two sentences (see `SearchResult.statement`)."""
    baseline = float(np.mean(result.random_predicted))
    gain = baseline - result.predicted
    if result.interval is None:
        return (
            f"predicted {result.predicted:.4g} against {baseline:.4g} for random curricula of "
            "the same size; the simulator is not calibrated, so the uncertainty of this gain is "
            "unknown (calibrate it: `simfluence fit` does by default)"
        )
    low, high = result.interval
    level = f"{100 * result.level:g}%"
    if result.source != "search":
        what = (
            f"no searched curriculum is predicted, pessimistically, to beat the best recorded "
            f"one: returning the curriculum of {result.source.split(' ', 1)[1]}, whose "
            f"recorded final loss was {result.predicted:.4g} ({level} interval {low:.4g} to "
            f"{high:.4g}) against {baseline:.4g} predicted for random curricula of the same size"
        )
        if result.gain_established:
            return what + ": a gain larger than the uncertainty"
        return what + ": a gain within the uncertainty"
    if result.gain_established:
        return (
            f"predicted {result.predicted:.4g} ({level} interval {low:.4g} to {high:.4g}) "
            f"against {baseline:.4g} for random curricula of the same size: a gain of "
            f"{gain:.4g}, larger than the uncertainty"
        )
    return (
        f"the predicted gain over random curricula of the same size ({gain:.4g}: "
        f"{result.predicted:.4g} against {baseline:.4g}) is within the uncertainty ({level} "
        f"interval {low:.4g} to {high:.4g}): no curriculum is predicted to be reliably better "
        "than a random one"
    )


def _round(
    evaluate: _Evaluator,
    layout: np.ndarray,
    best: float,
    pool: np.ndarray,
    proposals: int,
    batch_size: int,
    max_accept: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float, int, bool]:
    """One round of local search: ``(layout, objective, moves accepted, all neighbours
    proposed)``."""
    neighbours, touched = _propose(layout, pool, proposals, batch_size, rng)
    exhaustive = _is_exhaustive(layout, pool, proposals, batch_size)
    if not len(neighbours):
        return layout, best, 0, True
    values = evaluate(neighbours)
    tol = 1e-12 * max(1.0, abs(best))
    improving = np.flatnonzero(values < best - tol)
    if not improving.size:
        return layout, best, 0, exhaustive
    order = improving[np.argsort(values[improving], kind="stable")][: max(max_accept, 1)]
    layout_1, value_1, taken = neighbours[order[0]], float(values[order[0]]), 1
    if order.size > 1:
        combined, count = _combine(layout, neighbours, touched, order)
        value = float(evaluate(combined[None])[0])
        if count > 1 and value < value_1:
            layout_1, value_1, taken = combined, value, count
    return layout_1, value_1, taken, exhaustive


def _is_exhaustive(layout: np.ndarray, pool: np.ndarray, proposals: int, batch_size: int) -> bool:
    """Whether `_propose` proposed every swap-in (position swaps are sampled, so only when
    there are none: a single batch per epoch)."""
    n_in = layout.shape[1] * (len(pool) - layout.shape[1])
    return layout.shape[1] <= batch_size and n_in <= proposals


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
