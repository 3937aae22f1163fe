"""The featurized effects fitted to sparsely scored runs by their multi-step predictions.

A featurized simulator has few coefficients per test example (``2J``, `effects`), so from runs
scored sparsely (``record --score-every`` / ``--score-fraction``) it can be fitted to the
observed losses themselves instead of to imputed ones (`simulators.gaps`). Per test example
``m`` it minimizes

    sum over runs, and over the observed steps t >= 1, of (L_t - S_t)^2  +  l2 |[u_m, v_m]|^2

where ``S`` is the model's rollout restarted at every observed loss: ``S_s = L_s`` at the last
observed step ``s`` before ``t``, then ``S_{k+1} = alpha_k S_k + beta_k`` with
``alpha_k = mass_k / b + G_k . u_m`` and ``beta_k = G_k . v_m`` (``G_k``: the step's ``J``
regressors, `_FeatureEffects._regressors`). With every step observed this is exactly the
teacher-forced ridge regression the featurized fit solves in closed form. Across a gap ``S_t``
is a polynomial in the coefficients; Gauss-Newton solves it from the fit on interpolated
losses: the rollout's derivatives (forward sensitivities)

    dS_{k+1} = alpha_k dS_k + [S_k G_k, G_k],        dS = 0 where S was reset to an observation,

give each test example the ``2J x 2J`` normal equations of the linearized problem. Test examples
are independent problems: a step that raises one's objective is halved for that one only.

The number of feature directions ``k`` and the ridge strength ``l2`` stay those that the
cross-validation of the fit on the interpolated losses chose (`selection.choose_feature_model`).
Choosing them again by cross-validation of this fit (each fold fitted by Gauss-Newton) cost 10
to 60 times as much and was no better overall: on newsgroups-minilm scored every 10 steps it gave
0.0723 instead of 0.0754, every 5 steps 0.0643 instead of 0.0627.

Measured on newsgroups-minilm's default recording (30 runs of 50 steps, the last 5 held out and
scored in full; `benchmarks/results/sparse-newsgroups-minilm.json`), held-out all-steps MSE of
``featurized``: scored every 10 steps 0.0754 (imputation alternated with the fit: 0.0852), every
5 steps 0.0627 (0.0703); fully scored: 0.0582.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from simfluence.runlog.runs import RunSet

if TYPE_CHECKING:
    from simfluence.simulators.featurized.effects import _FeatureEffects

#: Gauss-Newton iterations at most
MAX_ITERATIONS = 20
#: the iterations stop once the total objective fell by less than this share in one
TOLERANCE = 1e-5
#: times a step that raises a test example's objective is halved before it is dropped
HALVINGS = 4


@dataclass
class ObservedRuns:
    """The runs as the multi-step fit reads them, padded to the longest (padding unobserved).

    Attributes:
        regressors: ``(R, T, J)`` per step; mass: ``(R, T)`` the batch mass of each step.
        losses: ``(R, T + 1, M)``, NaN where not observed; observed: same shape, bool.
    """

    regressors: np.ndarray
    mass: np.ndarray
    losses: np.ndarray
    observed: np.ndarray

    @classmethod
    def of(cls, simulator: _FeatureEffects, runs: RunSet, phi: np.ndarray) -> ObservedRuns:
        design = simulator.design(runs)  # every run's steps stacked, batch-weighted
        regressors = simulator._regressors(design, phi)
        row_mass = np.asarray(design.counts.sum(axis=1)).ravel()
        n_steps = max(run.n_steps for run in runs.runs)
        R, J, M = len(runs.runs), regressors.shape[1], len(runs.test_ids)
        G, mass = np.zeros((R, n_steps, J)), np.zeros((R, n_steps))
        losses = np.full((R, n_steps + 1, M), np.nan)
        observed = np.zeros((R, n_steps + 1, M), dtype=bool)
        row = 0
        for r, run in enumerate(runs.runs):
            T = run.n_steps
            G[r, :T] = regressors[row : row + T]
            mass[r, :T] = row_mass[row : row + T]
            losses[r, : T + 1] = run.losses
            observed[r, : T + 1] = run.mask
            row += T
        return cls(G, mass, losses, observed)


def _normal_equations(
    data: ObservedRuns, coef: np.ndarray, inv_batch: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At coefficients ``coef`` ``(M, 2J)`` (``[u, v]``): the Gauss-Newton matrices ``H``
    ``(M, 2J, 2J)``, the gradients ``g = sum dS e`` ``(M, 2J)`` (``e = L - S``) and the
    squared errors ``(M,)`` of the restarted rollouts at the observed steps."""
    R, n_steps, J = data.regressors.shape
    M = coef.shape[0]
    U, V = coef[:, :J], coef[:, J:]
    S = data.losses[:, 0].copy()
    dS = np.zeros((R, M, 2 * J))
    H, g, sse = np.zeros((M, 2 * J, 2 * J)), np.zeros((M, 2 * J)), np.zeros(M)
    for t in range(n_steps):
        Gt = data.regressors[:, t]
        alpha = data.mass[:, t, None] * inv_batch + Gt @ U.T  # (R, M)
        dS *= alpha[:, :, None]
        dS[:, :, :J] += S[:, :, None] * Gt[:, None, :]
        dS[:, :, J:] += Gt[:, None, :]
        S = alpha * S + Gt @ V.T
        seen = data.observed[:, t + 1]
        if not seen.any():
            continue
        error = np.where(seen, data.losses[:, t + 1] - S, 0.0)
        sse += (error**2).sum(axis=0)
        D = np.transpose(dS * seen[:, :, None], (1, 2, 0))  # (M, 2J, R)
        H += D @ np.transpose(D, (0, 2, 1))
        g += np.einsum("mjr,rm->mj", D, error)
        S = np.where(seen, data.losses[:, t + 1], S)
        dS[seen] = 0.0
    return H, g, sse


Terms = tuple[np.ndarray, np.ndarray, np.ndarray]


def gauss_newton(
    data: ObservedRuns, start: np.ndarray, lam: float, inv_batch: float
) -> tuple[np.ndarray, int]:
    """The coefficients ``(M, 2J)`` minimizing the module's objective at ridge strength `lam`,
    by Gauss-Newton from `start`; and the iterations taken."""
    eye = np.eye(start.shape[1])

    def objective(c: np.ndarray) -> Terms:
        H, g, sse = _normal_equations(data, c, inv_batch)
        return H, g, sse + lam * (c**2).sum(axis=1)

    iterations = 0
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging rollout: handled below
        coef, terms = start, objective(start)
        while iterations < MAX_ITERATIONS:
            iterations += 1
            H, g, value = terms
            step = np.linalg.solve(H + lam * eye, (g - lam * coef)[:, :, None])[:, :, 0]
            coef, terms = _damped_step(objective, coef, step, value)
            # test examples whose rollout diverges keep their coefficients (`_damped_step`)
            # and do not hold the others' convergence up
            finite = np.isfinite(value)
            total = value[finite].sum()
            if not finite.any() or total - terms[2][finite].sum() <= TOLERANCE * total:
                break
    return coef, iterations


def _damped_step(
    objective: Callable[[np.ndarray], Terms], coef: np.ndarray, step: np.ndarray, value: np.ndarray
) -> tuple[np.ndarray, Terms]:
    """``coef + s step`` and its terms, ``s`` per test example: 1, halved while its objective
    would rise above `value` (NaN, a diverging rollout, counts as a rise), 0 after `HALVINGS`
    halvings."""
    scale = np.ones(len(coef))
    for _ in range(HALVINGS + 1):
        trial = coef + scale[:, None] * step
        terms = objective(trial)
        worse = ~(terms[2] <= value)
        if not worse.any():
            return trial, terms
        scale[worse] *= 0.5
    keep = worse[:, None]  # those test examples keep their coefficients (a NaN step too)
    trial = np.where(keep, coef, coef + scale[:, None] * step)
    return trial, objective(trial)


def fit_observed(simulator: _FeatureEffects, runs: RunSet) -> int:
    """Refit `simulator`'s coefficients (fitted on the interpolated losses: the start) to the
    observed losses of sparsely scored `runs` (module docstring), with the ``k`` and ``l2`` it
    chose, and set its effects and test map from them. Returns the Gauss-Newton iterations."""
    phi = simulator.features_
    coef, iterations = gauss_newton(
        ObservedRuns.of(simulator, runs, phi),
        np.hstack([simulator.coef_A_, simulator.coef_B_]),
        float(simulator.feature_l2_),
        1.0 / simulator.batch_size_,
    )
    J = coef.shape[1] // 2
    simulator.coef_A_, simulator.coef_B_ = coef[:, :J], coef[:, J:]
    simulator._set_effects(simulator._effects(simulator.coef_A_, simulator.coef_B_, phi))
    simulator._fit_test_map()
    return iterations


__all__ = [
    "HALVINGS",
    "MAX_ITERATIONS",
    "TOLERANCE",
    "ObservedRuns",
    "fit_observed",
    "gauss_newton",
]
