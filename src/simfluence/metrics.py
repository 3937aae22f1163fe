"""Evaluation metrics as plain functions over arrays (METHOD.md, "Evaluation protocol").

Inputs are the true and simulated trajectories of held-out runs: either an array of shape
``(R, T + 1, M)`` or a list of ``R`` arrays of shape ``(T_r + 1, M)`` (runs may differ in
length). Row 0 (before training) is never scored: both start from the recorded loss.
NaN in the *true* trajectories marks a loss that was not recorded (sparse scoring,
``Run.observed``): every metric is computed on the observed steps only (a trajectory with no
observed step after step 0 is left out). Fully observed trajectories give the same numbers as
ever.
Each function returns a `Summary` of the mean and the standard deviation over trajectories
(one per held-out run and test example) or, for Spearman, over held-out runs.
`linear_datamodeling_score` compares final losses across curricula instead (validation);
`interval_coverage` and `interval_width` score predictive intervals (plain floats).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

Trajectories = np.ndarray | Sequence[np.ndarray]


class Summary(NamedTuple):
    """Mean and (population) standard deviation of a per-trajectory or per-run metric."""

    mean: float
    std: float


def _pairs(y_true: Trajectories, y_pred: Trajectories) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true runs but {len(y_pred)} simulated runs")
    pairs = []
    for r, (t, p) in enumerate(zip(y_true, y_pred, strict=True)):
        t, p = np.asarray(t, dtype=np.float64), np.asarray(p, dtype=np.float64)
        if t.shape != p.shape or t.ndim != 2 or t.shape[0] < 2:
            raise ValueError(
                f"run #{r}: true shape {t.shape} and simulated shape {p.shape} must be equal "
                "(T + 1, M) with T >= 1"
            )
        pairs.append((t, p))
    if not pairs:
        raise ValueError("no runs to score")
    return pairs


def _summary(values: np.ndarray) -> Summary:
    # an exploding rollout is an infinitely bad prediction, not a crash
    values = np.where(np.isfinite(values), values, np.inf)
    return Summary(
        float(np.mean(values)), float(np.std(values)) if np.isfinite(values).all() else np.inf
    )


def trajectory_errors(y_true: Trajectories, y_pred: Trajectories, power: int = 2) -> np.ndarray:
    """Per-trajectory mean of ``|error|**power`` over steps ``1..T`` (the observed ones: NaN in
    `y_true` is not recorded); shape ``(R * M,)``, fewer when a trajectory has no observed
    step."""
    out = []
    with np.errstate(over="ignore", invalid="ignore"):
        for t, p in _pairs(y_true, y_pred):
            errors = np.abs(p[1:] - t[1:]) ** power
            seen = ~np.isnan(t[1:])
            if seen.all():
                out.append(errors.mean(axis=0))
                continue
            counts = seen.sum(axis=0)
            total = np.where(seen, errors, 0.0).sum(axis=0)
            out.append(total[counts > 0] / counts[counts > 0])
    return np.concatenate(out)


def all_steps_mse(y_true: Trajectories, y_pred: Trajectories) -> Summary:
    """Mean over (run, test) trajectories of the mean squared error over steps ``1..T``."""
    return _summary(trajectory_errors(y_true, y_pred, power=2))


def all_steps_mae(y_true: Trajectories, y_pred: Trajectories) -> Summary:
    """Mean over (run, test) trajectories of the mean absolute error over steps ``1..T``."""
    return _summary(trajectory_errors(y_true, y_pred, power=1))


def final_step_mse(y_true: Trajectories, y_pred: Trajectories) -> Summary:
    """Mean over (run, test) trajectories of the squared error at the last step ``T``."""
    with np.errstate(over="ignore", invalid="ignore"):
        errors = np.concatenate(
            [((p[-1] - t[-1]) ** 2)[~np.isnan(t[-1])] for t, p in _pairs(y_true, y_pred)]
        )
    return _summary(errors)


def final_step_spearman(y_true: Trajectories, y_pred: Trajectories) -> Summary:
    """Within each run, Spearman correlation across test examples of true vs simulated ``L_T``.

    Mean and std over runs. A run whose predictions are constant (or not finite) scores 0:
    it ranks nothing.
    """
    rhos = [
        spearman_or_zero(t[-1][~np.isnan(t[-1])], p[-1][~np.isnan(t[-1])])
        for t, p in _pairs(y_true, y_pred)
    ]
    return Summary(float(np.mean(rhos)), float(np.std(rhos)))


def linear_datamodeling_score(true_final: np.ndarray, predicted_final: np.ndarray) -> float:
    """LDS (as TRAK and dattri define it): for each test example, the Spearman correlation
    across curricula of predicted vs actual final loss; then the mean over test examples.

    Args:
        true_final, predicted_final: shape ``(C, M)``, final losses of ``C`` curricula.
    Returns:
        in ``[-1, 1]``; a test example whose predictions (or actual losses) do not vary scores 0.
    """
    columns = zip(true_final.T, predicted_final.T, strict=True)
    return float(np.mean([spearman_or_zero(t, p) for t, p in columns]))


def spearman_or_zero(true: np.ndarray, predicted: np.ndarray) -> float:
    """Spearman correlation, or 0 when either side is constant or a prediction is not finite
    (such a prediction ranks nothing)."""
    if not np.isfinite(predicted).all() or np.ptp(predicted) == 0 or np.ptp(true) == 0:
        return 0.0
    from scipy import stats  # here: importing scipy.stats costs every command 0.4 s

    return float(stats.spearmanr(true, predicted).statistic)


def interval_coverage(y_true: Trajectories, lower: Trajectories, upper: Trajectories) -> float:
    """Share of (run, step ``1..T``, test example) points with ``lower <= true <= upper``.

    A calibrated 90% interval covers about 0.9 of held-out points. Row 0 is not scored, nor
    unrecorded points (NaN in `y_true`).
    """
    inside = [
        ((t[1:] >= lo[1:]) & (t[1:] <= hi[1:]))[~np.isnan(t[1:])]
        for (t, lo), (_, hi) in zip(_pairs(y_true, lower), _pairs(y_true, upper), strict=True)
    ]
    return float(np.mean(np.concatenate(inside)))


def interval_width(lower: Trajectories, upper: Trajectories) -> float:
    """Mean of ``upper - lower`` over (run, step ``1..T``, test example) points (in loss units;
    infinite when a bound is)."""
    with np.errstate(invalid="ignore"):
        widths = [(hi[1:] - lo[1:]).ravel() for lo, hi in _pairs(lower, upper)]
    values = np.concatenate(widths)
    return float(np.mean(np.where(np.isnan(values), np.inf, values)))


# -- attribution against actual leave-one-out ---------------------------------------------------
# ``actual`` and ``predicted`` are effect matrices of shape ``(M, N)``: row ``j`` holds, for test
# example ``j``, ``L_T(with) - L_T(without example i)`` of every training example ``i``
# (negative = helpful), as retraining measured it and as a method predicted it.


def _effect_pairs(actual: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    actual, predicted = np.asarray(actual, np.float64), np.asarray(predicted, np.float64)
    if actual.shape != predicted.shape or actual.ndim != 2:
        raise ValueError(
            f"actual effects {actual.shape} and predicted {predicted.shape} must both be (M, N)"
        )
    return actual, predicted


def per_test_spearman(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over test examples (rows) of the Spearman correlation across training examples."""
    actual, predicted = _effect_pairs(actual, predicted)
    return float(np.mean([spearman_or_zero(a, p) for a, p in zip(actual, predicted, strict=True)]))


def per_test_pearson(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over test examples (rows) of the Pearson correlation across training examples
    (0 for a row where either side is constant or a prediction is not finite)."""
    from scipy import stats

    actual, predicted = _effect_pairs(actual, predicted)
    rhos = []
    for a, p in zip(actual, predicted, strict=True):
        ok = np.isfinite(p).all() and np.ptp(p) > 0 and np.ptp(a) > 0
        rhos.append(float(stats.pearsonr(a, p).statistic) if ok else 0.0)
    return float(np.mean(rhos))


def top_sign_agreement(actual: np.ndarray, predicted: np.ndarray, k: int = 10) -> float:
    """Of the `k` training examples a method calls most helpful for a test example (lowest
    predicted effect), the share whose actual effect is helpful too (negative); mean over
    test examples. 1 = every "this helped" was right."""
    actual, predicted = _effect_pairs(actual, predicted)
    k = min(k, actual.shape[1])
    top = np.argsort(predicted, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.take_along_axis(actual, top, axis=1) < 0))


def effect_size_ratio(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Root-mean-square predicted effect over root-mean-square actual effect (all entries):
    1 = the right size, below 1 = effects predicted too small."""
    actual, predicted = _effect_pairs(actual, predicted)
    denominator = float(np.sqrt(np.mean(actual**2)))
    return float(np.sqrt(np.mean(predicted**2))) / denominator if denominator > 0 else np.inf
