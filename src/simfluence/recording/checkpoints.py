"""The checkpoints of recorded runs: the model's ``state_dict`` at chosen steps of every run.

Where they live is `simfluence.runlog.layout` (``DIR/checkpoints/RUN/step-K.pt``); this module
saves and loads them (it imports torch).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from simfluence._atomic import atomic_path
from simfluence.errors import SimfluenceError
from simfluence.runlog.layout import checkpoint_path, saved_checkpoint_steps

PathLike = str | os.PathLike[str]


def require_checkpoint(directory: PathLike, run_id: str, step: int) -> Path:
    """The path of run `run_id`'s checkpoint at `step`; `SimfluenceError` naming the run and
    step (and the steps that were saved) when there is none."""
    path = checkpoint_path(directory, run_id, step)
    if not path.is_file():
        saved = saved_checkpoint_steps(directory, run_id)
        hint = f"saved steps: {saved}" if saved else "no checkpoints were saved for this run"
        raise SimfluenceError(
            f"{directory}: no checkpoint of run {run_id!r} at step {step} ({hint}; record with "
            "that step among the protocol's checkpoints)"
        )
    return path


def load_checkpoint(directory: PathLike, run_id: str, step: int) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` saved for run `run_id` at step `step` (0 = before training).

    Raises `SimfluenceError` naming the run and step when there is no such checkpoint.
    """
    path = require_checkpoint(directory, run_id, step)
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(directory: PathLike, run_id: str, step: int, model: torch.nn.Module) -> None:
    """Save `model`'s ``state_dict`` (on the CPU) as run `run_id`'s checkpoint at `step`,
    atomically."""
    state = {name: t.detach().to("cpu").clone() for name, t in model.state_dict().items()}
    with atomic_path(checkpoint_path(directory, run_id, step)) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)  # through Python's file: a full disk is an OSError
