"""Featurized Simfluence: effects computed from example features, so they generalize.

Simfluence-Linear learns two free numbers per (training example, test example) pair, from the
runs that happened to consume that training example: with a large pool each example is seen in a
handful of runs, and an example no run consumed gets nothing. Here the effects of a training
example are a function of its features (``runs.features``, `simfluence.runlog.features`), so
statistical strength is shared across examples and a new example gets effects from its vector.
Consumed at step ``t`` of a curriculum (``tau_t = min((t - 1) / T0, 1)``, ``T0`` the typical
length of the fitted runs):

    A_i(z, t) = 1/b + (u_z + tau_t u'_z) . phi_i,      B_i(z, t) = (v_z + tau_t v'_z) . phi_i,
    phi_i = [1, (x_i - mean) / scale @ W]                               (K = k + 1 values)

``x_i`` is training example ``i``'s feature vector, ``W`` its first ``k`` principal directions
over the whole pool (the pool's features are unlabelled data: every example, consumed or not,
shapes them), scaled so the first projected coordinate has unit variance and the others keep
their relative variance (the ridge below then shrinks the weak directions most, like a kernel
ridge). ``u, u', v, v'`` (``K`` each) belong to test example ``z``. The drift term (``u'``,
``v'``; ``time_varying=True``) lets an example act differently early and late in training (on
newsgroups-minilm it lowers held-out all-steps MSE by 40%); the rollout is that of
`DynamicsSimulator` with ``A_slope_``, ``B_slope_``. With teacher forcing the model is linear in
the coefficients, and each test example is a ridge regression toward 0 ("no effect")

    L_t(z) - (sum_{i in c_t} w_t / b) L_{t-1}(z) = [L_{t-1}(z) G_t, G_t] . [u_z, u'_z, v_z, v'_z],
    G_t = [F_t, tau_t F_t],   F_t = sum_{i in c_t} w_t phi_i,

``4K`` unknowns each (``2K`` without drift), solved for all test examples at once in closed
form. Its strength ``l2`` is chosen by cross-validation over whole training runs, scoring
free-running rollouts, as for `simfluence.simulators.linear.LinearSimulator`.

**Test examples that no run recorded.** The coefficients of a new test example are predicted
from its features: ``[u, u', v, v'] = [1, psi_z] C``, where ``psi_z`` projects its features (with
the pool's basis when train and test features have the same dimension) and ``C`` is a ridge
regression of the recorded test examples' coefficients on their features (strength by
leave-one-out over test examples; an infinitely strong ridge gives the average test example).
It also needs its loss before training.

Signs and batch weighting as in `simfluence.simulators.dynamics`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.metrics import all_steps_mse
from simfluence.runlog.features import ExampleFeatures
from simfluence.runlog.runs import RunSet
from simfluence.simulators import intervals
from simfluence.simulators.base import Simulator, soft_floor
from simfluence.simulators.dynamics import DynamicsSimulator, rollout_drifting
from simfluence.simulators.encoding import encode_runs
from simfluence.simulators.intervals import run_folds
from simfluence.simulators.linear import LinearSimulator, Params
from simfluence.simulators.ridge import Design, LinearRidgeProblem

#: numbers of principal directions of the features tried by cross-validation
COMPONENT_GRID: tuple[int, ...] = (8, 32, 64)
#: ridge strengths tried for the per-test-example feature coefficients (descending)
FEATURE_L2_GRID: tuple[float, ...] = (1e4, 3e3, 1e3, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0)
#: ridge strengths tried for the hybrid's pull toward the featurized effects (descending)
HYBRID_L2_GRID: tuple[float, ...] = (1e4, 1e3, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1)
#: ridge strengths tried (by leave-one-out) for the map from test features to coefficients
TEST_MAP_GRID: tuple[float, ...] = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
#: numbers of test-feature directions tried by the map to new test examples' coefficients
TEST_MAP_DIMS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
#: rows of the design processed at once when forming the per-test normal equations
_ROW_CHUNK = 512

#: ``(A, B, A', B')``: parameters and their drifts, each ``(M, P)`` (drifts None: static)
Effects = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


class FeatureMissingError(SimfluenceError):
    """A featurized simulator was asked to fit a run set without features."""


# -- the feature basis ------------------------------------------------------------------------
@dataclass
class Basis:
    """Standardize, then project on principal directions: ``phi = [1, (x - mean) / scale @ W]``.

    Attributes:
        mean, scale: shape ``(d,)``.
        components: shape ``(d, k)``; column ``j`` is the ``j``-th principal direction divided
            by the standard deviation of the first projected coordinate.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray, k: int) -> Basis:
        """The basis of the ``(n, d)`` rows of `X`, keeping at most `k` directions."""
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale <= 1e-12 * max(float(scale.max()), 1e-300)] = 1.0
        Z = (X - mean) / scale
        _, singular, vt = np.linalg.svd(Z, full_matrices=False)
        keep = int(min(k, np.sum(singular > 1e-10 * singular[0]) if singular.size else 0))
        top = singular[0] / np.sqrt(len(X)) if keep else 1.0
        return cls(mean, scale, vt[:keep].T / top)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """``(n, k + 1)``: a column of ones, then the projected features of the rows of `X`."""
        Z = (np.asarray(X, dtype=np.float64) - self.mean) / self.scale @ self.components
        return np.hstack([np.ones((len(Z), 1)), Z])


def _check_features(features: ExampleFeatures | None, runs: RunSet, who: str) -> ExampleFeatures:
    if features is None:
        raise FeatureMissingError(
            f"{who}: the run set has no example features; compute them with `simfluence "
            "features DIR` (from the run set's task) or `simfluence features DIR --from FILE`"
        )
    return features.check(len(runs.train_ids), len(runs.test_ids), f"{who}: features")


# -- per-test-example normal equations ----------------------------------------------------------
@dataclass
class NormalEquations:
    """``G`` (M, 2J, 2J) and ``rhs`` (M, 2J): sums over the steps of a design of ``x x^T`` and
    ``x r`` with ``x = [L_{t-1} G_t, G_t]`` (``G_t``: ``J`` regressors of step ``t``) and ``r``
    what "no effect" leaves unexplained. Sums, so those of disjoint designs add."""

    G: np.ndarray
    rhs: np.ndarray

    @classmethod
    def of(cls, design: Design, regressors: np.ndarray, prior_a: float) -> NormalEquations:
        """From a design and its ``(n, J)`` per-step regressors."""
        F = regressors
        n, J = F.shape
        M = design.prev.shape[1]
        mass = np.asarray(design.counts.sum(axis=1))
        resid = design.next - prior_a * mass * design.prev
        G = np.zeros((M, 2 * J, 2 * J))
        for start in range(0, n, _ROW_CHUNK):  # bounded memory: (chunk, J^2) at a time
            rows = slice(start, start + _ROW_CHUNK)
            outer = (F[rows, :, None] * F[rows, None, :]).reshape(-1, J * J)
            prev = design.prev[rows]
            G[:, :J, :J] += ((prev**2).T @ outer).reshape(M, J, J)
            G[:, :J, J:] += (prev.T @ outer).reshape(M, J, J)
        G[:, J:, :J] = np.transpose(G[:, :J, J:], (0, 2, 1))
        G[:, J:, J:] = F.T @ F
        rhs = np.hstack([(design.prev * resid).T @ F, resid.T @ F])
        return cls(G, rhs)

    def __sub__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.G - other.G, self.rhs - other.rhs)

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.G + other.G, self.rhs + other.rhs)

    def restrict(self, regressors: np.ndarray) -> NormalEquations:
        """The equations of a subset of the ``J`` regressors (indices into ``0..J-1``)."""
        J = self.G.shape[1] // 2
        keep = np.concatenate([regressors, J + np.asarray(regressors)])
        return NormalEquations(self.G[:, keep][:, :, keep], self.rhs[:, keep])

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """``(coef_A, coef_B)``, each ``(M, J)``: the ridge solution toward 0 at `lam`."""
        J = self.G.shape[1] // 2
        solution = np.linalg.solve(self.G + lam * np.eye(2 * J), self.rhs[:, :, None])[:, :, 0]
        return solution[:, :J], solution[:, J:]


# -- the map from test features to coefficients -------------------------------------------------
def fit_test_map(
    psi: np.ndarray,
    coef: np.ndarray,
    weights: np.ndarray,
    grid: Sequence[float] = TEST_MAP_GRID,
    dims: Sequence[int] = TEST_MAP_DIMS,
) -> tuple[np.ndarray, float, float]:
    """Ridge regression of the test examples' coefficients on their features.

    The number of feature directions used (a prefix of `dims`, nested) and the ridge strength
    are chosen together by leave-one-out over test examples (closed form).

    Args:
        psi: ``(M, K')`` projected test features, first column ones (not penalized).
        coef: ``(M, C)`` coefficients of the recorded test examples.
        weights: ``(C,)``: how much an error in each coefficient matters (the variance of the
            feature it multiplies, so errors are measured in effect space).

    Returns:
        ``(map (K', C), chosen strength, leave-one-out error relative to predicting the mean)``;
        the rows of directions left out are zero.
    """
    M = len(psi)
    if M < 3 or psi.shape[1] == 1:
        return ridge_map(psi, coef, weights, 0, np.inf), np.inf, 1.0
    scaled = coef * np.sqrt(weights)
    center = scaled.mean(axis=0)
    Y = scaled - center
    baseline = float((Y**2).sum()) * (M / (M - 1)) ** 2  # LOO error of predicting the mean
    best = (baseline, 0, np.inf)
    for dim in sorted({min(d, psi.shape[1] - 1) for d in dims}):
        X = psi[:, 1 : dim + 1] - psi[:, 1 : dim + 1].mean(axis=0)
        U, s, _ = np.linalg.svd(X, full_matrices=False)
        for gamma in grid:
            shrink = s**2 / (s**2 + gamma)
            fitted = U @ (shrink[:, None] * (U.T @ Y))
            leverage = (U**2 @ shrink) + 1.0 / M  # the intercept's leverage included
            loo = float((((Y - fitted) / (1.0 - leverage)[:, None]) ** 2).sum())
            best = min(best, (loo, dim, gamma))
    error, dim, gamma = best
    return ridge_map(psi, coef, weights, dim, gamma), float(gamma), error / max(baseline, 1e-300)


def ridge_map(
    psi: np.ndarray, coef: np.ndarray, weights: np.ndarray, dim: int, gamma: float
) -> np.ndarray:
    """The ``(K', C)`` map of `fit_test_map` for a given number of directions `dim` and ridge
    strength `gamma` (0 directions: every test example gets the average coefficients)."""
    W = np.zeros((psi.shape[1], coef.shape[1]))
    W[0] = coef.mean(axis=0)
    if dim and np.isfinite(gamma):
        scaled = coef * np.sqrt(weights)
        center = scaled.mean(axis=0)
        means = psi[:, 1 : dim + 1].mean(axis=0)
        X = psi[:, 1 : dim + 1] - means
        slope = np.linalg.solve(X.T @ X + gamma * np.eye(dim), X.T @ (scaled - center))
        W[1 : dim + 1] = slope / np.sqrt(weights)
        W[0] = (center - means @ slope) / np.sqrt(weights)
    return W


def map_directions(W: np.ndarray) -> int:
    """The number of feature directions a map of `fit_test_map` uses (its nonzero rows)."""
    used = np.flatnonzero(np.any(W[1:] != 0, axis=1))
    return int(used[-1]) + 1 if used.size else 0


def leave_one_out_coefficients(
    psi: np.ndarray, coef: np.ndarray, weights: np.ndarray, dim: int, gamma: float
) -> np.ndarray:
    """``(M, C)``: each test example's coefficients as `ridge_map` predicts them from the
    other test examples (the same `dim` and `gamma`): how a test example that no run recorded
    would be simulated."""
    everyone = np.arange(len(psi))
    out = np.empty_like(coef)
    for j in everyone:
        others = everyone != j
        out[j] = psi[j] @ ridge_map(psi[others], coef[others], weights, dim, gamma)
    return out


# -- shared machinery -------------------------------------------------------------------------
class _FeatureEffects(DynamicsSimulator):
    """Feature bases, per-test coefficients, the drift over training, and new examples.

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

    def _prediction(self, design: Design, regressors: np.ndarray, coef: Params) -> np.ndarray:
        """Teacher-forced predictions ``(n, M)`` of ``L_next`` under coefficients ``coef``."""
        coef_A, coef_B = coef
        mass = np.asarray(design.counts.sum(axis=1))
        alpha = mass / self.batch_size_ + regressors @ coef_A.T
        return alpha * design.prev + regressors @ coef_B.T

    def _rollout_mse(self, runs: RunSet, effects: Effects) -> float:
        """All-steps MSE of free-running rollouts of `runs` under `effects`, floored like every
        rollout the simulator reports (`soft_floor`)."""
        A, B, A1, B1 = effects
        counts = encode_runs(runs, self.batch_size_, self.batch_weighting)
        initial = np.stack([r.initial_loss for r in runs.runs])
        slopes = None if B1 is None else (A1, B1)
        simulated = rollout_drifting(counts, A, B, slopes, self.time_scale_, initial)
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
            counts = encode_runs(held, self.batch_size_, self.batch_weighting)
            initial = np.stack([r.initial_loss for r in held.runs])
            slopes = None if B1 is None else (A1, B1)
            for traj in rollout_drifting(counts, A, B, slopes, self.time_scale_, initial):
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

    # growing the simulator ------------------------------------------------------------------
    def extend(
        self,
        train_ids: Sequence[str] = (),
        train_features: np.ndarray | None = None,
        test_ids: Sequence[str] = (),
        test_features: np.ndarray | None = None,
        test_initial_loss: np.ndarray | None = None,
    ) -> Self:
        """A copy that also simulates training and test examples that no recorded run holds.

        Args:
            train_ids: ``m`` new training ids; train_features: ``(m, d)``.
            test_ids: ``m'`` new test ids; test_features: ``(m', d')``; test_initial_loss:
                ``(m',)``, their loss before training (their default starting point).

        New training examples get their featurized effects on every test example; new test
        examples get coefficients predicted from their features (``test_map_``). Columns and
        rows are appended after the existing ones. Raises `SimfluenceError` for a known or
        repeated id, a missing array, a wrong shape or a non-finite value.
        """
        self._check_fitted()
        new = copy.copy(self)
        train_ids = [str(i) for i in train_ids]
        test_ids = [str(i) for i in test_ids]
        _check_new_ids(train_ids, self.train_ids_, "training")
        _check_new_ids(test_ids, self.test_ids_, "test")
        basis, test_basis = self._train_basis(), self._test_basis()
        x = _check_rows(train_features, len(train_ids), len(basis.mean), "train_features")
        y = _check_rows(test_features, len(test_ids), len(test_basis.mean), "test_features")
        initial = _check_rows(
            None if test_initial_loss is None else np.reshape(test_initial_loss, (-1, 1)),
            len(test_ids),
            1,
            "test_initial_loss",
        ).ravel()
        if train_ids:
            new._add_training(train_ids, basis(x))
        if test_ids:
            new._add_tests(test_ids, test_basis(y), initial)
        return new

    def _add_training(self, ids: list[str], phi: np.ndarray) -> None:
        """Append training examples with projected features `phi` ``(m, K)`` (see `extend`)."""
        added = self._effects(self.coef_A_, self.coef_B_, phi)
        self._set_effects(_join(self._current_effects(), added, axis=1))
        folds = zip(
            self._fold_effects(),
            getattr(self, "fold_coef_A_", []),
            getattr(self, "fold_coef_B_", []),
            strict=True,
        )
        self._set_fold_effects(
            [_join(old, self._effects(ca, cb, phi), axis=1) for old, ca, cb in folds]
        )
        self.features_ = np.vstack([self.features_, phi])
        self.train_ids_ = [*self.train_ids_, *ids]
        self.seen_ = np.concatenate([self.seen_, np.ones(len(ids), dtype=bool)])
        self.consumed_ = np.concatenate([self.consumed_, np.zeros(len(ids), dtype=bool)])

    def _add_tests(self, ids: list[str], psi: np.ndarray, initial: np.ndarray) -> None:
        """Append test examples with projected features `psi` ``(m', K')`` and losses before
        training `initial` ``(m',)`` (see `extend`)."""
        J = self.coef_A_.shape[1]
        coef = psi @ self.test_map_
        rows = self._effects(coef[:, :J], coef[:, J:], self.features_)
        self._set_effects(_join(self._current_effects(), rows, axis=0))
        fold_maps = getattr(self, "fold_test_map_", [])
        self._set_fold_effects(
            [
                _join(old, self._effects(c[:, :J], c[:, J:], self.features_), axis=0)
                for old, c in zip(self._fold_effects(), (psi @ m for m in fold_maps), strict=True)
            ]
        )
        if len(fold_maps):
            self.fold_coef_A_ = np.concatenate([self.fold_coef_A_, psi @ fold_maps[:, :, :J]], 1)
            self.fold_coef_B_ = np.concatenate([self.fold_coef_B_, psi @ fold_maps[:, :, J:]], 1)
        self.coef_A_ = np.vstack([self.coef_A_, coef[:, :J]])
        self.coef_B_ = np.vstack([self.coef_B_, coef[:, J:]])
        self.test_features_ = np.vstack([self.test_features_, psi])
        self._add_test_bounds(initial)
        self.test_ids_ = [*self.test_ids_, *ids]
        self.initial_loss_ = np.concatenate([self.initial_loss_, initial])

    def _add_test_bounds(self, initial: np.ndarray) -> None:
        """Floor, envelope and calibration columns of new test examples (nothing recorded):
        a floor at ``min(0, initial)`` with the recorded examples' typical bend, no trust-region
        bound, and intervals with the median scale and no residuals (see the class docstring)."""
        M = len(self.test_ids_)
        floor = np.broadcast_to(np.asarray(self.floor_, dtype=np.float64), (M,))
        width = np.broadcast_to(np.asarray(self.floor_width_, dtype=np.float64), (M,))
        room = self.initial_loss_ - floor
        ratio = np.median(np.divide(width, room, out=np.zeros(M), where=room > 0))
        new_floor = np.minimum(0.0, initial)
        self.floor_ = np.concatenate([floor, new_floor])
        self.floor_width_ = np.concatenate([width, ratio * (initial - new_floor)])
        envelope = getattr(self, "envelope_", None)
        if envelope is not None:
            unknown = np.full((len(envelope), len(initial)), -np.inf)
            self.envelope_ = np.hstack([envelope, unknown])
        if self.is_calibrated:
            residuals = self.calibration_residuals_
            missing = np.full((*residuals.shape[:2], len(initial)), np.nan, residuals.dtype)
            self.calibration_residuals_ = np.concatenate([residuals, missing], axis=2)
            scale = np.asarray(self.calibration_scale_)
            typical = getattr(self, "new_test_scale_", None)
            if typical is None:  # calibrated without fold copies: a typical recorded example
                typical = np.median(scale, axis=1)
            typical = np.repeat(np.asarray(typical)[:, None], len(initial), axis=1)
            self.calibration_scale_ = np.hstack([scale, typical])

    def _current_effects(self) -> Effects:
        return self.A_, self.B_, self.A_slope_, self.B_slope_

    def _fold_effects(self) -> list[Effects]:
        """The effects of the calibration's fold copies (empty when not calibrated)."""
        if getattr(self, "fold_coef_A_", None) is None:
            return []
        stacks = [getattr(self, f"fold_{n}_", None) for n in ("A", "B", "A_slope", "B_slope")]
        return [
            (stacks[0][k], stacks[1][k], *(None if s is None else s[k] for s in stacks[2:]))
            for k in range(len(self.fold_coef_A_))
        ]

    def _set_fold_effects(self, effects: list[Effects]) -> None:
        if not effects:
            return
        for n, name in enumerate(("A", "B", "A_slope", "B_slope")):
            if effects[0][n] is not None:
                stacked = np.stack([e[n] for e in effects]).astype(np.float32)
                setattr(self, f"fold_{name}_", stacked)


def _join(old: Effects, added: Effects, axis: int) -> Effects:
    joined = [
        None if a is None else np.concatenate([a, b], axis=axis)
        for a, b in zip(old, added, strict=True)
    ]
    return joined[0], joined[1], joined[2], joined[3]


def _consumed(runs: RunSet) -> np.ndarray:
    """``(P,)`` bool: the pool examples that some run of `runs` consumed."""
    index = {train_id: k for k, train_id in enumerate(runs.train_ids)}
    out = np.zeros(len(runs.train_ids), dtype=bool)
    used = {i for run in runs.runs for batch in run.curriculum for i in batch}
    out[[index[i] for i in used if i in index]] = True
    return out


def _check_new_ids(ids: list[str], known: Sequence[str], side: str) -> None:
    known_set = set(known)
    seen: set[str] = set()
    for example_id in ids:
        if example_id in known_set:
            raise SimfluenceError(f"{side} id {example_id!r} is already known to the simulator")
        if example_id in seen:
            raise SimfluenceError(f"{side} id {example_id!r} is given twice")
        seen.add(example_id)


def _check_rows(array: np.ndarray | None, rows: int, dim: int, what: str) -> np.ndarray:
    if rows == 0:
        return np.zeros((0, dim))
    if array is None:
        raise SimfluenceError(f"{what}: required for the {rows} new ids")
    array = np.asarray(array, dtype=np.float64)
    if array.shape != (rows, dim):
        raise SimfluenceError(f"{what}: shape {array.shape}, expected ({rows}, {dim})")
    if not np.isfinite(array).all():
        raise SimfluenceError(f"{what}: holds NaN or infinite values")
    return array


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


# -- the simulators ---------------------------------------------------------------------------
class FeaturizedSimulator(_FeatureEffects):
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


class HybridSimulator(_FeatureEffects, LinearSimulator):
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
        other parameters as `LinearSimulator`.

    Learned attributes: those of `LinearSimulator` and of `_FeatureEffects`; ``A_slope_``,
    ``B_slope_`` are the prior's drift.
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
    ) -> None:
        LinearSimulator.__init__(
            self,
            l2=l2,
            l2_grid=l2_grid,
            cv_folds=cv_folds,
            patience=patience,
            unseen=unseen,
            batch_weighting=batch_weighting,
            tol=tol,
            cv_tol=cv_tol,
            max_iter=max_iter,
        )
        self.n_components = n_components
        self.component_grid = list(component_grid)
        self.time_varying = time_varying
        self.feature_l2 = feature_l2
        self.feature_l2_grid = list(feature_l2_grid)

    def _calibration_params(self) -> dict[str, Any]:
        # the copies fitted in calibration keep k and both ridge strengths chosen here
        return {
            **super()._calibration_params(),
            "n_components": self.n_components_,
            "feature_l2": self.feature_l2_,
        }

    def _fit_parameters(self, runs: RunSet) -> None:
        phi = self._prepare_features(runs)
        k, self.feature_l2_, self.feature_cv_mse_ = choose_feature_model(
            self, runs, phi, self.feature_l2, self.feature_l2_grid
        )
        self._phi = self._keep_components(k)
        design = self.design(runs)
        equations = NormalEquations.of(
            design, self._regressors(design, self._phi), 1.0 / self.batch_size_
        )
        self.coef_A_, self.coef_B_ = equations.solve(self.feature_l2_)
        self._fit_test_map()
        super()._fit_parameters(runs)  # l2 by CV toward the featurized prior, then the final fit
        self.A_slope_, self.B_slope_ = self._slopes
        self.seen_ = np.ones(len(runs.train_ids), dtype=bool)
        del self._phi, self._slopes

    def _path(self, design: Design, grid: list[float], final: bool) -> Iterator[Params]:
        """``(A, B)`` toward the featurized prior fitted on `design` (on all training runs when
        `final`); the prior's drift is left in ``self._slopes``."""
        regressors = self._regressors(design, self._phi)
        coef = (self.coef_A_, self.coef_B_)
        if not final:  # a cross-validation fold: the prior too is fitted on the fold's runs only
            equations = NormalEquations.of(design, regressors, 1.0 / self.batch_size_)
            coef = equations.solve(self.feature_l2_)
        A0, B0, A1, B1 = self._effects(*coef, self._phi)
        problem = LinearRidgeProblem(
            design,
            1.0 / self.batch_size_,
            prior_prediction=self._prediction(design, regressors, coef),
        )
        tol = self.tol if final else self.cv_tol
        solution = None
        for lam in grid:  # descending: each solution warm-starts the next, less smooth one
            solution = problem.solve(lam, start=solution, tol=tol, max_iter=self.max_iter)
            if final:
                self.cg_iterations_ = solution.iterations
                self.cg_residual_ = solution.max_relative_residual
            self._slopes = (A1, B1)  # set at every step: the CV folds' paths interleave
            yield A0 + solution.delta_A.T, B0 + solution.delta_B.T

    def _validation_mse(self, runs: RunSet, params: Params, floor: tuple[Any, Any]) -> float:
        A, B = params
        return self._rollout_mse(runs, (A, B, *self._slopes))


__all__ = [
    "COMPONENT_GRID",
    "FEATURE_L2_GRID",
    "HYBRID_L2_GRID",
    "Basis",
    "FeatureMissingError",
    "FeaturizedSimulator",
    "HybridSimulator",
    "NormalEquations",
    "fit_test_map",
]
