"""Attribution views of one curriculum for one test example (or a group), by simulation.

Every view is about the *objective*: the simulated loss of the chosen test examples, averaged
over them (one test id: its loss). All views work with any fitted `Simulator`; the
per-example decomposition of each step needs a Simfluence-Linear-family (`DynamicsSimulator`).

Sign convention (all views): an *effect* is ``L_T(with) - L_T(without)``, the simulated final
loss with the example(s) consumed minus without. **Negative = helpful**: consuming the example
lowered the final loss. Positive = harmful.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from scipy import sparse

from simfluence.errors import CurriculumError, SimfluenceError
from simfluence.runlog.runs import AnyCurriculum, normalize_curriculum
from simfluence.simulators.base import Simulator, soft_floor
from simfluence.simulators.dynamics import DynamicsSimulator, step_times

SIGN_CONVENTION = (
    "effect = L_T(with) - L_T(without): negative = consuming it lowered the final loss (helpful)"
)
SIMULATED_CHANGE = "simulated loss change L_t - L_{t-1}"
#: the two meanings of "remove example i": drop it and re-average its batches (what
#: `simfluence.curricula.remove` and real retraining on a shorter list do), or keep it in its
#: batches with loss weight 0 (what influence functions, DVEmb and metagradients estimate)
REMOVALS = ("renormalize", "zero-weight")


def check_removal(removal: str) -> str:
    """`removal` if it is one of `REMOVALS`; `SimfluenceError` naming the choices otherwise."""
    if removal not in REMOVALS:
        raise SimfluenceError(f"removal {removal!r}: must be one of {', '.join(REMOVALS)}")
    return removal


# -- shared helpers ---------------------------------------------------------------------------
def test_columns(simulator: Simulator, test_ids: str | Sequence[str]) -> np.ndarray:
    """Column indices of `test_ids` in the simulator's rollouts; `SimfluenceError` for unknown."""
    simulator._check_fitted()
    ids = [test_ids] if isinstance(test_ids, str) else [str(t) for t in test_ids]
    if not ids:
        raise SimfluenceError("no test ids given")
    index = {t: j for j, t in enumerate(simulator.test_ids_)}
    unknown = [t for t in ids if t not in index]
    if unknown:
        known = ", ".join(repr(t) for t in simulator.test_ids_[:5])
        raise SimfluenceError(
            f"unknown test id {unknown[0]!r}: this model predicts {len(index)} test examples "
            f"({known}{', ...' if len(index) > 5 else ''})"
        )
    return np.array([index[t] for t in ids], dtype=np.int64)


def _initial(simulator: Simulator, initial_loss: np.ndarray | None) -> np.ndarray:
    initial = simulator.initial_loss_ if initial_loss is None else initial_loss
    initial = np.asarray(initial, dtype=np.float64)
    if initial.shape != (len(simulator.test_ids_),):
        raise CurriculumError(
            f"initial loss has shape {initial.shape}, expected ({len(simulator.test_ids_)},)"
        )
    return initial


def _rollouts(
    simulator: Simulator,
    curricula: Sequence[AnyCurriculum],
    initial: np.ndarray,
    columns: np.ndarray,
) -> list[np.ndarray]:
    """Rollouts of the `columns` only, each ``(T_c + 1, len(columns))``; one vectorized call.
    Dynamics simulators roll out just those test examples' parameters."""
    if isinstance(simulator, DynamicsSimulator):
        counts = simulator.encode(curricula)
        start = np.broadcast_to(initial[columns], (len(curricula), len(columns)))
        trajectories = simulator.rollout_encoded(counts, np.ascontiguousarray(start), columns)
        floor, width = (
            np.broadcast_to(np.asarray(f, dtype=np.float64), initial.shape)[columns]
            for f in (simulator.floor_, simulator.floor_width_)
        )
        for traj in trajectories:  # as `simulate_many` reports them
            soft_floor(traj[1:], floor, width)
        return trajectories
    return [t[:, columns] for t in simulator.simulate_many(curricula, initial)]


def final_objective(
    simulator: Simulator,
    curricula: Sequence[AnyCurriculum],
    initial: np.ndarray,
    columns: np.ndarray,
) -> np.ndarray:
    """Shape ``(C,)``: the simulated final loss of each curriculum, averaged over `columns`.

    A curriculum with no steps (``[]``) ends where it starts: its value is the initial loss.
    """
    out = np.full(len(curricula), float(initial[columns].mean()))
    busy = [k for k, c in enumerate(curricula) if len(c)]
    if busy:
        trajs = _rollouts(simulator, [curricula[k] for k in busy], initial, columns)
        out[busy] = [traj[-1].mean() for traj in trajs]
    return out


def _without(curriculum: list[list[str]], dropped: set[str]) -> list[list[str]]:
    """`curricula.remove` that may return ``[]`` (all steps gone)."""
    return [kept for batch in curriculum if (kept := [i for i in batch if i not in dropped])]


def removal_effects(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial: np.ndarray,
    columns: np.ndarray,
    groups: Sequence[Collection[str]],
    removal: str = "renormalize",
) -> np.ndarray:
    """Shape ``(G, len(columns))``: ``L_T(with) - L_T(without group g)`` per test column.

    ``"renormalize"``: every occurrence of the group's ids is dropped and the curriculum
    re-simulated (batches shrink, empty ones vanish). ``"zero-weight"``: the batches stay as
    they are and each consumption of the group's ids becomes neutral, ``A = 1/b``, ``B = 0``
    (a zero loss weight; needs a Simfluence-Linear-family simulator). All ``G + 1`` rollouts
    go in one vectorized call. Negative = removing the group raises the loss (it helped).
    """
    check_removal(removal)
    batches = normalize_curriculum(curriculum)
    if removal == "renormalize":
        edited = [batches] + [_without(batches, set(map(str, g))) for g in groups]
        finals = np.empty((len(edited), len(columns)))
        busy = [k for k, c in enumerate(edited) if len(c)]
        finals[:] = initial[columns]
        trajs = _rollouts(simulator, [edited[k] for k in busy], initial, columns)
        finals[busy] = [t[-1] for t in trajs]
        return finals[0] - finals[1:]
    if not isinstance(simulator, DynamicsSimulator):
        raise SimfluenceError(
            f"{simulator.name}: zero-weight removal needs a simulator of the Simfluence-Linear "
            "family (per-example parameters); use removal='renormalize'"
        )
    return _zero_weight_effects(simulator, batches, initial, columns, groups)


def _zero_weight_effects(
    simulator: DynamicsSimulator,
    batches: list[list[str]],
    initial: np.ndarray,
    columns: np.ndarray,
    groups: Sequence[Collection[str]],
) -> np.ndarray:
    # one extra, neutral pool column (A = 1/b, B = 0): a zero-weight consumption is moved there
    counts = simulator.encode([batches])[0].tocoo()
    neutral = len(simulator.train_ids_)
    index = {t: k for k, t in enumerate(simulator.train_ids_)}
    edited = [counts.tocsr()]
    for group in groups:
        cols = counts.col.copy()
        cols[np.isin(cols, [index[str(i)] for i in group if str(i) in index])] = neutral
        edited.append(
            sparse.csr_matrix(
                (counts.data, (counts.row, cols)), shape=(counts.shape[0], neutral + 1)
            )
        )
    edited[0] = sparse.hstack([edited[0], sparse.csr_matrix((counts.shape[0], 1))], format="csr")
    B = np.hstack([simulator.B_[columns], np.zeros((len(columns), 1))])
    A = None
    if simulator.A_ is not None:
        prior = 1.0 / simulator.batch_size_
        A = np.hstack([simulator.A_[columns], np.full((len(columns), 1), prior)])
    slopes = None
    if simulator.B_slope_ is not None:  # time-varying effects (featurized, hybrid): the neutral
        zero = np.zeros((len(columns), 1))  # column does not drift
        A_slope = simulator.A_slope_
        slopes = (
            None if A_slope is None else np.hstack([A_slope[columns], zero]),
            np.hstack([simulator.B_slope_[columns], zero]),
        )
    start = np.ascontiguousarray(np.broadcast_to(initial[columns], (len(edited), len(columns))))
    trajectories = simulator.rollout_params(edited, A, B, slopes, start)
    finals = np.stack([t[-1] for t in trajectories])
    return finals[0] - finals[1:]


def _prepare(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial_loss: np.ndarray | None,
    test_ids: str | Sequence[str],
) -> tuple[list[list[str]], np.ndarray, np.ndarray, list[str]]:
    columns = test_columns(simulator, test_ids)
    batches = normalize_curriculum(curriculum)
    ids = [simulator.test_ids_[j] for j in columns]
    return batches, _initial(simulator, initial_loss), columns, ids


# -- leave-one-out ----------------------------------------------------------------------------
@dataclass
class LeaveOneOut:
    """Simulated leave-one-out of every distinct training id of a curriculum.

    Attributes:
        test_ids: the test examples whose mean final loss is the objective.
        final_loss: the objective with the full curriculum, ``L_T(with)``.
        train_ids: the ``N`` distinct training ids, most helpful first (ascending effect).
        counts: shape ``(N,)``, how many times each was consumed in the curriculum.
        effects: shape ``(N,)``, ``L_T(with) - L_T(without it)``; negative = helpful.
        lower, upper: shape ``(N,)``, each effect's interval at `level` (`effect_intervals`),
            or None when the simulator has no fold copies (not calibrated, or not a dynamics
            simulator).
        level: the nominal level of the intervals, or None.
        removal: what "without it" means (`REMOVALS`).
        method: what computed the effects when not a simulator's rollouts (``"unrolled"``...).
    """

    test_ids: list[str]
    final_loss: float
    train_ids: list[str]
    counts: np.ndarray
    effects: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    level: float | None = None
    removal: str = "renormalize"
    method: str | None = None

    def uncertain(self) -> np.ndarray:
        """Shape ``(N,)`` bool: the effect's interval includes 0 (its sign is not established);
        all False without intervals."""
        if self.lower is None or self.upper is None:
            return np.zeros(len(self.effects), dtype=bool)
        return (self.lower <= 0) & (self.upper >= 0)

    def helpful(self, k: int) -> list[tuple[str, int, float]]:
        """Up to `k` rows ``(id, count, effect)`` with negative effect, most helpful first."""
        rows = [r for r in self.rows() if r[2] < 0]
        return rows[:k]

    def harmful(self, k: int) -> list[tuple[str, int, float]]:
        """Up to `k` rows with positive effect, most harmful first."""
        rows = [r for r in reversed(self.rows()) if r[2] > 0]
        return rows[:k]

    def rows(self) -> list[tuple[str, int, float]]:
        return [
            (i, int(c), float(e))
            for i, c, e in zip(self.train_ids, self.counts, self.effects, strict=True)
        ]

    def to_json(self) -> dict[str, Any]:
        effects: list[dict[str, Any]] = [
            {"train_id": i, "count": c, "effect": e} for i, c, e in self.rows()
        ]
        if self.lower is not None and self.upper is not None:
            for row, lo, hi, zero in zip(
                effects, self.lower, self.upper, self.uncertain(), strict=True
            ):
                row |= {
                    "lower": float(lo),
                    "upper": float(hi),
                    "interval_includes_zero": bool(zero),
                }
        return {
            "sign_convention": SIGN_CONVENTION,
            "removal": self.removal,
            "test_ids": self.test_ids,
            "final_loss": self.final_loss,
            "interval_level": self.level,
            "interval": None if self.level is None else INTERVAL_NOTE,
            "effects": effects,
        }


def leave_one_out(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial_loss: np.ndarray | None,
    test_ids: str | Sequence[str],
    level: float | None = 0.9,
    removal: str = "renormalize",
) -> LeaveOneOut:
    """Each distinct training id's effect on the final loss by simulated leave-one-out.

    For every distinct id ``i`` of `curriculum`, every occurrence is removed (batches left
    empty are dropped) and the curriculum re-simulated; all ``N`` counterfactuals are rolled
    out in one vectorized call. ``effect_i = L_T(with) - L_T(without i)``, averaged over
    `test_ids`: **negative = consuming i lowered the final loss (helpful)**.

    Args:
        initial_loss: shape ``(M,)`` (all test examples of the model), or None for the
            simulator's mean recorded one.
        level: the level of each effect's interval (`effect_intervals`; only for calibrated
            dynamics simulators), or None for none.
        removal: ``"renormalize"`` (drop it, re-average its batches) or ``"zero-weight"``
            (keep it in its batches with weight 0); see `removal_effects`.
    """
    batches, initial, columns, ids = _prepare(simulator, curriculum, initial_loss, test_ids)
    distinct, counts = np.unique([i for b in batches for i in b], return_counts=True)
    final = float(final_objective(simulator, [batches], initial, columns)[0])
    groups = [[str(i)] for i in distinct]
    effects = removal_effects(simulator, batches, initial, columns, groups, removal).mean(axis=1)
    order = np.argsort(effects, kind="stable")
    result = LeaveOneOut(
        ids,
        final,
        [str(distinct[k]) for k in order],
        counts[order],
        effects[order],
        removal=removal,
    )
    folds = simulator.fold_simulators() if isinstance(simulator, DynamicsSimulator) else []
    if level is not None and folds:
        per_fold = []
        for fold in folds:
            fold_effects = removal_effects(fold, batches, initial, columns, groups, removal)
            per_fold.append(fold_effects.mean(axis=1))
        lower, upper = effect_intervals(effects, np.stack(per_fold), level)
        result.lower, result.upper, result.level = lower[order], upper[order], float(level)
    return result


INTERVAL_NOTE = (
    "effect +- t(K-1) * jackknife standard error over the K calibration refits, each without "
    "one fold of runs: how much the effect depends on which runs were recorded"
)


def effect_intervals(
    effects: np.ndarray, per_fold: np.ndarray, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Intervals of simulated effects from the ``K`` fold refits (delete-a-group jackknife).

    Args:
        effects: shape ``(N,)``, under the simulator fitted on all runs.
        per_fold: shape ``(K, N)``, the same effects under each refit without one fold.
        level: nominal level, e.g. 0.9.

    Returns:
        ``(lower, upper)``, each ``(N,)``: ``effects -+ t * se`` with the jackknife standard
        error ``se = sqrt((K - 1) / K * sum_k (e_k - mean_k e)^2)`` and ``t`` the Student
        quantile with ``K - 1`` degrees of freedom. It measures the parameters' dependence on
        the recorded runs, not the run-to-run noise of one real retraining.
    """
    from scipy import stats

    k = per_fold.shape[0]
    spread = per_fold - per_fold.mean(axis=0)
    se = np.sqrt((k - 1) / k * np.sum(spread**2, axis=0))
    half = float(stats.t.ppf(0.5 + level / 2, df=k - 1)) * se
    return effects - half, effects + half


# -- where in training ------------------------------------------------------------------------
@dataclass
class StepContributions:
    """Where in training the objective moved.

    Attributes:
        test_ids: the test examples averaged.
        trajectory: shape ``(T + 1,)``, the simulated objective after each step (0 = start);
            for a replayed run (`unit` says so), the recorded one.
        change: shape ``(T,)``, ``L_t - L_{t-1}`` for steps ``t = 1..T``; negative = the
            step lowered the loss. For a replayed run: each step's first-order effect on the
            *final* loss (the metagradients of its consumptions; see `unit`).
        contributions: for dynamics simulators, one dict per step ``{train_id: contribution}``
            whose values sum exactly to that step's change (an id repeated in a batch is
            summed); where the loss floor bent a step (`soft_floor`), an entry ``"(floor)"``
            holds what it added; None for simulators without a per-example decomposition.
        unit: what `change` and `contributions` measure.
    """

    test_ids: list[str]
    trajectory: np.ndarray
    change: np.ndarray
    contributions: list[dict[str, float]] | None
    unit: str = SIMULATED_CHANGE

    def top_steps(self, k: int) -> list[int]:
        """The `k` steps (1-based) with the largest ``|L_t - L_{t-1}|``, largest first."""
        order = np.argsort(-np.abs(self.change), kind="stable")[:k]
        return [int(t) + 1 for t in order]

    def top_examples(self, step: int, k: int) -> list[tuple[str, float]]:
        """The `k` largest-magnitude contributions ``(id, contribution)`` at `step` (1-based)."""
        if self.contributions is None:
            return []
        items = sorted(self.contributions[step - 1].items(), key=lambda kv: -abs(kv[1]))
        return items[:k]

    def to_json(self, top: int = 10, per_step: int = 5) -> dict[str, Any]:
        return {
            "test_ids": self.test_ids,
            "unit": self.unit,
            "trajectory": self.trajectory.tolist(),
            "change": self.change.tolist(),
            "top_steps": [
                {
                    "step": t,
                    "change": float(self.change[t - 1]),
                    "top_examples": [
                        {"train_id": i, "contribution": c}
                        for i, c in self.top_examples(t, per_step)
                    ],
                }
                for t in self.top_steps(top)
            ],
        }


def step_contributions(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial_loss: np.ndarray | None,
    test_ids: str | Sequence[str],
) -> StepContributions:
    """Per-step change of the simulated objective and, for dynamics simulators, its exact
    decomposition into per-example contributions.

    With ``w_t`` the batch weight (``b / |c_t|`` for ``batch_weighting="mean"``, 1 for
    ``"sum"``) and ``n_ti`` the times ``i`` is in batch ``t``, the rollout's step is
    ``L_t = sum_i n_ti w_t (A_i L_{t-1} + B_i)``, so

        L_t - L_{t-1} = sum_{i in c_t} n_ti [w_t (A_i L_{t-1} + B_i) - L_{t-1} / |c_t|],

    which for "mean" weighting is ``sum_i n_ti w_t ((A_i - 1/b) L_{t-1} + B_i)``: each example
    is credited with its departure from "no effect" (``A = 1/b``, ``B = 0``). Additive
    simulators (``A_`` None, alpha = 1): contribution ``n_ti w_t B_i``. Negative = the example
    lowered the loss at that step. Contributions are averaged over `test_ids` like the loss.
    """
    batches, initial, columns, ids = _prepare(simulator, curriculum, initial_loss, test_ids)
    traj = _rollouts(simulator, [batches], initial, columns)[0]
    objective = traj.mean(axis=1)
    change = np.diff(objective)
    contributions = None
    if isinstance(simulator, DynamicsSimulator):
        contributions = _decompose(simulator, batches, traj, columns)
        for step, delta in zip(contributions, change, strict=True):
            floor = delta - sum(step.values())
            if abs(floor) > 1e-12 * max(1.0, abs(delta)):
                step[FLOOR_KEY] = float(floor)
    return StepContributions(ids, objective, change, contributions)


#: the pseudo training id of what the loss floor added to a step (`step_contributions`)
FLOOR_KEY = "(floor)"


def _decompose(
    simulator: DynamicsSimulator,
    batches: list[list[str]],
    traj: np.ndarray,
    columns: np.ndarray,
) -> list[dict[str, float]]:
    W = simulator.encode([batches])[0].tocsr()  # (T, P): n_ti * w_t
    W.sum_duplicates()
    rows = np.repeat(np.arange(W.shape[0]), np.diff(W.indptr))
    cols, w = W.indices, W.data
    size = simulator.row_mass(W)  # w_t |c_t|, so n_ti / |c_t| = W_ti / size_t
    prev = traj[rows]  # (nnz, m): L_{t-1} of the step each entry belongs to
    B = simulator.B_[columns][:, cols].T
    tau = None
    if simulator.B_slope_ is not None:  # time-varying effects: those of each entry's step
        tau = step_times(W.shape[0], simulator.time_scale_)[rows][:, None]
        B = B + tau * simulator.B_slope_[columns][:, cols].T
    if simulator.A_ is None:
        per = w[:, None] * B
    else:
        A = simulator.A_[columns][:, cols].T
        if tau is not None:
            A = A + tau * simulator.A_slope_[columns][:, cols].T
        per = w[:, None] * (A * prev + B) - (w / size[rows])[:, None] * prev
    values = per.mean(axis=1)
    out: list[dict[str, float]] = [{} for _ in batches]
    for t, col, v in zip(rows, cols, values, strict=True):
        out[t][simulator.train_ids_[col]] = float(v)
    return out


# -- non-additivity ---------------------------------------------------------------------------
@dataclass
class PairInteractions:
    """Pairwise non-additivity among the top ``K`` examples by ``|LOO effect|``.

    Attributes:
        test_ids: the test examples averaged.
        train_ids: the ``K`` examples.
        singles: shape ``(K,)``, their leave-one-out effects.
        pairs: one row per pair ``(id_i, id_j, joint, additive, interaction)``: ``joint`` =
            ``L_T(with) - L_T(without i and j)``, ``additive`` = ``effect_i + effect_j``,
            ``interaction = joint - additive``. Zero = additive. For two helpful examples a
            negative interaction means removing both hurts more than the sum of removing each
            (they are redundant: each covers for the other).
    """

    test_ids: list[str]
    train_ids: list[str]
    singles: np.ndarray
    pairs: list[tuple[str, str, float, float, float]]

    def to_json(self) -> dict[str, Any]:
        return {
            "sign_convention": SIGN_CONVENTION + "; interaction = joint - (effect_i + effect_j)",
            "test_ids": self.test_ids,
            "singles": dict(zip(self.train_ids, self.singles.tolist(), strict=True)),
            "pairs": [
                {"i": i, "j": j, "joint": a, "additive": s, "interaction": x}
                for i, j, a, s, x in self.pairs
            ],
        }


def pair_interactions(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial_loss: np.ndarray | None,
    test_ids: str | Sequence[str],
    top: int = 10,
    loo: LeaveOneOut | None = None,
    removal: str = "renormalize",
) -> PairInteractions:
    """Interactions of all pairs of the `top` examples by ``|LOO effect|``: the simulated effect
    of removing both vs the sum of removing each (``interaction = joint - (single_i +
    single_j)``); all pairs are rolled out in one vectorized call. Pairs are sorted by
    ``|interaction|``, largest first. Pass `loo` to reuse a `leave_one_out` result."""
    batches, initial, columns, ids = _prepare(simulator, curriculum, initial_loss, test_ids)
    loo = loo or leave_one_out(simulator, batches, initial, ids, None, removal)
    chosen = np.argsort(-np.abs(loo.effects), kind="stable")[: max(top, 0)]
    names = [loo.train_ids[k] for k in chosen]
    singles = loo.effects[chosen]
    pairs = list(combinations(range(len(names)), 2))
    groups = [[names[a], names[b]] for a, b in pairs]
    joints = removal_effects(simulator, batches, initial, columns, groups, removal).mean(axis=1)
    rows = []
    for (a, b), joint in zip(pairs, joints, strict=True):
        joint = float(joint)
        additive = float(singles[a] + singles[b])
        rows.append((names[a], names[b], joint, additive, joint - additive))
    rows.sort(key=lambda r: -abs(r[4]))
    return PairInteractions(ids, names, singles, rows)


def attribution_views(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial_loss: np.ndarray | None,
    test_ids: str | Sequence[str],
    top: int = 10,
    pairs: int = 10,
    level: float | None = 0.9,
    removal: str = "renormalize",
) -> tuple[LeaveOneOut, StepContributions, PairInteractions | None, dict[str, Any]]:
    """All three views for one test example (or the mean of several), and their JSON form:
    ``{"method", "sign_convention", "leave_one_out", "steps", "pairs"}`` (what
    ``simfluence attribute --json`` writes, without the file names). ``pairs < 2``: no pairs."""
    loo = leave_one_out(simulator, curriculum, initial_loss, test_ids, level, removal)
    steps = step_contributions(simulator, curriculum, initial_loss, test_ids)
    interactions = (
        pair_interactions(simulator, curriculum, initial_loss, test_ids, pairs, loo, removal)
        if pairs >= 2
        else None
    )
    payload = {
        "method": simulator.name,
        "sign_convention": SIGN_CONVENTION,
        "leave_one_out": loo.to_json(),
        "steps": steps.to_json(top),
        "pairs": None if interactions is None else interactions.to_json(),
    }
    return loo, steps, interactions, payload
