"""Optimizers and learning-rate schedules of recorded runs: ``--optimizer sgd|adamw
[--weight-decay W] [--schedule constant|linear|cosine] [--warmup K]``.

An `OptimizerSpec` (what the user asks for) is built *around* the task's own optimizer
(`Task.make_optimizer`): the task decides which parameters train (its parameter groups: the top
layers, the LoRA adapters); the spec may swap the algorithm (``sgd``, ``adamw``; None keeps the
task's), set the weight decay, and put a `Schedule` on the learning rate.

What a run set stores (its manifest's ``config``), and what every later training of the same
protocol (a worker process, `validate`'s retraining) rebuilds the optimizer from:

* ``config["optimizer"]``: the optimizer actually built, as `optimizer_spec` writes it: its
  class name and hyper-parameters (``{"name": "AdamW", "lr": 0.001, "betas": [0.9, 0.999],
  "weight_decay": 0.01, ...}``). `rebuild_optimizer` uses the task's own optimizer when the
  description is the task's, else ``torch.optim.<name>`` with those hyper-parameters over the
  task's parameter groups. No description (older run sets): the task's own.
* ``config["schedule"]``: ``{"name", "warmup"}`` when not constant (older run sets: constant).
* ``config["max_grad_norm"]``: gradient clipping by total norm, when asked for
  (``--max-grad-norm``; Hugging Face's ``Trainer`` clips at 1.0 by default).

Schedule. Step ``t = 1..T`` of a run uses the learning rate ``lr * f(t)``:

* warm-up (``t <= K``): ``f(t) = t / K`` (step 1 takes ``lr / K``, step ``K`` the full ``lr``);
* then, with ``p = (t - K - 1) / (T - K)`` in ``[0, 1)``: ``constant`` ``f = 1``; ``linear``
  ``f = 1 - p``; ``cosine`` ``f = (1 + cos(pi p)) / 2``. No step has a zero rate.

The rate actually used at every step is what the runner records (``Run.lr``); the gradient
methods read it from there, so they follow any schedule.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simfluence.errors import SimfluenceError
from simfluence.recording.task import Task

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
#: torch's own defaults, used when no weight decay is given
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adamw": 0.01}


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: ``name`` (constant, linear, cosine) after ``warmup`` steps."""

    name: str = "constant"
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise SimfluenceError(f"--schedule {self.name!r}: use one of {', '.join(SCHEDULES)}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise SimfluenceError(f"--warmup {self.warmup!r}: must be a whole number >= 0")

    @property
    def is_constant(self) -> bool:
        return self.name == "constant" and not self.warmup

    def to_config(self) -> dict[str, Any] | None:
        """``{"name", "warmup"}``, or None for a constant rate (nothing to store)."""
        return None if self.is_constant else {"name": self.name, "warmup": self.warmup}

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> Schedule:
        """The schedule a run set's ``config["schedule"]`` stores (None: constant)."""
        if not config:
            return cls()
        unknown = sorted(set(config) - {"name", "warmup"})
        if unknown:
            raise SimfluenceError(f"schedule config: unknown field {unknown[0]!r}")
        return cls(**config)

    def check_steps(self, n_steps: int) -> None:
        """`SimfluenceError` when the warm-up is longer than a run of `n_steps` steps."""
        if self.warmup > n_steps:
            raise SimfluenceError(f"--warmup {self.warmup}: longer than a run ({n_steps} steps)")

    def factor(self, step: int, n_steps: int) -> float:
        """``f(step)``: the multiple of the base rate used at `step` (1-based) of `n_steps`."""
        if step <= self.warmup:
            return step / self.warmup
        if self.name == "constant":
            return 1.0
        progress = (step - self.warmup - 1) / max(1, n_steps - self.warmup)
        if self.name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def scheduler(
        self, optimizer: torch.optim.Optimizer, n_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """A scheduler to step after every ``optimizer.step()``; None for a constant rate."""
        if self.is_constant:
            return None
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: self.factor(done + 1, n_steps)
        )


@dataclass(frozen=True)
class OptimizerSpec:
    """What the user asks for (validated on creation; see the module docstring).

    Attributes:
        name: ``"sgd"``, ``"adamw"``, or None for the task's own ``make_optimizer``.
        weight_decay: decoupled for AdamW, L2 for SGD; None: the optimizer's default (0 for SGD,
            0.01 for AdamW; the task's own setting for None).
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` (see the module docstring).
        warmup: warm-up steps ``K >= 0``.
        betas, eps: AdamW's moment decay rates and denominator term.
        max_grad_norm: clip the gradients to this total 2-norm before every step (as Hugging
            Face's ``Trainer`` does, at 1.0 by default); None: no clipping.
    """

    name: str | None = None
    weight_decay: float | None = None
    schedule: str = "constant"
    warmup: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in OPTIMIZERS:
            raise SimfluenceError(f"--optimizer {self.name!r}: use one of {', '.join(OPTIMIZERS)}")
        Schedule(self.schedule, self.warmup)  # validates both
        if self.weight_decay is not None and not (
            math.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            raise SimfluenceError(f"--weight-decay {self.weight_decay}: must be a number >= 0")
        if self.weight_decay is None and self.name is not None:
            object.__setattr__(self, "weight_decay", DEFAULT_WEIGHT_DECAY[self.name])
        beta1, beta2 = (float(b) for b in self.betas)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1) or not self.eps > 0:
            raise SimfluenceError(f"AdamW betas {self.betas} must lie in [0, 1), eps above 0")
        object.__setattr__(self, "betas", (beta1, beta2))
        if self.max_grad_norm is not None and not (
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            raise SimfluenceError(f"--max-grad-norm {self.max_grad_norm}: must be a number > 0")

    @property
    def schedule_(self) -> Schedule:
        return Schedule(self.schedule, self.warmup)

    def make(self, task: Task, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer this spec asks for, over the parameter groups of the task's own."""
        base = task.make_optimizer(model, lr)
        if self.name is None:
            if self.weight_decay is not None:
                for group in base.param_groups:
                    if "weight_decay" not in group:
                        raise SimfluenceError(
                            f"--weight-decay: the task's optimizer {type(base).__name__} has "
                            "no weight decay; choose --optimizer sgd or adamw"
                        )
                    group["weight_decay"] = self.weight_decay
                base.defaults["weight_decay"] = self.weight_decay
            return base
        groups = [{"params": group["params"]} for group in base.param_groups]
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(
            groups, lr=lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps
        )


def spec_from_config(config: dict[str, Any], task: Task, model: nn.Module) -> OptimizerSpec | None:
    """The `OptimizerSpec` that recorded a run set's ``config`` (its ``optimizer`` and
    ``schedule``) with `task` (`model`: a throw-away copy of its model): None when it was the
    task's own optimizer at a constant rate, or an optimizer no spec builds (then resuming
    without one reports the difference)."""
    schedule = Schedule.from_config(config.get("schedule"))
    recorded = config.get("optimizer")
    lr = config.get("lr", 0.1)
    own = optimizer_spec(task.make_optimizer(model, lr))
    candidates: list[OptimizerSpec] = []
    clip = config.get("max_grad_norm")
    if not recorded or recorded == own:
        candidates.append(
            OptimizerSpec(None, None, schedule.name, schedule.warmup, max_grad_norm=clip)
        )
    elif recorded.get("name") in ("SGD", "AdamW"):
        name = "sgd" if recorded["name"] == "SGD" else "adamw"
        extra: dict[str, Any] = {}
        if name == "adamw":
            betas = tuple(recorded.get("betas") or (0.9, 0.999))
            extra = {"betas": betas, "eps": recorded.get("eps") or 1e-8}
        wd = recorded.get("weight_decay")
        candidates.append(
            OptimizerSpec(name, wd, schedule.name, schedule.warmup, max_grad_norm=clip, **extra)
        )
    for spec in candidates:
        try:
            built = optimizer_spec(spec.make(task, model, lr))
        except SimfluenceError:
            continue
        if not recorded or built == recorded:
            plain = spec.name is None and schedule.is_constant and clip is None
            return None if plain else spec
    return None


def optimizer_spec(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"name": class name, hyper-parameter: value, ...}`` of a torch optimizer, from its
    ``defaults`` (JSON-able values only: numbers, strings, booleans, None, lists of those)."""
    description: dict[str, Any] = {"name": type(optimizer).__name__}
    for key, value in sorted(optimizer.defaults.items()):
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        try:
            description[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue  # e.g. a callable: not a hyper-parameter worth recording
    return description


def rebuild_optimizer(
    task: Task, model: nn.Module, lr: float, description: dict[str, Any] | None
) -> torch.optim.Optimizer:
    """The optimizer a run set's ``config["optimizer"]`` describes, for `model` at rate `lr`:
    the task's own when it matches (or nothing is described), else ``torch.optim.<name>`` with
    the described hyper-parameters over the task's parameter groups.

    Raises `SimfluenceError` naming the optimizer when torch has no such class.
    """
    own = task.make_optimizer(model, lr)
    if not description or optimizer_spec(own) == {**description, "lr": own.defaults["lr"]}:
        return own
    name = description.get("name")
    cls = getattr(torch.optim, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise SimfluenceError(f"recorded optimizer {name!r}: torch.optim has no such optimizer")
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in description.items() if k in accepted and k != "lr"}
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    groups = [{"params": group["params"]} for group in own.param_groups]
    return cls(groups, lr=lr, **kwargs)


def optimizer_config(
    spec: OptimizerSpec, task: Task, model: nn.Module, lr: float
) -> dict[str, Any]:
    """The ``config`` entries a recording with `spec` stores: ``optimizer`` (the optimizer
    built, `optimizer_spec`) and ``schedule`` (when not constant). `model` is a throw-away
    copy."""
    out: dict[str, Any] = {"optimizer": optimizer_spec(spec.make(task, model, lr))}
    schedule = spec.schedule_.to_config()
    if schedule is not None:
        out["schedule"] = schedule
    if spec.max_grad_norm is not None:
        out["max_grad_norm"] = spec.max_grad_norm
    return out
