"""All three attribution views of one question at once, and their JSON form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simfluence.counterfactual.attribution.loo import LeaveOneOut, leave_one_out
from simfluence.counterfactual.attribution.pairs import PairInteractions, pair_interactions
from simfluence.counterfactual.attribution.removal import SIGN_CONVENTION
from simfluence.counterfactual.attribution.steps import StepContributions, step_contributions
from simfluence.runlog.runs import AnyCurriculum
from simfluence.simulators.base import Simulator


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
