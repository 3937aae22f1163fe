"""What a curriculum search returns (`SearchResult`) and its answer in words (`_statement`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
