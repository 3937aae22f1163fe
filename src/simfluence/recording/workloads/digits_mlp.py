"""``digits-mlp``: a small MLP trained from scratch on scikit-learn's bundled 8x8 digits.

Data: `sklearn.datasets.load_digits` (1797 images x 64 pixel features, 10 classes, shipped
inside scikit-learn: nothing is downloaded). Features are standardized with the mean and std of
all 1797 rows (so they do not depend on the split). Pool and test rows are a deterministic
permutation of the rows by the seed; the id ``"digits-123"`` is row 123 of `load_digits`.

Model: ``64 -> 32 (tanh) -> 10`` in float64, no dropout, trained with plain SGD on the mean
cross-entropy of the batch. Per-example loss = cross-entropy, shape ``(n,)``.

Measured on the 2-core development machine (torch 2.13 CPU, medians):
* ``prepare(200, 50, 0)``: about 0.05 s (scikit-learn is not imported: `load_digits_arrays`);
  no cache.
* one SGD step on a batch of 4: 0.24 ms; scoring all 50 tests: 0.07 ms (1 or 2 threads alike).
* a full default recording (32 runs x 96 steps, 50 tests scored after every step): about 1 s.
* learning (defaults, lr 0.1): mean test loss 2.35 at step 0 -> 1.09 after 36 steps -> 0.56
  after 96 steps (32 runs); the across-run std of a test example's final loss is about 0.21,
  so the curriculum visibly changes per-example trajectories.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simfluence.recording.task import Examples, Task, TaskDefaults
from simfluence.recording.workloads._common import split_rows

N_FEATURES = 64
N_CLASSES = 10
HIDDEN = 32
#: the digits as scikit-learn ships them, in its ``datasets/data`` folder
DIGITS_FILE = "digits.csv.gz"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """`sklearn.datasets.load_digits`'s ``(data, target)``: ``(1797, 64)`` float64 pixel values
    0-16 and ``(1797,)`` int64 labels.

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``) as
    `load_digits` reads it, without importing scikit-learn: that import (scipy.stats with it)
    took 1.1 s, paid again by every worker process that prepares the task. Where the file is not
    found (another scikit-learn layout), `load_digits` itself.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / DIGITS_FILE
        if path.is_file():
            with gzip.open(path, "rt") as handle:
                data = np.loadtxt(handle, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


class DigitsMLP(nn.Module):
    """``x (n, 64) float64 -> logits (n, 10)``; one tanh hidden layer."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.hidden = nn.Linear(N_FEATURES, hidden, dtype=torch.float64)
        self.out = nn.Linear(hidden, N_CLASSES, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


class DigitsMLPTask(Task):
    """An MLP from scratch on sklearn's digits; inputs ``x`` (n, 64) float64, ``y`` (n,) long."""

    name = "digits-mlp"
    defaults = TaskDefaults(runs=32, pool=200, per_run=128, tests=50, batch=4, epochs=3, lr=0.1)

    def __init__(self, hidden: int = HIDDEN) -> None:
        self.hidden = hidden

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = load_digits_arrays()
        std = x.std(axis=0)
        std[std == 0] = 1.0
        x = (x - x.mean(axis=0)) / std
        return x, y

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        """``(pool_examples, test_examples)`` with tensors ``x`` (n, 64) and ``y`` (n,)."""
        x, y = self._load()
        pool_rows, test_rows = split_rows(len(x), pool, tests, seed, "load_digits")

        def examples(rows: np.ndarray) -> Examples:
            return Examples(
                [f"digits-{r}" for r in rows],
                {"x": torch.from_numpy(x[rows].copy()), "y": torch.from_numpy(y[rows].copy())},
            )

        return examples(pool_rows), examples(test_rows)

    def make_model(self, seed: int) -> nn.Module:
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = DigitsMLP(self.hidden)
        finally:
            torch.random.set_rng_state(gen_state)
        return model

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy per example, shape ``(n,)``."""
        logits = model(inputs["x"])
        return nn.functional.cross_entropy(logits, inputs["y"], reduction="none")

    feature_kinds = ("embedding", "activations")

    def example_features(self, examples: Examples, model: nn.Module, kind: str) -> np.ndarray:
        """``"embedding"``: the standardized pixels (64) and the one-hot label (10);
        ``"activations"``: the hidden layer of `model` (32) and the one-hot label."""
        x = examples.tensors["x"]
        label = nn.functional.one_hot(examples.tensors["y"], N_CLASSES).to(x.dtype)
        inputs = x if kind == "embedding" else torch.tanh(model.hidden(x))
        return torch.cat([inputs, label], dim=1).numpy()

    def describe(self) -> dict[str, object]:
        n_params = N_FEATURES * self.hidden + self.hidden + self.hidden * N_CLASSES + N_CLASSES
        return {
            "workload": self.name,
            "model": f"MLP 64-{self.hidden}-10 (tanh), float64, trained from scratch",
            "trainable_params": n_params,
            "frozen_params": 0,
            "frozen_layers": "none",
            "data": "sklearn.datasets.load_digits (1797 x 64, standardized), id digits-<row>",
        }
