"""The machinery shared by the featurized and hybrid simulators: the feature bases, the
regressors and effects of per-test-example coefficients, the drift over training, the test map
and the calibration of test examples that no run recorded (the math: `simfluence.simulators.
featurized`). Adding examples to a fitted simulator is `growth`'s."""

from __future__ import annotations

from typing import ClassVar, Self

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.metrics import all_steps_mse
from simfluence.runlog.features import ExampleFeatures
from simfluence.runlog.runs import RunSet
from simfluence.simulators import intervals
from simfluence.simulators.base import Simulator, soft_floor
from simfluence.simulators.dynamics import DynamicsSimulator
from simfluence.simulators.featurized.basis import Basis
from simfluence.simulators.featurized.test_map import (
    fit_test_map,
    leave_one_out_coefficients,
    map_directions,
)
from simfluence.simulators.intervals import run_folds
from simfluence.simulators.ridge import Design

#: ``(A, B, A', B')``: parameters and their drifts, each ``(M, P)`` (drifts None: static)
Effects = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


class FeatureMissingError(SimfluenceError):
    """A featurized simulator was asked to fit a run set without features."""


def _check_features(features: ExampleFeatures | None, runs: RunSet, who: str) -> ExampleFeatures:
    if features is None:
        raise FeatureMissingError(
            f"{who}: the run set has no example features; compute them with `simfluence "
            "features DIR` (from the run set's task) or `simfluence features DIR --from FILE`"
        )
    return features.check(len(runs.train_ids), len(runs.test_ids), f"{who}: features")


def _consumed(runs: RunSet) -> np.ndarray:
    """``(P,)`` bool: the pool examples that some run of `runs` consumed."""
    index = {train_id: k for k, train_id in enumerate(runs.train_ids)}
    out = np.zeros(len(runs.train_ids), dtype=bool)
    used = {i for run in runs.runs for batch in run.curriculum for i in batch}
    out[[index[i] for i in used if i in index]] = True
    return out


class _FeatureEffects(DynamicsSimulator):
    """Feature bases, per-test coefficients, the drift over training, the test map and the
    calibration of both simulators (new examples: `growth._ExtendableEffects`).

    Learned attributes (both simulators):
        features_: ``(P, K)``, ``phi`` of every training example (its projected features,
            first column ones); test_features_: ``(M, K')``, ``psi`` of every test example.
        basis_mean_, basis_scale_ (d,), basis_components_ (d, k): the training-side basis.
        test_basis_mean_, test_basis_scale_ (d',), test_basis_components_ (d', k'): the test
            side's basis, or None when ``d' = d`` (the training basis serves both).
        coef_A_, coef_B_: ``(M, J)`` per test example: ``[u, u']`` and ``[v, v']`` (``J =
            2K``), or ``u`` and ``v`` (``J = K``) without drift.
        time_scale_: ``T0``, the median length of the fitted runs (drift only).
        test_map_: ``(K', 2J)`` predicts ``[coef_A, coef_B]`` of a new test example from
            ``[1, psi]`` (the directions it does not use have zero rows); test_map_l2_,
            test_map_loo_: its strength and leave-one-out error relative to predicting the
            average test example (below 1: the features help; 1: every new test example is
            simulated as the average one).
        n_components_: ``k``, the directions kept.
        feature_l2_: the coefficients' ridge strength; feature_cv_mse_: ``[[k, l2, mse], ...]``
            of the cross-validation (None when both were given).
        consumed_: ``(P,)`` bool, the pool examples some fitted run consumed (``seen_`` is all
            True: every example has features and so effects). The curriculum search keeps to
            them by default (its trust region: `simfluence.counterfactual.search`).
        fold_coef_A_, fold_coef_B_ ``(K, M, J)``, fold_test_map_ ``(K, K', 2J)``: set by
            `calibrate` besides ``fold_A_``, ``fold_B_`` and their slopes: the fold copies'
            coefficients, so that `extend` extends the fold copies too (the intervals of
            attributions).

    Intervals (`calibrate`, `simulate_interval`) are those of every simulator; the copies
    fitted in calibration keep the chosen ``k`` and ridge strengths (no nested
    cross-validation). Test examples added by `extend` have no held-out residuals of their
    own: their intervals take the per-step scale ``new_test_scale_`` ``(T_max + 1,)``, measured
    in calibration on the recorded test examples simulated as if never recorded
    (`_new_test_scale`), and the interval of a mean over them is unbounded.
    """

    #: fitting needs ``runs.features`` (the demo and benchmarks compute them when missing)
    needs_features: ClassVar[bool] = True

    features_: np.ndarray
    test_features_: np.ndarray
    coef_A_: np.ndarray
    coef_B_: np.ndarray
    test_map_: np.ndarray
    time_varying: bool
    n_components: int | None
    component_grid: list[int]

    # the basis objects, rebuilt from saved arrays
    def _train_basis(self) -> Basis:
        return Basis(self.basis_mean_, self.basis_scale_, self.basis_components_)

    def _test_basis(self) -> Basis:
        if self.test_basis_mean_ is None:  # test features live in the training features' space
            return self._train_basis()
        return Basis(self.test_basis_mean_, self.test_basis_scale_, self.test_basis_components_)

    def _component_grid(self) -> list[int]:
        grid = [self.n_components] if self.n_components is not None else self.component_grid
        if not grid or min(grid) < 0:
            raise SimfluenceError(
                f"{self.name}: n_components must be >= 0 (got {grid}); None chooses it from "
                "component_grid by cross-validation"
            )
        return sorted({int(k) for k in grid})

    def _prepare_features(self, runs: RunSet) -> np.ndarray:
        """Set the bases (with as many directions as the largest candidate ``k``), ``features_``,
        ``test_features_``, ``time_scale_``; return ``phi``."""
        features = _check_features(runs.features, runs, self.name)
        train = Basis.fit(features.train, max(self._component_grid()))
        self.basis_mean_, self.basis_scale_, self.basis_components_ = (
            train.mean,
            train.scale,
            train.components,
        )
        self.test_basis_mean_ = self.test_basis_scale_ = self.test_basis_components_ = None
        test = train
        if features.test.shape[1] != features.train.shape[1]:
            test = Basis.fit(features.test, max(self._component_grid()))
            self.test_basis_mean_, self.test_basis_scale_, self.test_basis_components_ = (
                test.mean,
                test.scale,
                test.components,
            )
        self.features_ = train(features.train)
        self.test_features_ = test(features.test)
        if self.time_varying:
            self.time_scale_ = float(np.median([r.n_steps for r in runs.runs]))
        self.seen_ = np.ones(len(runs.train_ids), dtype=bool)  # every example has features
        self.consumed_ = _consumed(runs)
        return self.features_

    def _keep_components(self, k: int) -> np.ndarray:
        """Truncate the bases and projected features to their first `k` directions; ``phi``."""
        self.n_components_ = k = min(k, self.basis_components_.shape[1])
        self.basis_components_ = self.basis_components_[:, :k]
        self.features_ = self.features_[:, : k + 1]
        if self.test_basis_components_ is not None:
            self.test_basis_components_ = self.test_basis_components_[:, :k]
        self.test_features_ = self.test_features_[:, : k + 1]
        return self.features_

    def _regressor_subset(self, k: int, K: int) -> np.ndarray:
        """Indices of the regressors of the first `k` directions among ``J`` (``K = k_max + 1``)."""
        first = np.arange(k + 1)
        return np.concatenate([first, K + first]) if self.time_varying else first

    def _regressors(self, design: Design, phi: np.ndarray) -> np.ndarray:
        """``(n, J)``: ``F_t``, and ``tau_t F_t`` with drift, for every step of `design`."""
        F = np.asarray(design.counts @ phi)
        if not self.time_varying:
            return F
        tau = np.minimum(design.step / self.time_scale_, 1.0)[:, None]
        return np.hstack([F, tau * F])

    def _effects(self, coef_A: np.ndarray, coef_B: np.ndarray, phi: np.ndarray) -> Effects:
        """``(A, B, A', B')`` of coefficients ``(M, J)`` on training bases ``(P, K)``."""
        K = phi.shape[1]
        A = 1.0 / self.batch_size_ + coef_A[:, :K] @ phi.T
        B = coef_B[:, :K] @ phi.T
        if not self.time_varying:
            return A, B, None, None
        return A, B, coef_A[:, K:] @ phi.T, coef_B[:, K:] @ phi.T

    def _set_effects(self, effects: Effects) -> None:
        self.A_, self.B_, self.A_slope_, self.B_slope_ = effects

    def _rollout_mse(self, runs: RunSet, effects: Effects) -> float:
        """All-steps MSE of free-running rollouts of `runs` under `effects`, floored like every
        rollout the simulator reports (`soft_floor`)."""
        A, B, A1, B1 = effects
        counts = self.run_counts(runs)
        initial = np.stack([r.initial_loss for r in runs.runs])
        slopes = None if B1 is None else (A1, B1)
        simulated = self.rollout_params(counts, A, B, slopes, initial)
        for traj in simulated:  # scored as reported
            soft_floor(traj[1:], self.floor_, self.floor_width_)
        return all_steps_mse([r.losses for r in runs.runs], simulated).mean

    def _test_map_weights(self) -> np.ndarray:
        """``(2J,)``: the variance of the feature each coefficient multiplies (`fit_test_map`)."""
        variance = np.concatenate([[1.0], self.features_[:, 1:].var(axis=0)])
        per_coef = np.tile(variance, self.coef_A_.shape[1] // len(variance))
        return np.concatenate([per_coef, per_coef])

    def _fit_test_map(self) -> None:
        coef = np.hstack([self.coef_A_, self.coef_B_])
        self.test_map_, self.test_map_l2_, self.test_map_loo_ = fit_test_map(
            self.test_features_, coef, self._test_map_weights()
        )

    # calibration ----------------------------------------------------------------------------
    def calibrate(self, runs: RunSet, n_folds: int = 5) -> Self:
        """`Simulator.calibrate`, and the scale of the intervals of test examples that `extend`
        adds (``new_test_scale_``, see `_new_test_scale`)."""
        super().calibrate(runs, n_folds)
        self.new_test_scale_ = self._new_test_scale(runs, n_folds)
        return self

    def _new_test_scale(self, runs: RunSet, n_folds: int) -> np.ndarray | None:
        """``(T_max + 1,)``: the per-step scale of the held-out residuals of test examples
        simulated as if no run had recorded them. In each calibration fold every recorded test
        example gets the coefficients that the fold copy's test map predicts for it from the
        other test examples (`leave_one_out_coefficients`), and the fold's held-out runs are
        rolled out; the median over test examples of `intervals.scales`. None without fold
        copies."""
        fold_A, fold_B = getattr(self, "fold_coef_A_", None), getattr(self, "fold_coef_B_", None)
        folds = run_folds(runs, min(n_folds, len(runs.runs)))
        if fold_A is None or fold_B is None or len(fold_A) != len(folds):
            return None
        J, dim = self.coef_A_.shape[1], map_directions(self.test_map_)
        true: list[np.ndarray] = []
        simulated: list[np.ndarray] = []
        for (_, held), coef_A, coef_B in zip(folds, fold_A, fold_B, strict=True):
            coef = leave_one_out_coefficients(
                self.test_features_,
                np.hstack([coef_A, coef_B]),
                self._test_map_weights(),
                dim,
                self.test_map_l2_,
            )
            A, B, A1, B1 = self._effects(coef[:, :J], coef[:, J:], self.features_)
            counts = self.run_counts(held)
            initial = np.stack([r.initial_loss for r in held.runs])
            slopes = None if B1 is None else (A1, B1)
            for traj in self.rollout_params(counts, A, B, slopes, initial):
                soft_floor(traj[1:], self.floor_, self.floor_width_)
                simulated.append(traj)
            true += [r.losses for r in held.runs]
        return np.median(intervals.scales(intervals.residual_table(true, simulated)), axis=1)

    def _keep_fold_copies(self, copies: list[Simulator]) -> None:
        super()._keep_fold_copies(copies)
        usable = [c for c in copies if isinstance(c, _FeatureEffects)]
        if len(usable) >= 2 and hasattr(self, "fold_B_"):
            self.fold_coef_A_ = np.stack([c.coef_A_ for c in usable])
            self.fold_coef_B_ = np.stack([c.coef_B_ for c in usable])
            self.fold_test_map_ = np.stack([c.test_map_ for c in usable])
