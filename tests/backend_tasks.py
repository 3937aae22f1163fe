"""Tasks of the backend tests that worker processes import from this file (Ray's workers do
not have the tests folder on their path)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from simfluence.recording.workloads.digits_mlp import HIDDEN, DigitsMLPTask


class PidDigits(DigitsMLPTask):
    """digits-mlp, 20 ms slower per loss call, leaving a file named after each process that
    trains in `pid_dir` (so a test can kill a worker mid-run)."""

    def __init__(self, pid_dir: str = "", hidden: int = HIDDEN) -> None:
        super().__init__(hidden)
        self.pid_dir = pid_dir

    def example_losses(self, model, inputs):  # type: ignore[no-untyped-def]
        (Path(self.pid_dir) / str(os.getpid())).touch()
        time.sleep(0.02)
        return super().example_losses(model, inputs)


def loaded(module: str) -> bool:
    """Whether `module` is imported in the process that runs this (a worker)."""
    import sys

    return module in sys.modules


def square_where(value: int) -> tuple[int, str]:
    """``(value**2, "worker")`` in a pool worker, after 0.2 s (a unit that takes time)."""
    time.sleep(0.2)
    return value * value, "worker"


def square_here(value: int) -> tuple[int, str]:
    """``(value**2, "here")``: the same unit run in the command's own process."""
    time.sleep(0.2)
    return value * value, "here"
