"""Held-out scoring in the paper's protocol: fit on training runs, roll out held-out runs.

The JSON written by `simfluence evaluate --json` is `EvaluationResult.to_json()`:

    {"train_runs": [...], "heldout_runs": [...],
     "methods": {NAME: {"all_steps_mse", "all_steps_mse_std", "all_steps_mae", "all_steps_mae_std",
                        "final_step_mse", "final_step_mse_std", "final_step_spearman",
                        "final_step_spearman_std", "fit_seconds", "simulate_seconds",
                        "coverage_90", "interval_width_90", "calibrate_seconds",
                        "warnings": [str, ...]}},
     "failed": {NAME: "why it failed"},
     "heldout_unseen_fraction": share of the held-out consumptions unseen in training,
     "heldout_unseen_share": {RUN: share of that run's consumptions unseen in training},
     "by_unseen_share": {NAME: {BIN: {"runs", "unseen_share", "all_steps_mse",
                                      "final_step_mse", "final_step_spearman",
                                      "coverage_90"}}}}

``coverage_90``: the share of held-out (run, step >= 1, test example) points inside the method's
90% predictive interval (`Simulator.calibrate` on the training runs, then
`simulate_interval`); ``interval_width_90``: its mean width. A method whose calibration
failed has neither (and ``interval_error`` says why).

``warnings`` are what a method says about its own validity on these runs (e.g. a gradient
method on runs trained with Adam). With ``keep_going=True`` a method that raises is reported in
``failed`` and the others are still evaluated.

The metric keys are those of `specs.METRICS` (with ``_std`` where computed from rollouts).
``BIN`` groups the held-out runs by their unseen share (`specs.UNSEEN_BINS`: "0%", "0-10%",
"10-30%", ">30%"; only bins holding runs appear): how each method fares on genuinely new
training data (``coverage_90`` only for methods with intervals).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simfluence import metrics
from simfluence.errors import SimfluenceError
from simfluence.evaluation import specs
from simfluence.evaluation.text import failure_message
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
    #: the same per held-out run, in `heldout_runs` order
    unseen_shares: list[float] = field(default_factory=list)
    #: the held-out runs' recorded losses, in `heldout_runs` order
    true: list[np.ndarray] = field(default_factory=list, repr=False)

    def by_unseen_share(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per method, the metrics of the held-out runs grouped by their unseen share."""
        return {
            name: split_by_unseen(self.true, method.simulated, self.unseen_shares, method.intervals)
            for name, method in self.methods.items()
        }

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "train_runs": self.train_runs,
            "heldout_runs": self.heldout_runs,
            "heldout_unseen_fraction": self.unseen_fraction,
            "methods": {
                name: {
                    **result.scores,
                    "warnings": list(result.warnings),
                    # what a method that chooses (`auto`) picked
                    **(
                        {"choice": result.simulator.choice()}  # type: ignore[attr-defined]
                        if callable(getattr(result.simulator, "choice", None))
                        else {}
                    ),
                }
                for name, result in self.methods.items()
            },
            "failed": {name: failure_message(exc, name) for name, exc in self.failed.items()},
        }
        if self.unseen_shares:
            out["heldout_unseen_share"] = dict(
                zip(self.heldout_runs, self.unseen_shares, strict=True)
            )
            out["by_unseen_share"] = self.by_unseen_share()
        return out


def score(true: Sequence[np.ndarray], simulated: Sequence[np.ndarray]) -> dict[str, float]:
    """Every protocol metric (the `specs.METRICS` with a ``compute``), as a flat dict (mean and
    ``_std`` of each)."""
    out: dict[str, float] = {}
    for spec in specs.METRICS:
        if spec.compute is not None:
            summary = spec.compute(true, simulated)
            out[spec.key], out[f"{spec.key}_std"] = summary.mean, summary.std
    return out


def unseen_fraction(train: RunSet, heldout: RunSet) -> float:
    """Share of the held-out consumptions of ids that no training run consumed (such ids get
    "no effect" under ``unseen="prior"``, or stop the evaluation under ``"error"``)."""
    counts = _unseen_counts(train, heldout)
    total = sum(n for _, n in counts)
    return sum(u for u, _ in counts) / total if total else 0.0


def unseen_shares(train: RunSet, heldout: RunSet) -> list[float]:
    """Per held-out run, the share of its consumptions of ids that no training run consumed."""
    return [unseen / total if total else 0.0 for unseen, total in _unseen_counts(train, heldout)]


def _unseen_counts(train: RunSet, heldout: RunSet) -> list[tuple[int, int]]:
    seen = {i for run in train.runs for batch in run.curriculum for i in batch}
    counts = []
    for run in heldout.runs:
        ids = [i for batch in run.curriculum for i in batch]
        counts.append((sum(i not in seen for i in ids), len(ids)))
    return counts


def split_by_unseen(
    true: Sequence[np.ndarray],
    simulated: Sequence[np.ndarray],
    shares: Sequence[float],
    intervals: Sequence[Interval] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the runs of each `specs.UNSEEN_BINS` bin that holds any (runs, their mean unseen
    share, all-steps MSE, final-step MSE, final-step Spearman: means as in `score`; with the
    runs' 90% `intervals`, ``coverage_90`` as in `interval_scores`)."""
    out = {}
    for low, high, label in specs.UNSEEN_BINS:
        rows = [k for k, share in enumerate(shares) if low < share <= high]
        if rows:
            pick_true, pick_sim = [true[k] for k in rows], [simulated[k] for k in rows]
            out[label] = {
                "runs": len(rows),
                "unseen_share": float(np.mean([shares[k] for k in rows])),
                "all_steps_mse": metrics.all_steps_mse(pick_true, pick_sim).mean,
                "final_step_mse": metrics.final_step_mse(pick_true, pick_sim).mean,
                "final_step_spearman": metrics.final_step_spearman(pick_true, pick_sim).mean,
            }
            if intervals is not None:
                out[label]["coverage_90"] = metrics.interval_coverage(
                    pick_true,
                    [intervals[k].lower for k in rows],
                    [intervals[k].upper for k in rows],
                )
    return out


def evaluate_simulator(
    simulator: Simulator, train: RunSet, heldout: RunSet, intervals: bool = True
) -> MethodResult:
    """Fit on `train`, roll out every held-out curriculum from its recorded ``L_0``, score;
    with `intervals`, also calibrate on `train` and score the 90% intervals."""
    start = time.perf_counter()
    simulator.fit(train)
    result = score_fitted(simulator, heldout, fit_seconds=time.perf_counter() - start)
    if intervals:
        score_intervals(result, train, heldout)
    return result


def score_fitted(
    simulator: Simulator,
    heldout: RunSet,
    fit_seconds: float = math.nan,
    intervals: bool = False,
    where: str = "",
) -> MethodResult:
    """Roll out an already-fitted `simulator` on every held-out run from its recorded ``L_0``
    and score it (no fit; ``fit_seconds`` as given, NaN: not measured). With `intervals`, a
    simulator calibrated when it was fitted also has its 90% intervals scored.

    Raises `SimfluenceError` (prefixed by `where`) when its test examples are not the
    held-out runs' in the same order."""
    test_ids = getattr(simulator, "test_ids_", None)
    if test_ids is not None and list(test_ids) != list(heldout.test_ids):
        raise SimfluenceError(
            f"{where or simulator.name}: its test examples ({len(test_ids)}) are not the run "
            f"set's ({len(heldout.test_ids)}) in the same order"
        )
    start = time.perf_counter()
    simulated = simulator.simulate_many(
        [r.curriculum for r in heldout.runs], np.stack([r.initial_loss for r in heldout.runs])
    )
    simulate_seconds = time.perf_counter() - start
    scores = score([r.losses for r in heldout.runs], simulated)
    scores |= {"fit_seconds": fit_seconds, "simulate_seconds": simulate_seconds}
    warnings = list(getattr(simulator, "warnings_", None) or [])
    result = MethodResult(scores, simulated, simulator, warnings=warnings)
    if intervals and simulator.is_calibrated:
        true = [r.losses for r in heldout.runs]
        result.intervals, interval_metrics = interval_scores(simulator, true, simulated)
        scores |= interval_metrics
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
        train.run_ids,
        held.run_ids,
        unseen_fraction=unseen_fraction(train, held),
        unseen_shares=unseen_shares(train, held),
        true=[r.losses for r in held.runs],
    )
    for name, simulator in progress(list(simulators.items())):
        try:
            result.methods[name] = evaluate_simulator(simulator, train, held, intervals)
        except Exception as exc:
            if not keep_going:
                raise
            result.failed[name] = exc
    return result
