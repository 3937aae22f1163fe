"""Gradient-based training data attribution as additive Simfluence parameters.

Every score function returns a float64 array ``(n_test, n_train)`` of ``B_i(z)``: the predicted
change of test example ``z``'s loss from consuming training example ``i`` **once** in an SGD
step (batch-mean loss, batch size ``b``, learning rate ``eta``). A **negative** entry means that
consuming ``i`` lowers ``z``'s loss. In Simfluence-Linear terms these are the special cases with
``alpha = 1``: ``L_t(z) = L_{t-1}(z) + sum_{i in c_t} B_i(z)``.

* `tracin_cp_scores`: ``-sum_k w_k eta_k / b * g_z(theta_k) . g_i(theta_k)`` (``w_k = 1``).
* `grad_dot_scores`: the same at one checkpoint.
* `influence_scores`: ``-(eta / b) * g_z^T (H + lambda I)^{-1} g_i`` at one checkpoint.
* `per_example_gradients` / `RandomProjection`: the building blocks.
"""

from simfluence.attribution.gradients import (
    CheckpointError,
    FunctionalLoss,
    RandomProjection,
    iter_per_example_gradients,
    per_example_gradients,
    trainable_parameter_names,
)
from simfluence.attribution.influence import (
    DENSE_MAX_DIM,
    batched_cg,
    batched_minres,
    influence_scores,
)
from simfluence.attribution.tracin import grad_dot_scores, gradient_similarity, tracin_cp_scores

__all__ = [
    "DENSE_MAX_DIM",
    "CheckpointError",
    "FunctionalLoss",
    "RandomProjection",
    "batched_cg",
    "batched_minres",
    "grad_dot_scores",
    "gradient_similarity",
    "influence_scores",
    "iter_per_example_gradients",
    "per_example_gradients",
    "tracin_cp_scores",
    "trainable_parameter_names",
]
