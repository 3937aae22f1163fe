"""The one table of the held-out metrics: every place that shows an evaluation reads it.

`METRICS` feeds `score` (which metrics are computed, so the JSON's keys), `format_table` (the
text table's columns) and the HTML report's metric table and its explanations. Adding a
`MetricSpec` with a `compute` function adds the metric to all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from simfluence import metrics

Better = Literal["lower", "higher"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric column.

    Attributes:
        key: its key in ``MethodResult.scores`` and the JSON (its spread: ``key + "_std"``).
        label: its column header, the same in the text table and the report.
        better: "lower" or "higher" is better; None when neither (e.g. a coverage, whose
            target is the nominal level).
        fmt: format spec of the value as text (``format(value, fmt)``).
        std_fmt: format spec of its ``_std``, shown as ``± std``; None when it has none.
        explanation: one sentence for the report.
        compute: ``fn(true, simulated) -> Summary`` (mean and std over trajectories) when
            `score` computes it from the rollouts; None for the metrics measured elsewhere
            (seconds, intervals).
        optional: a text-table column only when some method has it (the intervals).
    """

    key: str
    label: str
    better: Better | None
    fmt: str
    std_fmt: str | None
    explanation: str
    compute: Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], Any] | None = None
    optional: bool = False

    def text(self, scores: dict[str, Any], missing: str = "-") -> str:
        """The cell of a method with these `scores` (``value ± std``), `missing` if absent."""
        if self.key not in scores:
            return missing
        out = format(scores[self.key], self.fmt)
        if self.std_fmt is not None and f"{self.key}_std" in scores:
            out += f" ± {format(scores[f'{self.key}_std'], self.std_fmt)}"
        return out

    def shown(self, value: Any) -> Any:
        """`value` as it reads in a cell, so that equal-looking cells compare equal."""
        if isinstance(value, float | np.floating) and math.isfinite(value):
            return float(format(float(value), self.fmt))
        return value


#: the held-out metrics, in column order
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "all_steps_mse",
        "all-steps MSE",
        "lower",
        ".4g",
        ".2g",
        "mean over (held-out run, test example) trajectories of the squared error of the "
        "free-running rollout, averaged over steps 1..T.",
        metrics.all_steps_mse,
    ),
    MetricSpec(
        "all_steps_mae",
        "all-steps MAE",
        "lower",
        ".4g",
        ".2g",
        "the same with the absolute error: less dominated by a few spikes.",
        metrics.all_steps_mae,
    ),
    MetricSpec(
        "final_step_mse",
        "final-step MSE",
        "lower",
        ".4g",
        ".2g",
        "squared error of the predicted loss after the last step only.",
        metrics.final_step_mse,
    ),
    MetricSpec(
        "final_step_spearman",
        "final-step Spearman",
        "higher",
        ".3f",
        ".2f",
        "within each held-out run, the rank correlation across test examples between predicted "
        "and recorded final loss (does the method know which examples end up learned?), "
        "averaged over runs.",
        metrics.final_step_spearman,
    ),
    MetricSpec(
        "fit_seconds",
        "fit s",
        "lower",
        ".2f",
        None,
        "wall-clock seconds to fit on the training runs (pre-fitted models: not measured).",
    ),
    MetricSpec(
        "coverage_90",
        "coverage 90%",
        None,
        ".3f",
        None,
        "share of held-out (run, step, test example) points inside the method's 90% predictive "
        "interval (calibrated on held-out folds of the training runs): about 0.9 is calibrated, "
        "less is overconfident.",
        optional=True,
    ),
    MetricSpec(
        "interval_width_90",
        "width 90%",
        None,
        ".4g",
        None,
        "mean width of that interval, in loss units: among calibrated methods, narrower is more "
        "informative (the curriculum-blind mean's width is the spread of the runs themselves).",
        optional=True,
    ),
)

#: the metrics of `simfluence validate` (its JSON's per-method keys; see
#: `simfluence.evaluation.validation_json`), the held-out ones with the same meaning included
VALIDATION_METRICS: tuple[MetricSpec, ...] = (
    *(m for m in METRICS if m.key in ("all_steps_mse", "final_step_spearman")),
    MetricSpec(
        "lds",
        "LDS",
        "higher",
        ".3f",
        None,
        "linear datamodeling score: the rank correlation between predicted and actual outcomes "
        "across counterfactual curricula.",
    ),
    *(m for m in METRICS if m.key == "coverage_90"),
)


def metric_spec(key: str) -> MetricSpec | None:
    """The spec of `key` among `METRICS` and `VALIDATION_METRICS` (None if neither has it)."""
    return next((m for m in (*METRICS, *VALIDATION_METRICS) if m.key == key), None)


def metric_label(key: str) -> str:
    """`key`'s column label (the key itself for a metric without a spec)."""
    spec = metric_spec(key)
    return spec.label if spec is not None else key


#: ``(low, high, label)``: a run falls in the first bin with ``low < share <= high`` ("0%" is 0)
UNSEEN_BINS: tuple[tuple[float, float, str], ...] = (
    (-1.0, 0.0, "0%"),
    (0.0, 0.1, "0-10%"),
    (0.1, 0.3, "10-30%"),
    (0.3, 1.0, ">30%"),
)
