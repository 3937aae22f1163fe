"""Non-additivity: how far removing two examples together departs from the sum of removing
each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from simfluence.counterfactual.attribution.loo import LeaveOneOut, leave_one_out
from simfluence.counterfactual.attribution.removal import SIGN_CONVENTION, removal_effects
from simfluence.counterfactual.attribution.rollouts import _prepare
from simfluence.runlog.runs import AnyCurriculum
from simfluence.simulators.base import Simulator


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
