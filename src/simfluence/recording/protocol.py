"""The recording protocol: what `record_runs` records, validated on creation.

A `RecordingProtocol` names the options of a recording (the paper's protocol): ``runs`` runs,
each drawing ``per_run`` examples of a ``pool`` and training ``epochs`` epochs in batches of
``batch`` at rate ``lr``, scoring ``tests`` test examples after every step, seeded by ``seed``;
the model is saved at the ``checkpoints`` steps; with ``reserve`` > 0 a share of the pool is kept
for the runs from ``reserve_from`` on (the never-seen protocol); ``optimizer`` is the algorithm
and schedule around the task's own optimizer.

A field left out (None) is filled by `RecordingProtocol.resolve`: from the directory's recorded
config when resuming, else from the task's defaults (`Task.defaults`; ``seed`` 0, ``checkpoints``
`checkpoint_steps` of the run length, ``reserve`` 0, ``reserve_from`` the last
`simfluence.protocol.default_holdout` runs). Every field is checked when the protocol is made
(and again, with the cross-field rules, once resolved): a bad value raises `ProtocolError`, a
`SimfluenceError` naming the field, what it may be and the value received. The library speaks of
fields (``per_run``); the command line translates them to its flags (``--per-run``).

`RecordingProtocol.to_config` is what the manifest stores (``metadata["config"]``); resuming
compares the stored config with the new one (`config_difference` names the first fields that
differ).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.protocol import default_holdout
from simfluence.recording.optim import OptimizerSpec
from simfluence.recording.task import Task
from simfluence.recording.tasks import task_label

#: the fields that count something: whole numbers of at least 1
COUNT_FIELDS = ("runs", "pool", "per_run", "tests", "batch", "epochs")
#: sparse scoring (optional; a config stores them only when they are not the default)
SCORING_FIELDS = ("score_every", "score_fraction", "score_full_from")


class ProtocolError(SimfluenceError):
    """A recording-protocol field with a value it cannot take.

    Attributes:
        field: the field's name (``per_run``).
        value: the value received.
        allowed: what the field may be (``must not exceed the pool size 12``).
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field} {_show(value)}: {allowed}")

    def with_name(self, name: str) -> str:
        """The message with the field called `name` (e.g. a command-line flag)."""
        return f"{name} {_show(self.value)}: {self.allowed}"


def _show(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, list | tuple):
        return f"[{', '.join(_show(v) for v in value)}]"
    return repr(value)


def _is_whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def steps_per_run(per_run: int, batch: int, epochs: int) -> int:
    """``T = epochs * ceil(per_run / batch)``."""
    return epochs * math.ceil(per_run / batch)


def checkpoint_steps(n_steps: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced steps from 0 to ``n_steps`` inclusive (TracIn-CP's checkpoints)."""
    return sorted({round(k * n_steps / (count - 1)) for k in range(count)})


@dataclass(frozen=True)
class RecordingProtocol:
    """The options of a recording (see the module docstring); None: not given.

    Attributes:
        runs: number of runs (at least 1).
        pool: training pool size (at least ``per_run``).
        per_run: training examples drawn per run (at least ``batch``).
        tests: test examples scored after every step.
        batch: batch size.
        epochs: epochs over each run's examples.
        lr: learning rate (a positive number).
        seed: seed of the data split, model and curricula (a whole number >= 0).
        checkpoints: steps in ``0..T`` at which every run's model is saved (``[]``: none).
        reserve: share of the pool kept for the held-out runs, in ``[0, 1)`` (0: off).
        reserve_from: the first run that may draw the reserved examples (``1..runs - 1``;
            needs ``reserve`` > 0).
        optimizer: algorithm and schedule around ``task.make_optimizer`` (None: the task's own,
            constant rate).
        score_every: score the test examples every this many steps (step 0 and the last step
            always; None or 1: every step). Sparse scoring, `simfluence.recording.Scoring`.
        score_fraction: share of the test examples scored at each scored step, rotating, in
            ``(0, 1]`` (None or 1: all).
        score_full_from: runs from this index on are scored in full whatever the two above
            say (held-out runs to evaluate at every step; None: none).
    """

    runs: int | None = None
    pool: int | None = None
    per_run: int | None = None
    tests: int | None = None
    batch: int | None = None
    epochs: int | None = None
    lr: float | None = None
    seed: int | None = None
    checkpoints: Sequence[int] | None = None
    reserve: float | None = None
    reserve_from: int | None = None
    optimizer: OptimizerSpec | None = None
    score_every: int | None = None
    score_fraction: float | None = None
    score_full_from: int | None = None

    def __post_init__(self) -> None:
        for name in COUNT_FIELDS:
            value = getattr(self, name)
            if value is not None and (not _is_whole(value) or value < 1):
                raise ProtocolError(name, value, "must be a whole number of at least 1")
        if self.lr is not None:
            lr = float(self.lr)
            if not math.isfinite(lr) or lr <= 0:
                raise ProtocolError("lr", lr, "must be a positive number")
            object.__setattr__(self, "lr", lr)
        if self.seed is not None and (not _is_whole(self.seed) or self.seed < 0):
            raise ProtocolError("seed", self.seed, "must be a whole number >= 0")
        if self.checkpoints is not None:
            steps = list(self.checkpoints)
            for step in steps:
                if not _is_whole(step):
                    raise ProtocolError("checkpoints", steps, f"{step!r} is not a step number")
            object.__setattr__(self, "checkpoints", tuple(steps))
        if self.reserve is not None:
            reserve = float(self.reserve)
            if not math.isfinite(reserve) or not 0 <= reserve < 1:
                raise ProtocolError("reserve", reserve, "must be a share of the pool in [0, 1)")
            object.__setattr__(self, "reserve", reserve)
        if self.score_every is not None and (
            not _is_whole(self.score_every) or self.score_every < 1
        ):
            raise ProtocolError("score_every", self.score_every, "must be a whole number >= 1")
        if self.score_fraction is not None:
            fraction = float(self.score_fraction)
            if not math.isfinite(fraction) or not 0 < fraction <= 1:
                raise ProtocolError("score_fraction", fraction, "must be a share in (0, 1]")
            object.__setattr__(self, "score_fraction", fraction)
        if self.score_full_from is not None and (
            not _is_whole(self.score_full_from) or self.score_full_from < 0
        ):
            raise ProtocolError("score_full_from", self.score_full_from, "must be a run index >= 0")
        if self.optimizer is not None and not isinstance(self.optimizer, OptimizerSpec):
            raise ProtocolError("optimizer", self.optimizer, "must be an OptimizerSpec or None")
        self._check_together()

    def _check_together(self) -> None:
        """The rules between fields, for the fields given."""
        pool, per_run, batch, epochs = self.pool, self.per_run, self.batch, self.epochs
        if per_run is not None and pool is not None and per_run > pool:
            raise ProtocolError("per_run", per_run, f"must not exceed the pool size {pool}")
        if batch is not None and per_run is not None and batch > per_run:
            raise ProtocolError("batch", batch, f"must not exceed per_run {per_run}")
        if self.checkpoints is not None and None not in (per_run, batch, epochs):
            n_steps = steps_per_run(per_run, batch, epochs)
            for step in self.checkpoints:
                if not 0 <= step <= n_steps:
                    raise ProtocolError(
                        "checkpoints",
                        list(self.checkpoints),
                        f"step {step} is outside 0..{n_steps} (a run has {n_steps} steps: "
                        f"{epochs} epochs x ceil({per_run} / {batch}) batches)",
                    )
        if self.complete:
            self._check_reserve()
            if self.optimizer is not None:
                self.optimizer.schedule_.check_steps(self.n_steps)

    def _check_reserve(self) -> None:
        """The never-seen protocol's rules (a complete protocol)."""
        reserve, first, runs, pool = self.reserve, self.reserve_from, self.runs, self.pool
        if reserve == 0:
            if first is not None:
                raise ProtocolError("reserve_from", first, "needs a reserve above 0")
            return
        if first is not None and (not _is_whole(first) or not 0 < first < runs):
            raise ProtocolError(
                "reserve_from",
                first,
                f"must be a run index between 1 and {runs - 1} (runs from it on are the "
                "held-out runs that may draw the reserved examples)",
            )
        open_pool = pool - round(reserve * pool)
        if self.per_run > open_pool:
            raise ProtocolError(
                "reserve",
                reserve,
                f"leaves {open_pool} examples for the training runs, fewer than per_run "
                f"{self.per_run}",
            )

    @property
    def complete(self) -> bool:
        """Whether every field but ``reserve_from`` and ``optimizer`` is given."""
        return all(
            getattr(self, f.name) is not None
            for f in dataclasses.fields(self)
            if f.name not in ("reserve_from", "optimizer", *SCORING_FIELDS)
        )

    @property
    def n_steps(self) -> int:
        """``T``, the steps of every run (a complete protocol only)."""
        return steps_per_run(self.per_run, self.batch, self.epochs)

    @classmethod
    def task_defaults(
        cls, task: Task, runs: int | None = None, seed: int = 0, reserve: float = 0.0
    ) -> RecordingProtocol:
        """The task's default protocol (`Task.defaults`) with checkpoints at 4 evenly spaced
        steps (what the gradient methods need); `runs` overrides the number."""
        d = task.defaults
        n_steps = steps_per_run(d.per_run, d.batch, d.epochs)
        return cls(
            **{**dataclasses.asdict(d), "runs": runs or d.runs},
            seed=seed,
            checkpoints=checkpoint_steps(n_steps),
            reserve=reserve,
        )

    def resolve(self, task: Task, recorded: Mapping[str, Any] | None = None) -> RecordingProtocol:
        """This protocol with every field left out filled: from `recorded` (the config, and
        ``runs``, a directory was recorded with; resuming), else the task's defaults. The
        result is complete and checked as a whole."""
        recorded = recorded or {}
        defaults = {**dataclasses.asdict(task.defaults), "seed": 0}
        values: dict[str, Any] = {}
        for key, default in defaults.items():
            value = getattr(self, key)
            if value is None:
                value = recorded[key] if recorded.get(key) is not None else default
            values[key] = value
        if self.checkpoints is not None:
            values["checkpoints"] = self.checkpoints
        elif "checkpoints" in recorded:
            values["checkpoints"] = recorded["checkpoints"]
        else:
            per_run, batch, epochs = values["per_run"], values["batch"], values["epochs"]
            valid = all(isinstance(v, int) and v > 0 for v in (per_run, batch, epochs))
            n_steps = steps_per_run(per_run, batch, epochs) if valid else 0
            values["checkpoints"] = checkpoint_steps(n_steps) if valid else []
        reserve, first = self.reserve, self.reserve_from
        if reserve is None:  # resuming: the share the directory was recorded with, else none
            reserve = recorded.get("reserve", 0.0)
            if first is None:
                first = recorded.get("reserve_from")
        runs = values["runs"]
        if first is None and reserve and _is_whole(runs):
            first = runs - default_holdout(runs)
        scoring = {
            key: getattr(self, key) if getattr(self, key) is not None else recorded.get(key)
            for key in SCORING_FIELDS
        }
        return RecordingProtocol(
            **values,
            reserve=reserve,
            reserve_from=first,
            optimizer=self.optimizer or OptimizerSpec(),
            **scoring,
        )

    def to_config(self, task: Task) -> dict[str, Any]:
        """The config a manifest stores of this (complete) protocol, ``runs`` included and the
        optimizer left out (`simfluence.recording.optim.optimizer_config` adds it)."""
        if not self.complete:
            missing = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]
            raise SimfluenceError(f"the recording protocol is not resolved (no {missing})")
        config: dict[str, Any] = {
            "workload": task_label(task),
            "runs": int(self.runs),
            "pool": int(self.pool),
            "per_run": int(self.per_run),
            "tests": int(self.tests),
            "batch": int(self.batch),
            "epochs": int(self.epochs),
            "lr": float(self.lr),
            "seed": int(self.seed),
            "steps": self.n_steps,
            "checkpoints": sorted({int(s) for s in self.checkpoints}),
        }
        if self.reserve:
            config["reserve"] = self.reserve
            first = self.reserve_from
            config["reserve_from"] = int(
                self.runs - default_holdout(self.runs) if first is None else first
            )
        # sparse scoring: stored only when not the default, so full recordings keep their
        # config (and older directories resume)
        if self.score_every not in (None, 1):
            config["score_every"] = int(self.score_every)
        if self.score_fraction not in (None, 1.0):
            config["score_fraction"] = float(self.score_fraction)
        if self.score_full_from is not None and not self.scores_fully:
            config["score_full_from"] = int(self.score_full_from)
        return config

    @property
    def scores_fully(self) -> bool:
        """Whether every run scores every test example after every step."""
        return self.score_every in (None, 1) and self.score_fraction in (None, 1.0)


def config_difference(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str:
    """The first differing keys of two recorded configs, ``key: X there, Y now`` (nested dicts
    by dotted key)."""
    parts = []
    for k in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(config_difference(a, b, f"{prefix}{k}."))
        else:
            parts.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return "; ".join(parts[:3])
