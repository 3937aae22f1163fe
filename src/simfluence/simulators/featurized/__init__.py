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

The package: `basis` (the feature basis, the per-test normal equations), `test_map` (new test
examples' coefficients), `selection` (``k`` and ``l2`` by cross-validation), `effects` (the
machinery both models share), `growth` (`extend`), `simulator` (`FeaturizedSimulator`) and
`hybrid` (`HybridSimulator`: `LinearSimulator`'s ridge regression given the featurized effects
as its prior).
"""

from __future__ import annotations

from simfluence.simulators.featurized.basis import Basis, NormalEquations
from simfluence.simulators.featurized.effects import Effects, FeatureMissingError
from simfluence.simulators.featurized.hybrid import HYBRID_L2_GRID, FeaturePrior, HybridSimulator
from simfluence.simulators.featurized.selection import (
    COMPONENT_GRID,
    FEATURE_L2_GRID,
    choose_feature_model,
)
from simfluence.simulators.featurized.simulator import FeaturizedSimulator
from simfluence.simulators.featurized.test_map import (
    TEST_MAP_DIMS,
    TEST_MAP_GRID,
    fit_test_map,
    leave_one_out_coefficients,
    map_directions,
    ridge_map,
)

__all__ = [
    "COMPONENT_GRID",
    "FEATURE_L2_GRID",
    "HYBRID_L2_GRID",
    "TEST_MAP_DIMS",
    "TEST_MAP_GRID",
    "Basis",
    "Effects",
    "FeatureMissingError",
    "FeaturePrior",
    "FeaturizedSimulator",
    "HybridSimulator",
    "NormalEquations",
    "choose_feature_model",
    "fit_test_map",
    "leave_one_out_coefficients",
    "map_directions",
    "ridge_map",
]
