"""Tiny tasks whose training is known in closed form, for value-level tests.

Both are linear models in float64 trained by plain SGD on the batch mean, with a few features,
so a rerun takes milliseconds and every loss, gradient and learning rate can be computed by hand
(numpy, a few lines) and compared with what the library reports.

* `LinearLossTask`: ``loss(z; theta) = theta . x_z + c_z``. The gradient is ``x_z`` whatever
  ``theta``, so one SGD step on batch ``c_t`` moves test loss ``z`` by exactly
  ``-lr * mean_{i in c_t} x_i . x_z``: Simfluence-Linear with ``A_i = 1/b`` and
  ``B_i(z) = -(lr / b) x_i . x_z`` (mean batch weighting) is *exact* (`exact_parameters`).
* `SquaredLossTask`: ``loss(z; theta) = (theta . x_z - y_z)^2 / 2`` with a learning rate that
  decays by `DECAY` after every step (`DecayingSGD`): gradients ``(theta . x - y) x`` depend on
  the checkpoint, and every step has its own learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from simfluence.recording.task import Examples, Task

FEATURES = 3


def _model(seed: int) -> nn.Linear:
    weight = np.random.default_rng([seed, 17]).normal(0.0, 0.5, (1, FEATURES))
    model = nn.Linear(FEATURES, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
    return model


def _examples(pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
    rng = np.random.default_rng([seed, 23])
    n = pool + tests
    x = rng.normal(0.0, 1.0, (n, FEATURES))
    y = x @ rng.normal(0.0, 1.0, FEATURES) + rng.normal(0.0, 0.3, n)
    c = rng.uniform(4.0, 6.0, n)  # keeps linear losses positive for a while
    tensors = {name: torch.from_numpy(v) for name, v in (("x", x), ("y", y), ("c", c))}
    every = Examples([f"ex-{k}" for k in range(n)], tensors)
    return every.subset(range(pool)), every.subset(range(pool, n))


def weights(task: Task, seed: int) -> np.ndarray:
    """``theta_0`` of ``task.make_model(seed)``, shape ``(FEATURES,)``."""
    return task.make_model(seed).weight.detach().numpy().ravel().copy()


def features(examples: Examples, name: str = "x") -> np.ndarray:
    return examples.tensors[name].numpy()


class LinearLossTask(Task):
    """``loss(z; theta) = theta . x_z + c_z``, plain SGD (see the module docstring)."""

    name = "exact-linear-loss"

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        return _examples(pool, tests, seed)

    def make_model(self, seed: int) -> nn.Module:
        return _model(seed)

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(inputs["x"]).squeeze(-1) + inputs["c"]


def linear_loss_trajectory(
    pool: Examples,
    tests: Examples,
    theta0: np.ndarray,
    curriculum: Sequence[Sequence[str]],
    lr: float,
) -> np.ndarray:
    """The losses ``(T + 1, M)`` of `LinearLossTask` trained on `curriculum`, by hand."""
    row = {train_id: k for k, train_id in enumerate(pool.ids)}
    x_pool, x_test, c_test = features(pool), features(tests), features(tests, "c")
    theta = theta0.copy()
    out = [x_test @ theta + c_test]
    for batch in curriculum:
        theta = theta - lr * x_pool[[row[i] for i in batch]].mean(axis=0)
        out.append(x_test @ theta + c_test)
    return np.array(out)


def exact_parameters(
    pool: Examples, tests: Examples, lr: float, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """``A``, ``B`` of shape ``(M, P)`` under which Simfluence-Linear (mean weighting, batch
    size `batch`) reproduces `LinearLossTask` exactly."""
    B = -(lr / batch) * features(tests) @ features(pool).T
    return np.full_like(B, 1.0 / batch), B


class DecayingSGD(torch.optim.SGD):
    """SGD whose learning rate is multiplied by `decay` after every step."""

    def __init__(self, params, lr: float, decay: float) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, lr=lr)
        self.decay = decay

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = super().step(closure)
        for group in self.param_groups:
            group["lr"] *= self.decay
        return loss


class SquaredLossTask(Task):
    """``loss(z; theta) = (theta . x_z - y_z)^2 / 2``, SGD with a learning rate decaying by
    `DECAY` per step."""

    name = "exact-squared-loss"
    DECAY = 0.6

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        return _examples(pool, tests, seed)

    def make_model(self, seed: int) -> nn.Module:
        return _model(seed)

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * (model(inputs["x"]).squeeze(-1) - inputs["y"]) ** 2

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return DecayingSGD(model.parameters(), lr=lr, decay=self.DECAY)


def squared_loss_thetas(
    pool: Examples, theta0: np.ndarray, curriculum: Sequence[Sequence[str]], lrs: Sequence[float]
) -> np.ndarray:
    """``theta_t`` for ``t = 0..T`` of `SquaredLossTask` on `curriculum`, shape ``(T + 1, D)``."""
    row = {train_id: k for k, train_id in enumerate(pool.ids)}
    x, y = features(pool), features(pool, "y")
    thetas = [theta0.copy()]
    for batch, lr in zip(curriculum, lrs, strict=True):
        rows = [row[i] for i in batch]
        residual = x[rows] @ thetas[-1] - y[rows]
        thetas.append(thetas[-1] - lr * (residual[:, None] * x[rows]).mean(axis=0))
    return np.array(thetas)


def squared_loss_gradients(examples: Examples, theta: np.ndarray) -> np.ndarray:
    """Per-example gradients ``(n, D)`` of `SquaredLossTask` at ``theta``."""
    x, y = features(examples), features(examples, "y")
    return (x @ theta - y)[:, None] * x
