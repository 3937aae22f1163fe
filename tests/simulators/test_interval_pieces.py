"""Interval metrics and building blocks by hand, including the edge cases an exploding
simulator produces (infinite and NaN losses), which must give the documented values without
numpy warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from simfluence.metrics import interval_coverage, interval_width
from simfluence.simulators.intervals import Bands, _window_sums, residual_table


@pytest.fixture(autouse=True)
def _warnings_are_errors():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_coverage_counts_the_end_points_and_skips_step_zero() -> None:
    true = [np.array([[9.0, 9.0], [1.0, 2.0], [3.0, 0.5]])]
    lower = [np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 1.0]])]
    upper = [np.array([[0.0, 0.0], [2.0, 2.0], [2.5, 3.0]])]
    # step 1: on the lower bound, on the upper bound; step 2: above, below
    assert interval_coverage(true, lower, upper) == 0.5
    with pytest.raises(ValueError):
        interval_coverage(true * 2, lower, upper)


def test_width_is_the_mean_gap_and_infinite_where_a_bound_is() -> None:
    lower = [np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]]), np.array([[0.0, 0.0], [1.0, 3.0]])]
    upper = [np.array([[5.0, 5.0], [2.0, 4.0], [2.5, 1.5]]), np.array([[0.0, 0.0], [1.5, 3.0]])]
    assert interval_width(lower, upper) == pytest.approx((1 + 3 + 0.5 + 1 + 0.5 + 0) / 6)
    lower[1][1, 1], upper[1][1, 1] = np.inf, np.inf  # inf - inf: no width known -> infinite
    assert interval_width(lower, upper) == np.inf


def test_residuals_pad_short_runs_and_mark_explosions_infinite() -> None:
    true = [np.array([[1.0, 2.0], [0.5, 1.0]]), np.array([[1.0, 2.0], [0.5, 1.5], [0.2, 1.0]])]
    simulated = [
        np.array([[1.0, 2.0], [0.7, 0.5]]),
        np.array([[1.0, 2.0], [np.inf, 1.0], [0.3, np.nan]]),
    ]
    out = residual_table(true, simulated)
    expected = np.array(
        [[[0.0, 0.0], [-0.2, 0.5], [np.nan, np.nan]], [[0.0, 0.0], [np.inf, 0.5], [-0.1, np.inf]]]
    )
    np.testing.assert_allclose(out, expected)
    huge = [np.array([[0.0], [1e308]])], [np.array([[0.0], [-1e308]])]  # overflows to inf
    assert residual_table(*huge)[0, 1, 0] == np.inf
    with pytest.raises(ValueError):
        residual_table(true, simulated[:1])


def test_window_sums_by_hand() -> None:
    values = np.arange(1.0, 6.0)[:, None] * np.array([[1.0, 10.0]])  # rows 1..5
    np.testing.assert_array_equal(_window_sums(values, 0), values)
    by_hand = np.array([[1 + 2], [1 + 2 + 3], [2 + 3 + 4], [3 + 4 + 5], [4 + 5]], float)
    np.testing.assert_array_equal(_window_sums(values, 1), by_hand * [[1.0, 10.0]])
    np.testing.assert_array_equal(_window_sums(values, 9), np.full((5, 2), [15.0, 150.0]))


def test_bands_of_residuals_with_missing_and_infinite_values_warn_nothing() -> None:
    residuals = np.array([[[0.0], [1.0], [np.inf]], [[0.0], [-1.0], [np.nan]]] * 6)
    scale = np.array([[1.0], [0.0], [1.0]])  # a zero scale: 0 / 0 and 1 / 0
    bands = Bands.learn(residuals, scale, 0.5)
    lower, upper = bands.bounds(np.array([[1.0], [2.0], [3.0], [4.0]]), 0.0)
    assert lower.shape == upper.shape == (4, 1) and lower[0, 0] == upper[0, 0] == 1.0
