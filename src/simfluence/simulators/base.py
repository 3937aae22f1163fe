"""The simulator contract, shared by every method (scikit-learn's estimator conventions).

* parameters are plain constructor arguments (`get_params`);
* `fit(runs)` learns from a `RunSet` and returns ``self``; learned attributes end in ``_``;
* `simulate(curriculum, initial_loss)` returns a free-running rollout of shape ``(T + 1, M)``:
  row 0 is `initial_loss`, row ``t`` the predicted loss after batch ``t``; the simulator feeds
  its own predictions back and never sees an observed loss after step 0;
* `save(path)`, and `simfluence.simulators.registry.load_simulator(path)`: one ``.npz`` file
  (format in docs/simulators.md).
"""

from __future__ import annotations

import inspect
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import numpy as np

from simfluence._atomic import save_npz_atomic
from simfluence.errors import CurriculumError, SimfluenceError
from simfluence.runlog.runs import AnyCurriculum, RunSet, check_curriculum

MODEL_FORMAT = "simfluence.simulator"
MODEL_SCHEMA_VERSION = 1


class NotFittedError(SimfluenceError):
    """`simulate` or `save` was called before `fit`."""


class Simulator(ABC):
    """Base class of all training-run simulators.

    Attributes set by `fit`:
        train_ids_: the pool, length ``P``.
        test_ids_: the test examples, length ``M``; column ``j`` of every rollout.
        initial_loss_: shape ``(M,)``, mean recorded loss before training over the fitted runs
            (the default starting point of `simulate` on the command line).
    """

    #: name used by the command line and in saved files
    name: ClassVar[str] = ""

    train_ids_: list[str]
    test_ids_: list[str]
    initial_loss_: np.ndarray

    # -- parameters -------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p for p in signature.parameters if p != "self"]

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments as a dict (JSON-able)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- learning and simulating ------------------------------------------------------------
    def fit(self, runs: RunSet) -> Self:
        """Learn from the runs of `runs`; returns self."""
        if not runs.runs:
            raise SimfluenceError(f"{self.name}: cannot fit on a run set with no runs")
        self.train_ids_ = list(runs.train_ids)
        self.test_ids_ = list(runs.test_ids)
        self.initial_loss_ = np.mean([r.initial_loss for r in runs.runs], axis=0)
        self._fit(runs)
        return self

    @abstractmethod
    def _fit(self, runs: RunSet) -> None:
        """Set the learned attributes from `runs` (ids already stored)."""

    def simulate(self, curriculum: Sequence[Sequence[Any]], initial_loss: np.ndarray) -> np.ndarray:
        """Free-running rollout of one curriculum.

        Args:
            curriculum: ``T`` batches of training ids (ints are converted to str).
            initial_loss: shape ``(M,)``, the loss of every test example before training.

        Returns:
            shape ``(T + 1, M)``; row 0 equals `initial_loss`.
        """
        return self.simulate_many([curriculum], np.asarray(initial_loss)[None, :])[0]

    def simulate_many(
        self, curricula: Sequence[Sequence[Sequence[Any]]], initial_losses: np.ndarray
    ) -> list[np.ndarray]:
        """Rollouts of many curricula at once (vectorized across curricula and test examples).

        Args:
            curricula: ``C`` curricula; they may differ in length.
            initial_losses: shape ``(C, M)`` or ``(M,)`` (shared by all).

        Returns:
            a list of ``C`` arrays, the ``c``-th of shape ``(T_c + 1, M)``.
        """
        self._check_fitted()
        for k, curriculum in enumerate(curricula):
            check_curriculum(curriculum, f"curriculum #{k}")
        initial = np.asarray(initial_losses, dtype=np.float64)
        n_tests = len(self.test_ids_)
        if initial.ndim == 1:
            initial = np.broadcast_to(initial, (len(curricula), initial.shape[0]))
        if initial.shape != (len(curricula), n_tests):
            raise CurriculumError(
                f"initial loss has shape {initial.shape}, expected ({len(curricula)}, {n_tests}) "
                f"(one loss per test example of the model)"
            )
        if not np.isfinite(initial).all():
            raise CurriculumError("initial loss holds NaN or infinite values")
        return self._simulate_many(curricula, initial)

    @abstractmethod
    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        """Rollouts for normalized curricula; `initial` has shape ``(C, M)``."""

    def _check_fitted(self) -> None:
        if not hasattr(self, "test_ids_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(runs) first")

    # -- persistence ------------------------------------------------------------------------
    def _learned(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fitted simulator to one ``.npz`` file, atomically.

        Array attributes are stored as arrays; every other learned attribute, the parameters and
        the ids go into a JSON header (key ``__meta__``). No pickle is involved.
        """
        self._check_fitted()
        learned = self._learned()
        arrays = {k: v for k, v in learned.items() if isinstance(v, np.ndarray)}
        scalars = {k: v for k, v in learned.items() if not isinstance(v, np.ndarray)}
        meta = {
            "format": MODEL_FORMAT,
            "schema_version": MODEL_SCHEMA_VERSION,
            "method": self.name,
            "params": self.get_params(),
            "learned": scalars,
        }
        save_npz_atomic(path, **arrays, __meta__=np.array(json.dumps(meta, default=_jsonable)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a simulator file")
