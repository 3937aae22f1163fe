"""Attribution views of one *recorded* run from the run itself: "which examples helped, in
the run I trained, and at which step?" (what ``simfluence attribute --method unrolled|dvemb|
combined`` shows).

* ``unrolled`` (the default of ``attribute`` for a recorded run with a step-0 checkpoint: it
  measured best against actual leave-one-out, README): leave-one-out effects from the run's
  exact metagradients, and per step the first-order effect of each consumption on the final
  loss ("where in training").
* ``dvemb``: DVEmb's leave-one-out estimates (dattri); zero-weight removal only, no steps.
* ``combined``: unrolled's leave-one-out and steps, with the pairwise interactions (redundancy)
  of a fitted Simfluence-Linear-family simulator added to unrolled's (additive) joint effects.

The results are the same `LeaveOneOut` / `StepContributions` / `PairInteractions` objects the
simulator views return (`simfluence.counterfactual.attribution`), with the same sign
convention: effect = ``L_T(with) - L_T(without)``, negative = helpful.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from simfluence.counterfactual.attribution import (
    SIGN_CONVENTION,
    LeaveOneOut,
    PairInteractions,
    StepContributions,
    check_removal,
)
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.dynamics import DynamicsSimulator

__all__ = ["METAGRADIENT_UNIT", "RUN_METHODS", "run_attribution_views"]

RUN_METHODS = ("unrolled", "dvemb", "combined")
METAGRADIENT_UNIT = (
    "first-order effect of the step's consumptions on the final loss, d L_T / d w "
    "(replayed run; weight 1 -> 0)"
)


def _columns(runs: RunSet, test_ids: str | Sequence[str]) -> tuple[list[str], np.ndarray]:
    ids = [test_ids] if isinstance(test_ids, str) else [str(t) for t in test_ids]
    if not ids:
        raise SimfluenceError("no test ids given")
    index = {t: j for j, t in enumerate(runs.test_ids)}
    unknown = [t for t in ids if t not in index]
    if unknown:
        raise SimfluenceError(
            f"unknown test id {unknown[0]!r}: the run set scores {len(index)} test examples"
        )
    return ids, np.array([index[t] for t in ids])


def run_attribution_views(
    runs: RunSet,
    run_id: str,
    test_ids: str | Sequence[str],
    method: str = "unrolled",
    removal: str = "renormalize",
    *,
    top: int = 10,
    pairs: int = 6,
    simulator: Simulator | None = None,
    workload: str | None = None,
    directory: str | None = None,
    task: str | None = None,
) -> tuple[LeaveOneOut, StepContributions | None, PairInteractions | None, dict[str, Any]]:
    """Leave-one-out, where-in-training and (``combined``) pair views of run `run_id`, and
    their JSON form ``{"method", "sign_convention", "leave_one_out", "steps", "pairs"}``.

    Args:
        runs: the run set (recorded with a step-0 checkpoint).
        test_ids: one test id, or several (their mean loss is the objective).
        method: one of `RUN_METHODS`.
        removal: ``"renormalize"`` or ``"zero-weight"`` (``dvemb``: zero-weight only).
        simulator: the fitted simulator whose interactions ``combined`` adds.
        task: a task reference overriding the one the run set's manifest stores (`workload`:
            its older name).
    """
    check_removal(removal)
    if method not in RUN_METHODS:
        raise SimfluenceError(f"method {method!r}: must be one of {', '.join(RUN_METHODS)}")
    ids, cols = _columns(runs, test_ids)
    run = runs.run(run_id)
    counts = Counter(i for b in run.curriculum for i in b)
    trajectory = run.losses[:, cols].mean(axis=1)
    steps = interactions = None
    if method == "dvemb":
        if removal != "zero-weight":
            raise SimfluenceError(
                "dvemb estimates the zero-weight removal only (the example kept in its batches "
                "at weight 0): pass --removal zero-weight"
            )
        from simfluence.attribution.dvemb import DVEmbSimulator

        result = DVEmbSimulator(task=task or workload, checkpoints_dir=directory).run_effects(
            runs, run_id
        )
        train_ids, effects = result.train_ids, result.effects[cols].mean(axis=0)
    else:
        from simfluence.attribution.unrolled import UnrolledSimulator

        # the reverse pass costs in proportion to the test examples: only the asked ones
        mg = UnrolledSimulator(task=task or workload, checkpoints_dir=directory).metagradients(
            runs, run_id, test_ids=sorted(set(ids))
        )
        mine = np.array([mg.test_ids.index(t) for t in ids])
        train_ids, per_test = mg.effects(removal)
        effects = per_test[mine].mean(axis=0)
        per_step = mg.grads[mine].mean(axis=0)
        contributions: list[dict[str, float]] = [{} for _ in run.curriculum]
        for step, train_id, value in zip(mg.steps, mg.train_ids, per_step, strict=True):
            contributions[step - 1][train_id] = contributions[step - 1].get(train_id, 0.0) + value
        steps = StepContributions(
            ids, trajectory, mg.step_effects()[mine].mean(axis=0), contributions, METAGRADIENT_UNIT
        )
    order = np.argsort(effects, kind="stable")
    loo = LeaveOneOut(
        ids,
        float(trajectory[-1]),
        [train_ids[k] for k in order],
        np.array([counts[train_ids[k]] for k in order]),
        effects[order],
        removal=removal,
        method=method,
    )
    if method == "combined":
        if not isinstance(simulator, DynamicsSimulator):
            raise SimfluenceError(
                "combined needs a fitted Simfluence-Linear-family simulator (MODEL) for the "
                "pairwise interactions"
            )
        interactions = _combined_pairs(loo, mg, simulator, runs, run_id, mine, pairs, removal)
    payload = {
        "method": method,
        "run": run_id,
        "sign_convention": SIGN_CONVENTION,
        "leave_one_out": loo.to_json(),
        "steps": None if steps is None else steps.to_json(top),
        "pairs": None if interactions is None else interactions.to_json(),
    }
    return loo, steps, interactions, payload


def _combined_pairs(
    loo: LeaveOneOut,
    mg: Any,
    simulator: DynamicsSimulator,
    runs: RunSet,
    run_id: str,
    cols: np.ndarray,
    top: int,
    removal: str,
) -> PairInteractions:
    """Pairs of the top examples: the run's first-order joint effect plus the simulator's
    interaction (`simfluence.attribution.combined`)."""
    from simfluence.attribution.combined import simulator_interactions

    chosen = np.argsort(-np.abs(loo.effects), kind="stable")[: max(top, 0)]
    names = [loo.train_ids[k] for k in chosen]
    groups = [[a, b] for a, b in combinations(names, 2)]
    inter = simulator_interactions(simulator, runs.run(run_id), runs.test_ids, groups, removal)
    test_cols = [runs.test_ids.index(t) for t in mg.test_ids]
    joints = (mg.removal_effects(groups, removal) + inter[test_cols])[cols].mean(axis=0)
    singles = loo.effects[chosen]
    single_of = dict(zip(names, singles, strict=True))
    rows = []
    for (a, b), joint in zip(groups, joints, strict=True):
        additive = float(single_of[a] + single_of[b])
        rows.append((a, b, float(joint), additive, float(joint) - additive))
    rows.sort(key=lambda r: -abs(r[4]))
    return PairInteractions(loo.test_ids, names, singles, rows)
