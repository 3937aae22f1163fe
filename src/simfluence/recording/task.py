"""The `Task` contract: what a workload gives the recorder (imitates kronfluence's `Task`).

A user subclasses `Task` for their own model. The recorder, the random-curriculum runner and the
gradient methods only ever talk to a model through these methods, so any PyTorch model works.

Conventions
-----------
* Examples are held as an `Examples`: a dict of tensors that share their first dimension, plus
  one string id per row.
* `example_losses(model, inputs)` returns one loss per row, shape ``(n,)``, no reduction. A
  training step minimises the *mean* over the batch; test scoring calls it under ``no_grad``.
* Devices: the runner moves the model (``model.to(device)``) and the example tensors
  (`Examples.to`); tensors a task creates inside ``example_losses`` or its model's ``forward``
  must follow the inputs (``device=x.device``), so the same task runs on CPU and GPU.
* `make_model(seed)` returns the *trainable* part only. Frozen lower layers are applied once in
  `prepare` and their outputs cached in the `Examples` tensors, which gives identical losses at a
  fraction of the cost.
* Constructor arguments are stored unchanged as attributes of the same name (scikit-learn's
  convention): `simfluence.recording.tasks.task_reference` reads them back so that later
  commands rebuild the same task from the run set's manifest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass
class Examples:
    """A batchable set of examples.

    Attributes:
        ids: one string id per example, length ``n``.
        tensors: name -> tensor whose first dimension is ``n``.
    """

    ids: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, tensor in self.tensors.items():
            if tensor.shape[0] != len(self.ids):
                raise ValueError(
                    f"tensor {name!r} has {tensor.shape[0]} rows but there are {len(self.ids)} ids"
                )

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of the given rows (repeats allowed), as model inputs."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return {name: tensor[index] for name, tensor in self.tensors.items()}

    def subset(self, rows: Sequence[int]) -> Examples:
        """A new `Examples` holding the given rows, in that order."""
        return Examples([self.ids[r] for r in rows], self.take(rows))

    def to(self, device: torch.device | str) -> Examples:
        """The same examples with every tensor on `device` (tensors already there are shared)."""
        return Examples(self.ids, {name: t.to(device) for name, t in self.tensors.items()})


@dataclass(frozen=True)
class TaskDefaults:
    """A workload's default recording protocol: runs, pool, per-run subset, batch, epochs, lr."""

    runs: int = 32
    pool: int = 200
    per_run: int = 128
    tests: int = 50
    batch: int = 4
    epochs: int = 3
    lr: float = 0.1


class Task(ABC):
    """A workload: a training pool, test examples, a model and a per-example loss."""

    #: short name used on the command line, e.g. ``"digits-mlp"``
    name: str = ""
    #: default recording protocol for this workload
    defaults: TaskDefaults = TaskDefaults()

    @abstractmethod
    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        """Load the data and return ``(pool_examples, test_examples)``.

        Deterministic given its arguments. Frozen layers are applied here, once; a task may
        cache their outputs on disk. Raises `ValueError` if the data has fewer examples than
        asked for.
        """

    @abstractmethod
    def make_model(self, seed: int) -> nn.Module:
        """A fresh copy of the trainable model; the same seed gives the same weights."""

    @abstractmethod
    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example losses, shape ``(n,)``, for a batch of ``n`` examples (no reduction)."""

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer used by the runner; plain SGD unless a task overrides it.

        The runner records its class name and hyper-parameters in the run set
        (``config["optimizer"]``); the gradient methods, whose formulas assume plain SGD, warn
        when it is anything else. Its parameter groups decide what trains; ``record
        --optimizer`` may swap the algorithm over the same groups and add a schedule
        (`simfluence.recording.optim`).
        """
        return torch.optim.SGD(model.parameters(), lr=lr)

    def describe(self) -> dict[str, object]:
        """Free-form metadata written into the run log (model, data, frozen layers...)."""
        return {"workload": self.name}

    #: kinds of example features `example_features` offers, besides the generic "gradients"
    feature_kinds: tuple[str, ...] = ()

    def example_features(
        self, examples: Examples, model: nn.Module, kind: str
    ) -> np.ndarray | None:
        """One feature vector per example, for featurized simulators; optional hook.

        Args:
            examples: ``n`` training or test examples (as `prepare` returned them).
            model: the initial model of the recording (``make_model(seed)``), which every run
                starts from.
            kind: one of `feature_kinds` (e.g. a frozen encoder's output, hidden activations).

        Returns:
            shape ``(n, d)``, finite floats, the same ``d`` for every call; or None (the
            default): the task has no features of this kind. Every task has the kind
            ``"gradients"`` (`simfluence.recording.features`: per-example loss gradients at
            the initial model), computed through `example_losses` alone.
        """
        del examples, model, kind
        return None
