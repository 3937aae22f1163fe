"""Metrics exactly as METHOD.md defines them, on hand-computed examples."""

from __future__ import annotations

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
