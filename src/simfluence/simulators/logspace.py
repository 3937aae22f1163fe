"""Simulators fitted on the log of the loss: ``log-linear`` and ``log-hybrid``.

Simfluence-Linear and the hybrid fit ``L_t = alpha_t L_{t-1} + beta_t`` by least squares on
the loss itself, so the steps and test examples where the loss is large dominate the fit.
Where the loss is small (examples already learned, late in training) their rollouts are
noisy, and the order of the test examples' final losses is partly lost there. The same model
fitted on ``log L`` weighs every loss level alike and always predicts a positive loss: its
step is multiplicative in the loss (``L_t = L_{t-1}^alpha exp(beta)``). On AdamW runs, whose
normalized steps move small losses as much as large ones in relative terms, the log-space fits
rank final losses better (`benchmarks/results/adamw-*.json`); `auto` stacks both spaces
(`simulators.stack`).

`LogSpaceSimulator` wraps any simulator class: it fits it on ``log(max(L, floor))`` (the floor
a tenth of the smallest positive recorded loss, so a zero loss is finite) and exponentiates
its rollouts. It is not a member of the Simfluence-Linear family itself (its per-example
parameters act on the log): attribution and search use its rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import AnyCurriculum, RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.blend import LOG_FLOOR_SHARE, log_runs
from simfluence.simulators.featurized import HybridSimulator
from simfluence.simulators.linear import LinearSimulator

#: learned attributes of the simulator fitted on the log are saved under this prefix
INNER_PREFIX = "inner__"


class LogSpaceSimulator(Simulator):
    """A simulator of class `inner_class` fitted on the log of every recorded loss.

    Subclasses name the inner class and the constructor parameters they pass on to it.

    Learned attributes: ``log_floor_`` (losses below it are raised to it before the log;
    positive) and the inner simulator's own, saved with the prefix ``inner__``.
    """

    inner_class: ClassVar[type[Simulator]]

    def _inner_params(self) -> dict[str, Any]:
        return self.get_params()

    def _fit(self, runs: RunSet) -> None:
        positive = [r.losses[np.isfinite(r.losses) & (r.losses > 0)] for r in runs.runs]
        if not any(p.size for p in positive):
            raise SimfluenceError(f"{self.name}: no positive loss to take the log of")
        self.log_floor_ = LOG_FLOOR_SHARE * float(min(p.min() for p in positive if p.size))
        inner = self.inner_class(**self._inner_params()).fit(log_runs(runs, self.log_floor_))
        self._inner = inner
        for key, value in inner._learned().items():
            setattr(self, INNER_PREFIX + key, value)

    @property
    def inner(self) -> Simulator:
        """The simulator fitted on log losses (rebuilt from its saved state after loading);
        its rollouts are log losses, with no floor."""
        self._check_fitted()
        inner = getattr(self, "_inner", None)
        if inner is None:
            inner = self.inner_class(**self._inner_params())
            for key, value in vars(self).items():
                if key.startswith(INNER_PREFIX):
                    setattr(inner, key[len(INNER_PREFIX) :], value)
            self._inner = inner
        inner.floor_ = -np.inf  # log losses have no floor: this simulator floors the loss
        return inner

    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        logged = np.log(np.maximum(initial, self.log_floor_))
        out = []
        for k, traj in enumerate(self.inner.simulate_many(curricula, logged)):
            traj = np.exp(traj)
            traj[0] = initial[k]  # exactly, even below the floor
            out.append(traj)
        return out

    def _calibration_params(self) -> dict[str, Any]:
        # the refits keep the hyperparameters the inner fit chose: no nested cross-validation
        params = super()._calibration_params()
        pinned = self.inner._calibration_params()
        return {**params, **{k: v for k, v in pinned.items() if k in params}}

    def _learned(self) -> dict[str, Any]:
        own = {k: v for k, v in super()._learned().items() if not k.startswith(INNER_PREFIX)}
        return {**own, **{INNER_PREFIX + k: v for k, v in self.inner._learned().items()}}


class LogLinearSimulator(LogSpaceSimulator):
    """Simfluence-Linear on ``log L`` (parameters as `LinearSimulator`'s)."""

    name = "log-linear"
    inner_class = LinearSimulator

    def __init__(
        self,
        l2: float | None = None,
        memory: str | float = "auto",
        unseen: str = "error",
        cv_tests: int | None = None,
    ) -> None:
        self.l2 = l2
        self.memory = memory
        self.unseen = unseen
        self.cv_tests = cv_tests


class LogHybridSimulator(LogSpaceSimulator):
    """The hybrid (features plus per-example residuals) on ``log L`` (parameters as
    `HybridSimulator`'s)."""

    name = "log-hybrid"
    inner_class = HybridSimulator

    def __init__(
        self, l2: float | None = None, memory: str | float = "none", unseen: str = "error"
    ) -> None:
        self.l2 = l2
        self.memory = memory
        self.unseen = unseen


__all__ = ["LogHybridSimulator", "LogLinearSimulator", "LogSpaceSimulator"]
