"""Metrics exactly as METHOD.md defines them, on hand-computed examples."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from simfluence import metrics


def test_all_steps_errors_skip_step_zero_and_average_per_trajectory() -> None:
    true = [np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 2.0]])]
    pred = [np.array([[9.0, 9.0], [2.0, 2.0], [3.0, 2.0]])]  # row 0 differs but is not scored
    # trajectory 0: errors 1, 2 -> MSE (1 + 4) / 2 = 2.5, MAE 1.5; trajectory 1: 0, 0
    assert metrics.all_steps_mse(true, pred) == (1.25, 1.25)
    assert metrics.all_steps_mae(true, pred) == (0.75, 0.75)
    assert metrics.final_step_mse(true, pred) == (2.0, 2.0)


def test_runs_of_different_lengths() -> None:
    true = [np.zeros((3, 1)), np.zeros((2, 1))]
    pred = [np.ones((3, 1)), 2 * np.ones((2, 1))]
    assert metrics.all_steps_mse(true, pred).mean == pytest.approx((1 + 4) / 2)
    np.testing.assert_allclose(metrics.trajectory_errors(true, pred, power=1), [1.0, 2.0])


def test_final_step_spearman_within_each_run() -> None:
    true = np.zeros((2, 3, 4))
    true[:, -1] = [[1, 2, 3, 4], [4, 3, 2, 1]]
    pred = np.zeros((2, 3, 4))
    pred[:, -1] = [[10, 20, 30, 40], [1, 2, 3, 4]]  # perfect in run 0, reversed in run 1
    assert metrics.final_step_spearman(true, pred) == (0.0, 1.0)
    pred[1, -1] = 5.0  # constant prediction ranks nothing
    assert metrics.final_step_spearman(true, pred).mean == 0.5


def test_exploding_rollouts_score_infinite() -> None:
    true = [np.zeros((2, 1))]
    pred = [np.array([[0.0], [np.inf]])]
    assert metrics.all_steps_mse(true, pred).mean == np.inf


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="run #0"):
        metrics.all_steps_mse([np.zeros((3, 2))], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="2 true runs but 1"):
        metrics.all_steps_mse([np.zeros((3, 2))] * 2, [np.zeros((3, 2))])


def test_linear_datamodeling_score_correlates_across_curricula() -> None:
    true = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])  # 3 curricula, 2 test examples
    pred = np.array([[0.1, 1.0], [0.2, 3.0], [0.3, 2.0]])
    # test 0 ranked perfectly (1.0); test 1's actual loss never varies: scores 0
    assert metrics.linear_datamodeling_score(true, pred) == 0.5


# -- rank metrics on data where Spearman and Pearson differ -------------------------------------
def test_spearman_is_a_rank_correlation_not_pearson() -> None:
    """A monotone, strongly non-linear prediction ranks perfectly (Pearson would say 0.77)."""
    true = np.arange(6.0)
    pred = np.exp(2.0 * true)
    assert np.corrcoef(true, pred)[0, 1] < 0.8
    assert metrics.spearman_or_zero(true, pred) == pytest.approx(1.0, abs=1e-15)
    assert metrics.spearman_or_zero(true, -pred) == pytest.approx(-1.0, abs=1e-15)
    # one swap among six: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 210
    swapped = pred[[0, 1, 3, 2, 4, 5]]
    assert metrics.spearman_or_zero(true, swapped) == pytest.approx(1 - 12 / 210, abs=1e-12)


def test_spearman_gives_ties_their_average_rank() -> None:
    # ranks of true: 1, 2.5, 2.5, 4; Pearson of the ranks = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    true = np.array([1.0, 2.0, 2.0, 3.0])
    pred = np.array([0.1, 0.2, 0.9, 50.0])
    assert metrics.spearman_or_zero(true, pred) == pytest.approx(3 / np.sqrt(10), abs=1e-12)
    assert metrics.spearman_or_zero(pred, true) == pytest.approx(3 / np.sqrt(10), abs=1e-12)


def test_final_step_spearman_on_monotone_non_linear_predictions() -> None:
    true = np.zeros((2, 2, 5))
    true[:, -1] = [[0.1, 0.5, 1.0, 2.0, 4.0], [3.0, 1.0, 2.0, 2.0, 0.5]]
    pred = np.zeros((2, 2, 5))
    pred[0, -1] = np.log(true[0, -1])  # monotone: rho 1
    pred[1, -1] = [
        9.0,
        1.0,
        4.0,
        5.0,
        0.0,
    ]  # ties in true: ranks 5, 2, 3.5, 3.5, 1 vs 5, 2, 3, 4, 1
    # centred ranks (2, -1, .5, .5, -2) and (2, -1, 0, 1, -2): 9.5 / sqrt(9.5 * 10)
    expected = np.sqrt(0.95)
    summary = metrics.final_step_spearman(true, pred)
    assert summary.mean == pytest.approx((1.0 + expected) / 2, abs=1e-12)
    assert summary.std == pytest.approx((1.0 - expected) / 2, abs=1e-12)


def test_lds_on_monotone_non_linear_predictions_and_ties() -> None:
    """Per test example across curricula: a monotone transform scores 1, a reversal -1."""
    true = np.array([[1.0, 3.0, 2.0], [2.0, 2.0, 1.0], [3.0, 1.0, 1.0], [4.0, 0.0, 5.0]])
    pred = np.stack([true[:, 0] ** 3, np.exp(true[:, 1]), [0.0, 1.0, 2.0, 3.0]], axis=1)
    # column 0: monotone (1); column 1: monotone (1); column 2: ties in true (ranks 3, 1.5, 1.5,
    # 4) against ranks 1, 2, 3, 4
    tied = np.corrcoef([3.0, 1.5, 1.5, 4.0], [1.0, 2.0, 3.0, 4.0])[0, 1]
    assert metrics.linear_datamodeling_score(true, pred) == pytest.approx((2 + tied) / 3, abs=1e-12)
    assert metrics.linear_datamodeling_score(true[:, :2], -pred[:, :2]) == pytest.approx(-1.0)


def test_rank_metrics_score_constant_or_broken_predictions_zero() -> None:
    assert metrics.spearman_or_zero(np.arange(3.0), np.array([1.0, np.nan, 2.0])) == 0.0
    assert metrics.spearman_or_zero(np.arange(3.0), np.full(3, 2.0)) == 0.0
    assert metrics.spearman_or_zero(np.ones(3), np.arange(3.0)) == 0.0


def test_non_finite_errors_make_an_infinite_score_and_spread() -> None:
    true = [np.zeros((3, 2))]
    pred = [np.array([[0.0, 0.0], [1.0, np.nan], [1.0, 0.0]])]  # trajectory 1 is NaN
    for summary in (metrics.all_steps_mse(true, pred), metrics.all_steps_mae(true, pred)):
        assert summary == (np.inf, np.inf)
    assert metrics.final_step_mse(true, pred) == (0.5, 0.5)  # the NaN is not at the last step
    finite = metrics.all_steps_mse(true, [np.nan_to_num(pred[0])])
    assert finite == (0.5, 0.5)  # errors (1 + 1) / 2 = 1 and 0


def test_trajectories_need_a_step_and_a_run() -> None:
    with pytest.raises(ValueError, match="T >= 1"):
        metrics.all_steps_mse([np.zeros((1, 3))], [np.zeros((1, 3))])
    with pytest.raises(ValueError, match="T >= 1"):
        metrics.final_step_mse([np.zeros(3)], [np.zeros(3)])
    with pytest.raises(ValueError, match="no runs"):
        metrics.final_step_spearman([], [])
    # a (R, T + 1, M) array is R runs
    stacked = metrics.all_steps_mae(np.zeros((2, 3, 1)), np.ones((2, 3, 1)))
    assert stacked == (1.0, 0.0)


def test_final_step_is_the_last_row_and_default_power_is_squared() -> None:
    true = [np.array([[0.0], [1.0], [2.0], [4.0]])]
    pred = [np.array([[0.0], [0.0], [0.0], [1.0]])]
    assert metrics.final_step_mse(true, pred) == (9.0, 0.0)  # (1 - 4)^2, not the row before
    np.testing.assert_allclose(metrics.trajectory_errors(true, pred), [(1 + 4 + 9) / 3])


def test_exploding_rollouts_are_scored_without_numpy_warnings() -> None:
    """A diverging simulator (1e200, inf, inf - inf) is an infinitely bad prediction: scored
    silently, not with overflow or invalid-value warnings on the user's console."""
    true = [np.zeros((3, 2)), np.zeros((3, 2))]
    pred = [np.array([[0.0, 0.0], [1e200, np.inf], [1e300, np.inf]]), np.ones((3, 2))]
    pred[1][-1] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (metrics.all_steps_mse, metrics.all_steps_mae, metrics.final_step_mse):
            assert fn(true, pred).mean == np.inf
        assert np.isinf(metrics.trajectory_errors(true, pred, power=2)).all()


def test_lds_needs_the_same_curricula_and_tests() -> None:
    with pytest.raises(ValueError):
        metrics.linear_datamodeling_score(np.zeros((3, 2)), np.zeros((3, 3)))


def test_attribution_metrics_against_actual_effects() -> None:
    from simfluence.metrics import (
        effect_size_ratio,
        per_test_pearson,
        per_test_spearman,
        top_sign_agreement,
    )

    actual = np.array([[-3.0, -2.0, -1.0, 1.0, 2.0], [1.0, -1.0, 2.0, -2.0, 0.5]])
    assert per_test_spearman(actual, 2 * actual) == pytest.approx(1.0)
    assert per_test_pearson(actual, 2 * actual + 1) == pytest.approx(1.0)
    assert per_test_pearson(actual, -actual) == pytest.approx(-1.0)
    assert effect_size_ratio(actual, 0.5 * actual) == pytest.approx(0.5)
    # top 2 predicted helpful: row 0 -> columns 0, 1 (both helped); row 1 -> 3 and 4 (one did)
    predicted = np.array([[-9.0, -8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -5.0, -6.0]])
    assert top_sign_agreement(actual, predicted, k=2) == pytest.approx(0.75)
    assert per_test_pearson(actual, np.zeros_like(actual)) == 0.0  # constant ranks nothing
    with pytest.raises(ValueError, match=r"must both be \(M, N\)"):
        per_test_spearman(actual, actual[:, :3])


def test_effect_metrics_compute_in_float64_for_half_precision_effects() -> None:
    """Effects of a half-precision model arrive as float16: squaring 300 in float16 overflows
    (65504 is its largest value), so the ratio must be computed after converting to float64."""
    actual = np.array([[-300.0, 200.0, -100.0, 300.0]], dtype=np.float16)
    predicted = (2 * actual).astype(np.float16)
    assert metrics.effect_size_ratio(actual, predicted) == pytest.approx(2.0, rel=1e-12)
    assert metrics.effect_size_ratio(predicted, actual) == pytest.approx(0.5, rel=1e-12)


def test_effect_size_ratio_without_any_actual_effect_is_infinite() -> None:
    """No actual effect at all: any predicted effect is infinitely too large (not a crash)."""
    assert metrics.effect_size_ratio(np.zeros((2, 3)), np.ones((2, 3))) == np.inf
    assert metrics.effect_size_ratio(np.zeros((2, 3)), np.zeros((2, 3))) == np.inf


def test_pearson_scores_a_test_example_without_actual_effects_zero() -> None:
    """A test example whose actual effects are all equal ranks nothing: it scores 0 (not NaN,
    which would poison the mean over test examples)."""
    actual = np.array([[-3.0, -2.0, -1.0, 1.0, 2.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    predicted = np.array([[-6.0, -4.0, -2.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning from scipy either
        assert metrics.per_test_pearson(actual, predicted) == pytest.approx(0.5)
        assert metrics.per_test_spearman(actual, predicted) == pytest.approx(0.5)


def test_top_sign_agreement_defaults_to_the_top_ten() -> None:
    # predicted order = index order; the ten most helpful predicted all helped, the next two hurt
    actual = np.array([[-1.0] * 10 + [1.0, 1.0]])
    predicted = np.arange(12.0)[None, :]
    assert metrics.top_sign_agreement(actual, predicted) == 1.0
    assert metrics.top_sign_agreement(actual, predicted, k=11) == pytest.approx(10 / 11)
    assert metrics.top_sign_agreement(actual, predicted, k=50) == pytest.approx(10 / 12)


def test_top_sign_agreement_counts_a_zero_effect_as_not_helpful() -> None:
    """An example whose removal changed nothing (effect exactly 0) did not help."""
    actual = np.array([[0.0, -1.0, 2.0]])
    predicted = np.array([[-5.0, -4.0, 0.0]])
    assert metrics.top_sign_agreement(actual, predicted, k=2) == 0.5


def test_top_sign_agreement_breaks_ties_by_training_example_order() -> None:
    """Tied predicted effects are taken in training-example order (earlier first), the same on
    every platform: an unstable sort would pick an arbitrary subset of a tied group."""
    rng = np.random.default_rng(0)
    n = 40
    predicted = rng.integers(0, 3, n).astype(float)[None, :]
    actual = np.where(np.arange(n) < n // 2, -1.0, 1.0)[None, :]  # earlier examples helped
    for k in (5, 10, 15, 20, 25):
        top = sorted(range(n), key=lambda i: (predicted[0, i], i))[:k]  # stable by hand
        expected = np.mean(actual[0, top] < 0)
        assert metrics.top_sign_agreement(actual, predicted, k=k) == pytest.approx(expected)


def test_a_test_example_never_observed_after_step_zero_is_left_out() -> None:
    """Sparse truth: a test example with no observed step after 0 has no error (left out),
    the others average over their observed steps only."""
    true = [np.array([[1.0, 1.0, 1.0], [0.5, np.nan, 0.8], [np.nan, np.nan, 0.6]])]
    pred = [np.array([[1.0, 1.0, 1.0], [0.7, 0.9, 0.8], [0.1, 0.5, 0.4]])]
    errors = metrics.trajectory_errors(true, pred)
    np.testing.assert_allclose(errors, [0.2**2, (0.0 + 0.2**2) / 2], rtol=1e-12)
