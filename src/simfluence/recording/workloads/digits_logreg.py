"""``digits-logreg``: multinomial logistic regression on scikit-learn's 8x8 digits.

The same data, split, ids and protocol as ``digits-mlp`` (`DigitsMLPTask`), with a linear model
``64 -> 10`` in float64 (650 parameters): the convex setting where influence functions are
at their best (dattri's benchmark: LDS about 0.8 for IF on MNIST logistic regression).
"""

from __future__ import annotations

import torch
from torch import nn

from simfluence.recording.task import Examples
from simfluence.recording.workloads.digits_mlp import N_CLASSES, N_FEATURES, DigitsMLPTask


class DigitsLogReg(nn.Module):
    """``x (n, 64) float64 -> logits (n, 10)``."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(N_FEATURES, N_CLASSES, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class DigitsLogRegTask(DigitsMLPTask):
    """Logistic regression on sklearn's digits; inputs ``x`` (n, 64), ``y`` (n,)."""

    name = "digits-logreg"
    feature_kinds = ("embedding",)

    def __init__(self) -> None:
        super().__init__()

    def make_model(self, seed: int) -> nn.Module:
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = DigitsLogReg()
        finally:
            torch.random.set_rng_state(gen_state)
        return model

    def example_features(self, examples: Examples, model: nn.Module, kind: str):  # type: ignore[no-untyped-def]
        """``"embedding"``: the standardized pixels (64) and the one-hot label (10)."""
        return super().example_features(examples, model, "embedding")

    def describe(self) -> dict[str, object]:
        return {
            "workload": self.name,
            "model": "logistic regression 64-10, float64, trained from scratch",
            "trainable_params": N_FEATURES * N_CLASSES + N_CLASSES,
            "frozen_params": 0,
            "frozen_layers": "none",
            "data": "sklearn.datasets.load_digits (1797 x 64, standardized), id digits-<row>",
        }
