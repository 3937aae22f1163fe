"""Fitting simulators from sparsely scored runs (``record --score-every`` / ``--score-fraction``).

A sparse run knows its losses only where its ``observed`` mask is True (NaN elsewhere); step 0
is always observed, and a recording scores the last step in full. Teacher forcing needs the
loss before and after every step, so the missing ones are imputed, and the imputation is
alternated with the simulator's own closed-form fit (`fit_with_gaps`):

1. fill every gap by linear interpolation between the observations around it (per test
   example), fit;
2. re-impute every gap by **the fitted model's own rollout, pinned to the observations**: the
   free-running rollout ``S`` of the run, plus the linear interpolation of its errors
   ``L - S`` at the observed steps (a bridge: the imputed path goes through every observation
   and between them follows the shape, spikes included, that the model predicts for the
   batches consumed there), fit again; repeat until the imputed losses settle: their
   root-mean-square change in a round at most `IMPUTATION_TOL` of the spread of the observed
   losses, at most `IMPUTATION_ROUNDS` rounds, or a change larger than the round before (then
   the previous imputation is kept: near its fixed point the alternation can drift off
   again). The ridge strength chosen by the first fit's cross-validation stays fixed during
   these rounds (a round is one solve, not a cross-validation), and is chosen again by
   cross-validation in one last fit on the settled imputation.

The alternation is an EM-like fixed-point iteration, and it converges slowly (about 0.7 per
round on digits-mlp at ``--score-every 10``: with 90% of the losses missing, each round moves
the imputation a little toward the model): three rounds left held-out all-steps MSE at 0.050,
against 0.0385 once converged after about 15 (the fully scored fit: 0.0123). Over-relaxing the
rounds (twice the step) got there in half the rounds but then diverged.

For the additive part this is exact in the limit: with the rollout's error over a gap of ``k``
steps spread evenly over them, the per-step normal equations of the additive model at the fixed
point are ``sum_g S_g^T e_g / k = 0`` (``S_g`` the batch counts summed over gap ``g``, ``e_g``
its error), the normal equations of the multi-step regression
``L_{t+k} - L_t = sum of B over the batches in between`` (weighted by ``1/k``). The
multiplicative part has no such closed form; the alternation is its EM-like counterpart.
Fully observed runs never come here: their fits are what they always were, bit for bit.

Cross-validation inside a fit scores its held-out folds on the recorded losses only
(`Run.recorded_losses`), never on imputed ones (which the model itself produced).

Every simulator fits this way (`Simulator.fit` sends incomplete run sets here); the baselines
need no rounds (`Simulator.gap_rounds`): ``persistence`` reads step 0 only, and ``mean`` is the
mean of the interpolated trajectories. A simulator whose ``fit_observed(runs)`` returns a
number (`Simulator.fit_observed`; the default returns None) is instead fitted to the observed
losses directly, from its fit on the interpolation (``featurized``: Gauss-Newton on its
multi-step predictions, `simulators.featurized.multistep`; ``gap_rounds_`` then counts its
iterations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from simfluence.runlog.runs import Run, RunSet

if TYPE_CHECKING:
    from simfluence.simulators.base import Simulator

#: re-imputations by the fitted model after the first fit on interpolated gaps, at most
IMPUTATION_ROUNDS = 30
#: the rounds stop once the imputed losses moved (root mean square) by at most this share of
#: the spread (standard deviation) of the observed losses in a round, or by more than in the
#: round before (the alternation can drift away again once near its fixed point)
IMPUTATION_TOL = 2.5e-3


def _fill(observed: np.ndarray, values: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    """``base`` (zeros when None) plus the per-column linear interpolation over the steps of
    ``values - base`` at its observed steps; observed entries are kept exactly."""
    steps = np.arange(values.shape[0])
    offset = values if base is None else values - base
    out = np.empty_like(values)
    for col in range(values.shape[1]):
        seen = observed[:, col]
        out[:, col] = np.interp(steps, steps[seen], offset[seen, col])
    if base is not None:
        out += base
    return np.where(observed, values, out)


def _with_losses(runs: RunSet, losses: list[np.ndarray]) -> RunSet:
    filled = [
        Run(r.run_id, r.curriculum, values, r.seed, r.lr, r.metadata, imputed=~r.mask)
        for r, values in zip(runs.runs, losses, strict=True)
    ]
    return RunSet(runs.train_ids, runs.test_ids, filled, runs.metadata, runs.source, runs.features)


def interpolate(runs: RunSet) -> RunSet:
    """The runs with every missing loss linearly interpolated between the observed steps
    around it (held constant after the last one); complete runs."""
    return _with_losses(runs, [_fill(r.mask, r.losses, None) for r in runs.runs])


def bridge(runs: RunSet, simulated: list[np.ndarray]) -> RunSet:
    """The runs with every missing loss replaced by the rollout `simulated` of the run plus
    the linear interpolation of the rollout's errors at the observed steps; complete runs."""
    with np.errstate(invalid="ignore", over="ignore"):
        filled = [_fill(r.mask, r.losses, s) for r, s in zip(runs.runs, simulated, strict=True)]
    # a diverging rollout gives no usable shape: fall back to interpolation there
    plain = interpolate(runs)
    return _with_losses(
        runs,
        [np.where(np.isfinite(f), f, p.losses) for f, p in zip(filled, plain.runs, strict=True)],
    )


def fit_with_gaps(simulator: Simulator, runs: RunSet) -> RunSet:
    """Fit `simulator` on sparsely scored `runs` by imputation alternated with its fit (module
    docstring); returns the last imputed (complete) run set the fit used."""
    filled = interpolate(runs)
    simulator._fit_complete(filled)
    simulator._set_floor(runs)  # rollouts floored at the observed losses' floor, as reported
    iterations = simulator.fit_observed(runs)  # fitted to the observations, from this start
    if iterations is not None:
        simulator.gap_rounds_ = iterations
        return filled
    rounds = simulator.gap_rounds
    if not rounds:
        return filled
    curricula = [r.curriculum for r in runs.runs]
    initial = np.stack([r.initial_loss for r in runs.runs])
    scale = float(np.nanstd(np.concatenate([r.recorded_losses.ravel() for r in runs.runs])))
    # the ridge strength the first cross-validation chose, fixed while the imputation settles
    chosen = getattr(simulator, "l2_", None)
    fixed = "l2" in simulator.get_params() and chosen is not None and simulator.l2 is None
    if fixed:
        simulator.l2 = chosen
    simulator.gap_rounds_ = 0
    last = np.inf
    try:
        for _ in range(rounds):
            previous = filled
            filled = bridge(runs, simulator.simulate_many(curricula, initial))
            simulator._fit_complete(filled)
            simulator._set_floor(runs)
            simulator.gap_rounds_ += 1
            pairs = zip(filled.runs, previous.runs, strict=True)
            squares = [(a.losses - b.losses) ** 2 for a, b in pairs]
            change = float(np.sqrt(sum(q.sum() for q in squares) / sum(q.size for q in squares)))
            if change > last:  # moving away again: keep the previous imputation
                filled = previous
                break
            last = change
            if change <= IMPUTATION_TOL * max(scale, np.finfo(float).tiny):
                break
    finally:
        if fixed:
            simulator.l2 = None
    if fixed or change > last:
        simulator._fit_complete(filled)  # cross-validation again, on the settled imputation
    return filled


def observed_share(runs: RunSet) -> float:
    """Share of the losses of steps ``1..T`` that were observed."""
    seen = sum(int(r.mask[1:].sum()) for r in runs.runs)
    total = sum(r.mask[1:].size for r in runs.runs)
    return seen / total if total else 1.0
