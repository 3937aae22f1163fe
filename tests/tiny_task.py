"""A tiny task trained for real in tests: linear regression on Gaussian features (float64),
with its recording protocol and a model for the Hugging Face Trainer, shared by the recording,
backend, fault and device tests (importable from any test folder: tests/ is on the path)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from simfluence.recording import (
    Examples,
    RecordingProtocol,
    Task,
    TaskDefaults,
    record_runs,
)

N_FEATURES = 5


class TinyTask(Task):
    """Linear regression on Gaussian features, float64; squared error per example."""

    name = "tiny-test"
    defaults = TaskDefaults(runs=3, pool=12, per_run=8, tests=4, batch=2, epochs=2, lr=0.05)

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        gen = torch.Generator().manual_seed(1000 + seed)
        n = pool + tests
        x = torch.randn(n, N_FEATURES, generator=gen, dtype=torch.float64)
        w = torch.randn(N_FEATURES, generator=gen, dtype=torch.float64)
        y = x @ w + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        ids = [f"ex-{i}" for i in range(n)]
        every = Examples(ids, {"x": x, "y": y})
        return every.subset(range(pool)), every.subset(range(pool, n))

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(N_FEATURES, 1, dtype=torch.float64)

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return (model(inputs["x"]).squeeze(-1) - inputs["y"]) ** 2


class FailingTask(TinyTask):
    """Raises from `example_losses` once it has been called `fail_after` times."""

    def __init__(self, fail_after: int) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return super().example_losses(model, inputs)


SMALL = {"runs": 4, "pool": 12, "per_run": 8, "tests": 4, "batch": 2, "epochs": 2, "lr": 0.05}
STEPS = 8  # 2 epochs x 8 / 2


def _record(directory: Path, task: Task | None = None, **overrides: object):
    protocol = RecordingProtocol(**{**SMALL, "seed": 0, **overrides})
    return record_runs(task or TinyTask(), directory, protocol, progress=False)


class _HFModel(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(N_FEATURES, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = ((self.linear(x).squeeze(-1) - labels) ** 2).mean()
        return {"loss": loss}
