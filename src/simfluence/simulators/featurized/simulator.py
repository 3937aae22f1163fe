"""`featurized`: effects computed from the features of the training examples, with
coefficients per test example (the math: `simfluence.simulators.featurized`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simfluence.runlog.runs import RunSet
from simfluence.simulators.featurized.basis import NormalEquations
from simfluence.simulators.featurized.growth import _ExtendableEffects
from simfluence.simulators.featurized.multistep import fit_observed
from simfluence.simulators.featurized.selection import (
    COMPONENT_GRID,
    FEATURE_L2_GRID,
    choose_feature_model,
)


class FeaturizedSimulator(_ExtendableEffects):
    """Featurized Simfluence: ``A``, ``B`` from the features of the training examples, with
    coefficients per test example (see the module docstring).

    Parameters:
        n_components: ``k``, principal directions of the training features kept (fewer if the
            features have fewer); None (default): chosen with ``l2`` by run-wise
            cross-validation among `component_grid`.
        time_varying: effects drift linearly over training (``u'``, ``v'``); False: static.
        l2: ridge strength of the coefficients toward "no effect"; None chooses it from
            `l2_grid` by cross-validation over whole training runs (rollout all-steps MSE).
        cv_folds, patience: as for `LinearSimulator`.
        unseen, batch_weighting: as for every `DynamicsSimulator`; every example of the pool
            has features, so nothing in the pool is unseen.

    Learned attributes: ``A_``, ``B_``, ``A_slope_``, ``B_slope_`` (M, P; slopes None when
    static), ``seen_`` (all True), ``l2_`` (= ``feature_l2_``), ``cv_mse_``, and those listed in
    `_FeatureEffects`.

    From sparsely scored runs the coefficients are fitted to the observed losses by their
    multi-step predictions (`fit_observed`, `simulators.featurized.multistep`), with the ``k``
    and ``l2`` chosen on the interpolated losses.
    """

    name = "featurized"

    def __init__(
        self,
        n_components: int | None = None,
        component_grid: Sequence[int] = COMPONENT_GRID,
        time_varying: bool = True,
        l2: float | None = None,
        l2_grid: Sequence[float] = FEATURE_L2_GRID,
        cv_folds: int = 4,
        patience: int = 2,
        unseen: str = "error",
        batch_weighting: str = "mean",
    ) -> None:
        super().__init__(unseen=unseen, batch_weighting=batch_weighting)
        self.n_components = n_components
        self.component_grid = list(component_grid)
        self.time_varying = time_varying
        self.l2 = l2
        self.l2_grid = list(l2_grid)
        self.cv_folds = cv_folds
        self.patience = patience

    def _calibration_params(self) -> dict[str, Any]:
        # the copies fitted in calibration keep the k and l2 chosen here
        return {**super()._calibration_params(), "n_components": self.n_components_, "l2": self.l2_}

    def fit_observed(self, runs: RunSet) -> int:
        """Refit the coefficients to the observed losses of sparsely scored `runs` (after the
        fit on their interpolation; `simulators.gaps`); returns the Gauss-Newton iterations."""
        return fit_observed(self, runs)

    def _fit_parameters(self, runs: RunSet) -> None:
        phi = self._prepare_features(runs)
        k, lam, self.cv_mse_ = choose_feature_model(self, runs, phi, self.l2, self.l2_grid)
        phi = self._keep_components(k)
        self.l2_ = self.feature_l2_ = lam
        self.feature_cv_mse_ = self.cv_mse_
        design = self.design(runs)
        equations = NormalEquations.of(
            design, self._regressors(design, phi), 1.0 / self.batch_size_
        )
        self.coef_A_, self.coef_B_ = equations.solve(lam)
        self._set_effects(self._effects(self.coef_A_, self.coef_B_, phi))
        self._fit_test_map()
