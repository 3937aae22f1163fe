"""Showing how well simulators do: held-out scoring, the metric table, and their text.

* `simfluence.evaluation.heldout`: the paper's protocol (`evaluate`, `EvaluationResult`,
  `score_fitted` for a simulator fitted elsewhere);
* `simfluence.evaluation.specs`: `METRICS`, the one table of metric specs (key, label, which
  way is better, text format) that the text table, the JSON and the HTML report all read;
* `simfluence.evaluation.text`: the plain-text tables the commands print;
* `simfluence.evaluation.validation_json`: reading back `simfluence validate --json`.
"""

from simfluence.evaluation.heldout import (
    EvaluationResult,
    MethodResult,
    evaluate,
    evaluate_simulator,
    interval_scores,
    score,
    score_fitted,
    score_intervals,
    split_by_unseen,
    unseen_fraction,
    unseen_shares,
)
from simfluence.evaluation.specs import (
    METRICS,
    UNSEEN_BINS,
    VALIDATION_METRICS,
    MetricSpec,
    metric_label,
    metric_spec,
)
from simfluence.evaluation.text import (
    failure_message,
    format_attribution,
    format_table,
    format_unseen_table,
    format_validation,
)
from simfluence.evaluation.validation_json import Validation, ValidationKind, read_validation

__all__ = [
    "METRICS",
    "UNSEEN_BINS",
    "VALIDATION_METRICS",
    "EvaluationResult",
    "MethodResult",
    "MetricSpec",
    "Validation",
    "ValidationKind",
    "evaluate",
    "evaluate_simulator",
    "failure_message",
    "format_attribution",
    "format_table",
    "format_unseen_table",
    "format_validation",
    "interval_scores",
    "metric_label",
    "metric_spec",
    "read_validation",
    "score",
    "score_fitted",
    "score_intervals",
    "split_by_unseen",
    "unseen_fraction",
    "unseen_shares",
]
