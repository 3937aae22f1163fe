"""Model selection of the featurized effects: the number of feature directions and the
coefficients' ridge strength, by run-wise cross-validation of free-running rollouts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.featurized.basis import NormalEquations
from simfluence.simulators.featurized.effects import _FeatureEffects
from simfluence.simulators.intervals import run_folds

#: numbers of principal directions of the features tried by cross-validation
COMPONENT_GRID: tuple[int, ...] = (8, 32, 64)
#: ridge strengths tried for the per-test-example feature coefficients (descending)
FEATURE_L2_GRID: tuple[float, ...] = (1e4, 3e3, 1e3, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0)


def choose_feature_model(
    simulator: _FeatureEffects,
    runs: RunSet,
    phi: np.ndarray,
    given: float | None,
    grid: Sequence[float],
) -> tuple[int, float, list[list[float]] | None]:
    """The number of directions ``k`` and the coefficients' ridge strength: given, or the best
    pair by run-wise cross-validation of free-running rollouts (all-steps MSE). For each
    candidate ``k`` the `grid` is walked from strong to weak and left after `simulator.patience`
    rises past its minimum.

    The normal equations are sums over steps, so each fold's are the total minus the held-out
    fold's, and the bases are nested, so a smaller ``k`` is a sub-block: one pass over the data
    serves every fold and every ``k``. Returns ``(k, l2, [[k, l2, mse], ...] or None)``.
    """
    ks = [min(k, phi.shape[1] - 1) for k in simulator._component_grid()]
    ks = sorted(set(ks))
    if given is not None and given <= 0:
        raise SimfluenceError(f"{simulator.name}: l2 must be positive, got {given}")
    lams = [float(given)] if given is not None else sorted((float(v) for v in grid), reverse=True)
    if not lams or lams[-1] <= 0:
        raise SimfluenceError(f"{simulator.name}: l2 values must be positive, got {lams}")
    if len(ks) == 1 and len(lams) == 1:
        return ks[0], lams[0], None
    if len(runs.runs) < 2:
        raise SimfluenceError(
            f"{simulator.name}: cross-validation needs at least 2 training runs (got "
            f"{len(runs.runs)}); pass l2 and n_components explicitly"
        )
    if simulator.cv_folds < 2:
        raise SimfluenceError(f"{simulator.name}: cv_folds must be at least 2")
    prior_a = 1.0 / simulator.batch_size_
    folds = run_folds(runs, min(simulator.cv_folds, len(runs.runs)))
    held = []
    for _, valid in folds:
        design = simulator.design(valid)
        held.append(NormalEquations.of(design, simulator._regressors(design, phi), prior_a))
    total = held[0]
    for part in held[1:]:
        total = total + part
    curve: list[list[float]] = []
    for k in ks:
        subset = simulator._regressor_subset(k, phi.shape[1])
        whole = total.restrict(subset)
        parts = [part.restrict(subset) for part in held]
        best, rises = np.inf, 0
        for lam in lams:
            errors = [
                simulator._rollout_mse(
                    valid, simulator._effects(*(whole - part).solve(lam), phi[:, : k + 1])
                )
                for part, (_, valid) in zip(parts, folds, strict=True)
            ]
            mse = float(np.mean(errors))
            curve.append([k, lam, mse])
            rises = 0 if mse < best else rises + 1
            best = min(best, mse)
            if rises >= simulator.patience:
                break
    finite = [(mse, k, lam) for k, lam, mse in curve if np.isfinite(mse)]
    _, k, lam = min(finite) if finite else (0.0, ks[-1], lams[0])
    return int(k), float(lam), curve
