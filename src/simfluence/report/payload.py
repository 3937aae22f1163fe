"""The data the report's trajectory viewer gets: gathered from an evaluation, JSON-able."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from simfluence.colors import method_colors
from simfluence.evaluation import EvaluationResult
from simfluence.runlog.runs import RunSet

#: estimated JSON bytes per embedded number (5 significant digits, comma)
_BYTES_PER_NUMBER = 10


def _sig(values: np.ndarray) -> list[float | None]:
    """Floats rounded to 5 significant digits; non-finite values become None (JSON null)."""
    return [
        float(f"{v:.5g}") if math.isfinite(v) else None
        for v in np.asarray(values, dtype=np.float64).ravel().tolist()
    ]


def _movement(losses: np.ndarray) -> np.ndarray:
    """Total variation of each column of a ``(T + 1, M)`` loss array."""
    return np.abs(np.diff(losses, axis=0)).sum(axis=0)


def build_payload(
    runs: RunSet,
    evaluation: EvaluationResult,
    max_bytes: int = 10_000_000,
    max_tests: int = 20,
) -> dict[str, Any]:
    """The data the trajectory viewer needs, JSON-able.

    Returns ``{"test_ids", "methods", "colors", "runs": [{"id", "tests", "movement",
    "recorded", "simulated": {method: [...]}, "bands": {method: {"lower": [...], "upper":
    [...]}}}], "trimmed", "max_tests"}`` where ``tests`` are column indices into ``test_ids``
    (most moving first), ``recorded[k]`` / ``simulated[m][k]`` the trajectories (length
    ``T + 1``) of test ``tests[k]``, and ``bands`` the 90% intervals of the methods that have
    them.
    """
    names = list(evaluation.methods)
    banded = [n for n in names if evaluation.methods[n].intervals is not None]
    held = [runs.run(r) for r in evaluation.heldout_runs]
    n_numbers = sum(run.losses.size for run in held) * (1 + len(names) + 2 * len(banded))
    trimmed = n_numbers * _BYTES_PER_NUMBER > max_bytes and len(runs.test_ids) > max_tests
    out_runs = []
    for k, run in enumerate(held):
        movement = _movement(run.losses)
        order = np.argsort(-movement, kind="stable")
        columns = order[:max_tests] if trimmed else order
        out_runs.append(
            {
                "id": run.run_id,
                "steps": run.n_steps,
                "tests": [int(j) for j in columns],
                "movement": _sig(movement[columns]),
                "recorded": [_sig(run.losses[:, j]) for j in columns],
                "simulated": {
                    name: [_sig(evaluation.methods[name].simulated[k][:, j]) for j in columns]
                    for name in names
                },
                "bands": {name: _band(evaluation, name, k, columns) for name in banded},
            }
        )
    return {
        "test_ids": list(runs.test_ids),
        "methods": names,
        "colors": method_colors(names),
        "runs": out_runs,
        "trimmed": bool(trimmed),
        "max_tests": max_tests,
    }


def _band(
    evaluation: EvaluationResult, name: str, run: int, columns: np.ndarray
) -> dict[str, list[list[float | None]]]:
    band = (evaluation.methods[name].intervals or [])[run]
    return {
        "lower": [_sig(band.lower[:, j]) for j in columns],
        "upper": [_sig(band.upper[:, j]) for j in columns],
    }
