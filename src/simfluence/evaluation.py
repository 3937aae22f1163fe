"""Held-out evaluation in the paper's protocol: fit on training runs, roll out held-out runs.

The JSON written by `simfluence evaluate --json` is `EvaluationResult.to_json()`:

    {"train_runs": [...], "heldout_runs": [...],
     "methods": {NAME: {"all_steps_mse", "all_steps_mse_std", "all_steps_mae", "all_steps_mae_std",
                        "final_step_mse", "final_step_mse_std", "final_step_spearman",
                        "final_step_spearman_std", "fit_seconds", "simulate_seconds", "params"}}}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simfluence import metrics
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import Simulator


@dataclass
class MethodResult:
    """Metrics of one method on the held-out runs, and its rollouts (one ``(T + 1, M)`` per run)."""

    scores: dict[str, float]
    simulated: list[np.ndarray]
    simulator: Simulator


@dataclass
class EvaluationResult:
    train_runs: list[str]
    heldout_runs: list[str]
    methods: dict[str, MethodResult] = field(default_factory=dict)
    #: share of the held-out runs' consumptions whose id no training run consumed
    unseen_fraction: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "train_runs": self.train_runs,
            "heldout_runs": self.heldout_runs,
            "heldout_unseen_fraction": self.unseen_fraction,
            "methods": {name: result.scores for name, result in self.methods.items()},
        }


def score(true: Sequence[np.ndarray], simulated: Sequence[np.ndarray]) -> dict[str, float]:
    """Every protocol metric, as a flat dict (mean and ``_std`` of each)."""
    out: dict[str, float] = {}
    for name, fn in (
        ("all_steps_mse", metrics.all_steps_mse),
        ("all_steps_mae", metrics.all_steps_mae),
        ("final_step_mse", metrics.final_step_mse),
        ("final_step_spearman", metrics.final_step_spearman),
    ):
        summary = fn(true, simulated)
        out[name], out[f"{name}_std"] = summary.mean, summary.std
    return out


def unseen_fraction(train: RunSet, heldout: RunSet) -> float:
    """Share of the held-out consumptions of ids that no training run consumed (such ids get
    "no effect" under ``unseen="prior"``, or stop the evaluation under ``"error"``)."""
    seen = {i for run in train.runs for batch in run.curriculum for i in batch}
    total = unseen = 0
    for run in heldout.runs:
        for batch in run.curriculum:
            total += len(batch)
            unseen += sum(i not in seen for i in batch)
    return unseen / total if total else 0.0


def evaluate_simulator(simulator: Simulator, train: RunSet, heldout: RunSet) -> MethodResult:
    """Fit on `train`, roll out every held-out curriculum from its recorded ``L_0``, score."""
    start = time.perf_counter()
    simulator.fit(train)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    simulated = simulator.simulate_many(
        [r.curriculum for r in heldout.runs], np.stack([r.initial_loss for r in heldout.runs])
    )
    simulate_seconds = time.perf_counter() - start
    scores = score([r.losses for r in heldout.runs], simulated)
    scores |= {"fit_seconds": fit_seconds, "simulate_seconds": simulate_seconds}
    return MethodResult(scores, simulated, simulator)


def evaluate(
    runs: RunSet,
    simulators: dict[str, Simulator],
    heldout: int | Sequence[str],
    progress: Callable[[Iterable[Any]], Iterable[Any]] = iter,
) -> EvaluationResult:
    """Split `runs` by whole runs (see `RunSet.split`) and evaluate every simulator.

    `progress` wraps the list of methods (e.g. `tqdm`) to show progress.
    """
    train, held = runs.split(heldout)
    result = EvaluationResult(
        train.run_ids, held.run_ids, unseen_fraction=unseen_fraction(train, held)
    )
    for name, simulator in progress(list(simulators.items())):
        result.methods[name] = evaluate_simulator(simulator, train, held)
    return result


def format_table(result: EvaluationResult) -> str:
    """A plain-text table: one row per method, the protocol's metrics as mean ± std."""
    header = ["method", "all-steps MSE", "all-steps MAE", "final MSE", "final Spearman", "fit s"]
    rows = [header]
    for name, method in result.methods.items():
        s = method.scores
        rows.append(
            [
                name,
                f"{s['all_steps_mse']:.4g} ± {s['all_steps_mse_std']:.2g}",
                f"{s['all_steps_mae']:.4g} ± {s['all_steps_mae_std']:.2g}",
                f"{s['final_step_mse']:.4g} ± {s['final_step_mse_std']:.2g}",
                f"{s['final_step_spearman']:.3f} ± {s['final_step_spearman_std']:.2f}",
                f"{s['fit_seconds']:.2f}",
            ]
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
