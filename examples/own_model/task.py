"""Your own model in simfluence: a complete `Task` in one file.

A small MLP (30 -> 16 -> 2, tanh, float64) trained from scratch on scikit-learn's bundled
breast-cancer data (569 tumours x 30 features, malignant or benign; nothing is downloaded).
Every simfluence command works on it once it is named by its file:

    simfluence record runs --task examples/own_model/task.py:BreastCancerTask
    simfluence evaluate runs --methods linear,tracin-cp-scaled,mean --json eval.json
    simfluence validate runs --kinds random,optimized --curricula 10 --json validation.json
    simfluence report runs --methods linear,tracin-cp-scaled,mean \
        --validation validation.json -o report.html

`record` stores the reference and the constructor arguments (``hidden``, ``optimizer``) in the
run set's manifest, so the later commands rebuild the same task without being told. Constructor
arguments are stored unchanged as attributes of the same name (as scikit-learn estimators do):
that is how simfluence reads them back. Try ``--task-kwargs '{"optimizer": "adam"}'``: the
gradient methods then warn that their formulas assume SGD.

Run this file to record with the library instead of the command line:

    python examples/own_model/task.py runs
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from simfluence.recording import Examples, Task, TaskDefaults


class BreastCancerTask(Task):
    """Inputs ``x`` (n, 30) float64, standardized; labels ``y`` (n,) long (0 malignant)."""

    name = "breast-cancer-mlp"
    # 24 runs x 48 steps (pool 160, 96 per run, batch 4, 2 epochs); 40 test examples
    defaults = TaskDefaults(runs=24, pool=160, per_run=96, tests=40, batch=4, epochs=2, lr=0.05)

    def __init__(self, hidden: int = 16, optimizer: str = "sgd") -> None:
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer {optimizer!r}: expected 'sgd' or 'adam'")
        self.hidden = hidden
        self.optimizer = optimizer

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        """A seeded, disjoint split of the 569 rows into ``pool`` and ``tests`` examples; the id
        ``cancer-123`` is row 123 of `load_breast_cancer`."""
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        x = np.asarray(data.data, dtype=np.float64)
        x = (x - x.mean(axis=0)) / x.std(axis=0)
        y = np.asarray(data.target, dtype=np.int64)
        if pool + tests > len(x):
            raise ValueError(f"the data has {len(x)} rows; pool + tests = {pool + tests}")
        rows = np.random.default_rng(seed).permutation(len(x))

        def examples(chosen: np.ndarray) -> Examples:
            return Examples(
                [f"cancer-{r}" for r in chosen],
                {"x": torch.from_numpy(x[chosen]), "y": torch.from_numpy(y[chosen])},
            )

        return examples(rows[:pool]), examples(rows[len(x) - tests :])

    def make_model(self, seed: int) -> nn.Module:
        """The same seed gives the same initial weights (the global torch RNG is left alone)."""
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            return nn.Sequential(
                nn.Linear(30, self.hidden, dtype=torch.float64),
                nn.Tanh(),
                nn.Linear(self.hidden, 2, dtype=torch.float64),
            )
        finally:
            torch.random.set_rng_state(generator_state)

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy per example, shape ``(n,)`` (no reduction)."""
        return nn.functional.cross_entropy(model(inputs["x"]), inputs["y"], reduction="none")

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """Plain SGD by default (what the gradient methods' formulas model), or Adam."""
        if self.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        return torch.optim.SGD(model.parameters(), lr=lr)

    def describe(self) -> dict[str, object]:
        return {
            "workload": self.name,
            "model": f"MLP 30-{self.hidden}-2 (tanh), float64, from scratch",
            "data": "sklearn.datasets.load_breast_cancer (569 x 30, standardized)",
            "optimizer": self.optimizer,
        }


if __name__ == "__main__":  # not run when simfluence loads this file by its path
    from simfluence.recording import record_runs

    runs = record_runs(BreastCancerTask(), sys.argv[1] if len(sys.argv) > 1 else "runs")
    print(f"recorded {len(runs.runs)} runs into {runs.source}")
