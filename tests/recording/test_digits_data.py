"""The digits workloads read scikit-learn's bundled digits without importing scikit-learn."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from simfluence.recording.workloads import digits_mlp
from simfluence.recording.workloads.digits_mlp import load_digits_arrays


def test_the_arrays_are_load_digits_own() -> None:
    from sklearn.datasets import load_digits

    data, target = load_digits(return_X_y=True)
    x, y = load_digits_arrays()
    assert x.shape == (1797, 64) and x.dtype == np.float64 and y.dtype == np.int64
    np.testing.assert_array_equal(x, data)
    np.testing.assert_array_equal(y, target)


def test_preparing_the_task_does_not_import_scikit_learn() -> None:
    code = (
        "import sys\n"
        "from simfluence.recording.workloads.digits_mlp import DigitsMLPTask\n"
        "pool, tests = DigitsMLPTask().prepare(200, 50, 0)\n"
        "assert len(pool.ids) == 200 and len(tests.ids) == 50\n"
        "print('sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_another_scikit_learn_layout_falls_back_to_load_digits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(digits_mlp, "DIGITS_FILE", "no-such-file.csv.gz")
    x, y = load_digits_arrays()
    assert x.shape == (1797, 64) and y[:10].tolist() == list(range(10))
