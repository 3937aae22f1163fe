"""`hybrid`: Simfluence-Linear shrunk toward the featurized effects instead of toward "no effect".

By composition: the ridge regression is `LinearSimulator`'s (`LinearSimulator.fit_toward`), given
the featurized effects as its prior (`FeaturePrior`, an argument, refitted on each
cross-validation fold's training runs); the hybrid itself is a featurized simulator
(`_ExtendableEffects`) whose ``A_``, ``B_`` are the ridge regression's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.featurized.basis import NormalEquations
from simfluence.simulators.featurized.effects import _FeatureEffects
from simfluence.simulators.featurized.growth import _ExtendableEffects
from simfluence.simulators.featurized.selection import (
    COMPONENT_GRID,
    FEATURE_L2_GRID,
    choose_feature_model,
)
from simfluence.simulators.linear import LinearSimulator, Params, RidgeOffset
from simfluence.simulators.memory import MemoryInputs, MemoryKernel, candidates, spec_of
from simfluence.simulators.ridge import Design

#: the decays ``memory="auto"`` tries in `hybrid` besides the recorded optimizer's own (each
#: candidate kernel is a whole fit: fewer than `linear`'s `memory.AUTO_DECAYS`)
HYBRID_AUTO_DECAYS: tuple[float, ...] = (0.0, 0.8)


def _auto_decays(runs: RunSet) -> set[float]:
    from simfluence.simulators.memory import optimizer_decay

    return {*HYBRID_AUTO_DECAYS, optimizer_decay(runs) or 0.0}


#: ridge strengths tried for the hybrid's pull toward the featurized effects (descending)
HYBRID_L2_GRID: tuple[float, ...] = (1e4, 1e3, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1)


def _prediction(
    design: Design, regressors: np.ndarray, coef: Params, batch_size: float
) -> np.ndarray:
    """Teacher-forced predictions ``(n, M)`` of ``L_next`` under coefficients ``coef``."""
    coef_A, coef_B = coef
    mass = np.asarray(design.counts.sum(axis=1))
    if design.rest is not None:  # the neutral rest of a memory kernel
        mass = mass + design.rest[:, None]
    alpha = mass / batch_size + regressors @ coef_A.T
    return alpha * design.prev + regressors @ coef_B.T


@dataclass
class FeaturePrior:
    """The featurized effects of a fitted `simulator` (its ``k`` directions ``phi``, ridge
    strength ``feature_l2_`` and coefficients on all runs), as the prior of the hybrid's ridge
    regression (`simfluence.simulators.linear.RidgePrior`)."""

    simulator: _FeatureEffects
    phi: np.ndarray

    def offset(self, design: Design, final: bool) -> RidgeOffset:
        """The featurized effects fitted on `design` (the coefficients on all runs when
        `final`), their drift, and their teacher-forced predictions on `design`."""
        sim = self.simulator
        regressors = sim._regressors(design, self.phi)
        coef = (sim.coef_A_, sim.coef_B_)
        if not final:  # a cross-validation fold: the prior too is fitted on the fold's runs only
            equations = NormalEquations.of(design, regressors, 1.0 / sim.batch_size_)
            coef = equations.solve(sim.feature_l2_)
        A0, B0, A1, B1 = sim._effects(*coef, self.phi)
        prediction = _prediction(design, regressors, coef, sim.batch_size_)
        slopes = None if B1 is None else (A1, B1)
        return RidgeOffset(prediction, A0, B0, slopes, sim.time_scale_)


class HybridSimulator(MemoryInputs, _ExtendableEffects):
    """Simfluence-Linear shrunk toward the featurized effects instead of toward "no effect".

    Each (training example, test example) pair keeps its own departure from the featurized
    prediction, fitted by the ridge regression of `LinearSimulator` whose prior is the
    `featurized` model (an empirical-Bayes prior; its drift over training, if any, is kept):
    an example consumed in many runs gets its own detail; a rarely seen one stays near what its
    features say; one no run consumed (or a new one, via `extend`) gets exactly the featurized
    effects.

    Parameters:
        l2: strength of the pull toward the featurized effects (None: run-wise CV over
            `l2_grid`, which reaches further up than `linear`'s: a good prior earns a strong
            pull).
        n_components, component_grid, time_varying, feature_l2, feature_l2_grid: the
            featurized prior's
            (`feature_l2` None: chosen by run-wise CV first, then held fixed while `l2` is
            chosen; within each fold the prior is refitted on that fold's training runs).
        memory: optimizer memory (`simulators.memory`), as `LinearSimulator`'s: the kernel is
            applied to the count matrices that both the featurized prior and the ridge
            regression see (and to every curriculum simulated). ``"none"`` (default) is the
            hybrid without memory; ``"auto"`` chooses among `HYBRID_AUTO_DECAYS` (each also
            scaled by the recorded learning rates when they vary) by the ridge's run-wise CV:
            every candidate kernel is a whole hybrid fit, so the list is short.

    Learned attributes: those of `LinearSimulator` and of `_FeatureEffects`; ``A_slope_``,
    ``B_slope_`` are the prior's drift; ``memory_``, ``memory_scale_``, ``memory_cv_``
    (``[decay, lr_scale, l2, mse]`` at each kernel's chosen ``l2``, or None for one kernel).
    """

    name = "hybrid"

    def __init__(
        self,
        l2: float | None = None,
        l2_grid: Sequence[float] = HYBRID_L2_GRID,
        n_components: int | None = None,
        component_grid: Sequence[int] = COMPONENT_GRID,
        time_varying: bool = True,
        feature_l2: float | None = None,
        feature_l2_grid: Sequence[float] = FEATURE_L2_GRID,
        cv_folds: int = 4,
        patience: int = 2,
        unseen: str = "error",
        batch_weighting: str = "mean",
        tol: float = 1e-8,
        cv_tol: float = 1e-4,
        max_iter: int = 1000,
        memory: str | float = "none",
    ) -> None:
        super().__init__(unseen=unseen, batch_weighting=batch_weighting)
        self.memory = memory
        self.l2 = l2
        self.l2_grid = list(l2_grid)
        self.n_components = n_components
        self.component_grid = list(component_grid)
        self.time_varying = time_varying
        self.feature_l2 = feature_l2
        self.feature_l2_grid = list(feature_l2_grid)
        self.cv_folds = cv_folds
        self.patience = patience
        self.tol = tol
        self.cv_tol = cv_tol
        self.max_iter = max_iter

    def _calibration_params(self) -> dict[str, Any]:
        # the copies fitted in calibration keep k and both ridge strengths chosen here
        return {
            **super()._calibration_params(),
            "l2": self.l2_,
            "n_components": self.n_components_,
            "feature_l2": self.feature_l2_,
        }

    def _ridge(self) -> LinearSimulator:
        """The ridge regression toward the prior: Simfluence-Linear with this simulator's
        ridge parameters (and its name, in the messages of its checks). It only fits: it never
        encodes a curriculum, so it has no use for the hybrid's ``unseen`` policy."""
        ridge = LinearSimulator(
            l2=self.l2,
            l2_grid=self.l2_grid,
            cv_folds=self.cv_folds,
            patience=self.patience,
            batch_weighting=self.batch_weighting,
            tol=self.tol,
            cv_tol=self.cv_tol,
            max_iter=self.max_iter,
            memory=spec_of(self.memory_kernel()),
        )
        ridge.name = self.name
        ridge._set_kernel(self.memory_kernel())  # the kernel of all runs, not of a fold's
        return ridge

    def _fit_parameters(self, runs: RunSet) -> None:
        self.memory_ = self.memory_scale_ = self.memory_cv_ = None
        kernels = candidates(self.memory, runs, self.batch_weighting)
        if self.memory == "auto":
            kernels = [k for k in kernels if float(k.decay) in _auto_decays(runs)]
        if len(kernels) == 1:
            self._fit_kernel(runs, kernels[0])
            return
        if len(runs.runs) < 2:
            raise SimfluenceError(
                f"memory={self.memory!r}: choosing the kernel by cross-validation needs at "
                f"least 2 training runs (got {len(runs.runs)})"
            )
        # every kernel is a whole fit (its own prior and l2); the best CV error wins, ties
        # keeping the earlier (simpler) kernel
        best: tuple[float, int] | None = None
        table: list[list[float]] = []
        states = []
        for k, kernel in enumerate(kernels):
            self._fit_kernel(runs, kernel)
            finite = [mse for _, mse in (self.cv_mse_ or []) if np.isfinite(mse)]
            score = min(finite) if finite else np.inf
            table.append([float(kernel.decay), float(kernel.scale is not None), self.l2_, score])
            states.append(dict(vars(self)))
            if np.isfinite(score) and (best is None or score < best[0]):
                best = (score, k)
        chosen = 0 if best is None else best[1]
        vars(self).update(states[chosen])
        self.memory_cv_ = table

    def _fit_kernel(self, runs: RunSet, kernel: MemoryKernel) -> None:
        """The whole hybrid fit with one memory kernel applied to every count matrix."""
        self._set_kernel(kernel)
        phi = self._prepare_features(runs)
        k, self.feature_l2_, self.feature_cv_mse_ = choose_feature_model(
            self, runs, phi, self.feature_l2, self.feature_l2_grid
        )
        phi = self._keep_components(k)
        design = self.design(runs)
        equations = NormalEquations.of(
            design, self._regressors(design, phi), 1.0 / self.batch_size_
        )
        self.coef_A_, self.coef_B_ = equations.solve(self.feature_l2_)
        self._fit_test_map()
        # l2 by CV toward the featurized prior (refitted per fold), then the final fit
        ridge = self._ridge()
        offset = ridge.fit_toward(
            runs, FeaturePrior(self, phi), self.batch_size_, (self.floor_, self.floor_width_)
        )
        self.A_, self.B_ = ridge.A_, ridge.B_
        self.l2_, self.cv_mse_ = ridge.l2_, ridge.cv_mse_
        self.cg_iterations_, self.cg_residual_ = ridge.cg_iterations_, ridge.cg_residual_
        self.A_slope_, self.B_slope_ = (None, None) if offset.slopes is None else offset.slopes
