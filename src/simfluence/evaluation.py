"""Held-out evaluation in the paper's protocol: fit on training runs, roll out held-out runs.

The JSON written by `simfluence evaluate --json` is `EvaluationResult.to_json()`:

    {"train_runs": [...], "heldout_runs": [...],
     "methods": {NAME: {"all_steps_mse", "all_steps_mse_std", "all_steps_mae", "all_steps_mae_std",
                        "final_step_mse", "final_step_mse_std", "final_step_spearman",
                        "final_step_spearman_std", "fit_seconds", "simulate_seconds",
                        "coverage_90", "interval_width_90", "calibrate_seconds",
                        "warnings": [str, ...]}},
     "failed": {NAME: "why it failed"}}

``coverage_90``: the share of held-out (run, step >= 1, test example) points inside the method's
90% predictive interval (`Simulator.calibrate` on the training runs, then
`simulate_interval`); ``interval_width_90``: its mean width. A method whose calibration
failed has neither (and ``interval_error`` says why).

``warnings`` are what a method says about its own validity on these runs (e.g. a gradient
method on runs trained with Adam). With ``keep_going=True`` a method that raises is reported in
``failed`` and the others are still evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simfluence import metrics
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.intervals import Interval


@dataclass
class MethodResult:
    """Metrics of one method on the held-out runs, and its rollouts (one ``(T + 1, M)`` per run)."""

    scores: dict[str, Any]
    simulated: list[np.ndarray]
    simulator: Simulator
    #: 90% predictive intervals of `simulated` (one per held-out run), when calibrated
    intervals: list[Interval] | None = None
    #: what the method says about its validity on these runs (``simulator.warnings_``)
    warnings: list[str] = field(default_factory=list)


@dataclass
class EvaluationResult:
    train_runs: list[str]
    heldout_runs: list[str]
    methods: dict[str, MethodResult] = field(default_factory=dict)
    #: share of the held-out runs' consumptions whose id no training run consumed
    unseen_fraction: float = 0.0
    #: methods that raised (with ``keep_going``): name -> the exception
    failed: dict[str, Exception] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "train_runs": self.train_runs,
            "heldout_runs": self.heldout_runs,
            "heldout_unseen_fraction": self.unseen_fraction,
            "methods": {
                name: {**result.scores, "warnings": list(result.warnings)}
                for name, result in self.methods.items()
            },
            "failed": {name: failure_message(exc, name) for name, exc in self.failed.items()},
        }


def failure_message(exc: BaseException, method: str = "") -> str:
    """One line: a user mistake's own message (without a leading ``"method: "``, which the
    caller shows), else the exception's type and message."""
    text = " ".join(str(exc).split())
    if isinstance(exc, SimfluenceError):
        return text.removeprefix(f"{method}: ") if method else text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


def evaluate_simulator(
    simulator: Simulator, train: RunSet, heldout: RunSet, intervals: bool = True
) -> MethodResult:
    """Fit on `train`, roll out every held-out curriculum from its recorded ``L_0``, score;
    with `intervals`, also calibrate on `train` and score the 90% intervals."""
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
    warnings = list(getattr(simulator, "warnings_", None) or [])
    result = MethodResult(scores, simulated, simulator, warnings=warnings)
    if intervals:
        score_intervals(result, train, heldout)
    return result


def score_intervals(result: MethodResult, train: RunSet, heldout: RunSet) -> None:
    """Calibrate `result`'s simulator on `train` and add ``coverage_90``, ``interval_width_90``
    and ``calibrate_seconds`` to its scores (its 90% intervals in ``result.intervals``)."""
    start = time.perf_counter()
    try:
        result.simulator.calibrate(train)
    except SimfluenceError as exc:  # e.g. too few training runs to hold any out
        result.scores["interval_error"] = str(exc)
        return
    result.scores["calibrate_seconds"] = time.perf_counter() - start
    true = [r.losses for r in heldout.runs]
    result.intervals, scores = interval_scores(result.simulator, true, result.simulated)
    result.scores |= scores


def interval_scores(
    simulator: Simulator, true: Sequence[np.ndarray], simulated: Sequence[np.ndarray]
) -> tuple[list[Interval], dict[str, float]]:
    """The calibrated `simulator`'s 90% intervals around its rollouts `simulated`, and their
    ``{"coverage_90", "interval_width_90"}`` against the `true` trajectories (steps >= 1)."""
    bands = [simulator.interval_of(s, 0.9) for s in simulated]
    lower, upper = [b.lower for b in bands], [b.upper for b in bands]
    return bands, {
        "coverage_90": metrics.interval_coverage(true, lower, upper),
        "interval_width_90": metrics.interval_width(lower, upper),
    }


def evaluate(
    runs: RunSet,
    simulators: dict[str, Simulator],
    heldout: int | Sequence[str],
    progress: Callable[[Iterable[Any]], Iterable[Any]] = iter,
    intervals: bool = True,
    keep_going: bool = False,
) -> EvaluationResult:
    """Split `runs` by whole runs (see `RunSet.split`) and evaluate every simulator.

    `progress` wraps the list of methods (e.g. `tqdm`) to show progress; `intervals` also
    scores every method's 90% predictive intervals (`score_intervals`). With `keep_going`, a
    method that raises is recorded in ``result.failed`` and the others still run; otherwise
    the first failure propagates.
    """
    train, held = runs.split(heldout)
    result = EvaluationResult(
        train.run_ids, held.run_ids, unseen_fraction=unseen_fraction(train, held)
    )
    for name, simulator in progress(list(simulators.items())):
        try:
            result.methods[name] = evaluate_simulator(simulator, train, held, intervals)
        except Exception as exc:
            if not keep_going:
                raise
            result.failed[name] = exc
    return result


def format_table(result: EvaluationResult) -> str:
    """A plain-text table: one row per method, the protocol's metrics as mean ± std."""
    header = ["method", "all-steps MSE", "all-steps MAE", "final MSE", "final Spearman", "fit s"]
    with_intervals = any("coverage_90" in m.scores for m in result.methods.values())
    if with_intervals:
        header += ["coverage 90%", "width 90%"]
    rows = [header]
    for name, method in result.methods.items():
        s = method.scores
        row = [
            name,
            f"{s['all_steps_mse']:.4g} ± {s['all_steps_mse_std']:.2g}",
            f"{s['all_steps_mae']:.4g} ± {s['all_steps_mae_std']:.2g}",
            f"{s['final_step_mse']:.4g} ± {s['final_step_mse_std']:.2g}",
            f"{s['final_step_spearman']:.3f} ± {s['final_step_spearman_std']:.2f}",
            f"{s['fit_seconds']:.2f}",
        ]
        if with_intervals:
            has = "coverage_90" in s
            row += [
                f"{s['coverage_90']:.3f}" if has else "-",
                f"{s['interval_width_90']:.4g}" if has else "-",
            ]
        rows.append(row)
    rows += [[name, "failed", *["-"] * (len(header) - 2)] for name in result.failed]
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"warning: {w}" for method in result.methods.values() for w in method.warnings]
    lines += [
        f"failed: {name}: {failure_message(exc, name)}" for name, exc in result.failed.items()
    ]
    return "\n".join(lines)
