"""``auto``: choose the simulator of a run set by run-wise cross-validation, then delegate to it.

Candidates (`AUTO_CANDIDATES`): Simfluence-Linear with its optimizer memory chosen too
(``memory="auto"``, `simulators.memory`), Simfluence-Additive, the curriculum-blind ``mean``,
and ``hybrid`` when the run set has example features. Each is fitted on all training runs (its
own cross-validation picks its hyperparameters), then refitted with those hyperparameters
pinned on all folds of whole runs but one and rolled out on the held-out fold (exactly the
refits of `Simulator.calibrate`); the candidate with the lowest all-steps MSE over every
held-out run wins. Hyperparameters are chosen on all training runs before the folds, which
favours the candidates that have them a little; it avoids a nested cross-validation that would
multiply the cost by the number of folds.

The chosen simulator, fitted on all training runs, answers every `simulate`; its name is
``chosen_`` and `describe` says what it is and what the others scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.metrics import all_steps_mse
from simfluence.runlog.runs import AnyCurriculum, RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.baselines import MeanTrajectorySimulator
from simfluence.simulators.featurized import HybridSimulator
from simfluence.simulators.linear import AdditiveSimulator, LinearSimulator
from simfluence.simulators.memory import spec_of

AUTO_CANDIDATES: tuple[str, ...] = ("linear", "additive", "mean", "hybrid")
#: the methods `auto` can choose among (core methods: no torch)
_CLASSES: dict[str, type[Simulator]] = {
    cls.name: cls
    for cls in (LinearSimulator, AdditiveSimulator, MeanTrajectorySimulator, HybridSimulator)
}
#: learned attributes of the chosen simulator are saved under this prefix
_PREFIX = "delegate__"


class AutoSimulator(Simulator):
    """The best of several simulators on the training runs, by run-wise cross-validation.

    Parameters:
        candidates: method names to choose among; ``hybrid`` is skipped when the run set has
            no example features (and any candidate whose fit fails is skipped and reported).
        cv_folds: folds of whole training runs scoring the candidates.
        memory: the ``memory`` of the ``linear`` and ``hybrid`` candidates (default
            ``"auto"``: ``linear`` chooses its kernel among many by run-wise CV,
            `simulators.memory`; ``hybrid``, fitted after it, between that kernel and none).
        unseen: passed to the candidates that take it.
        cv_tests: passed to the candidates that take it (``linear``, ``additive``: choose
            ``l2`` and the memory kernel on that many test examples drawn at random).

    Learned attributes: ``chosen_`` (the method name), ``chosen_params_`` (its constructor
    arguments), ``cv_scores_`` (method -> held-out all-steps MSE; NaN for failed fits),
    ``skipped_`` (method -> why), and the chosen simulator's own (saved with a prefix).
    """

    name = "auto"

    def __init__(
        self,
        candidates: Sequence[str] = AUTO_CANDIDATES,
        cv_folds: int = 5,
        memory: str | float = "auto",
        unseen: str = "error",
        cv_tests: int | None = None,
    ) -> None:
        self.candidates = list(candidates)
        self.cv_folds = cv_folds
        self.memory = memory
        self.unseen = unseen
        self.cv_tests = cv_tests

    # -- fitting -----------------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        unknown = [c for c in self.candidates if c not in _CLASSES]
        if not self.candidates or unknown:
            raise SimfluenceError(
                f"auto: candidates must be among {', '.join(_CLASSES)}, got {self.candidates}"
            )
        if len(runs.runs) < 2 or self.cv_folds < 2:
            raise SimfluenceError(
                f"auto: choosing by cross-validation needs at least 2 training runs and 2 folds "
                f"(got {len(runs.runs)} runs, cv_folds={self.cv_folds})"
            )
        scores: dict[str, float] = {}
        skipped: dict[str, str] = {}
        fitted: dict[str, Simulator] = {}
        for name in self.candidates:
            if name == "hybrid" and runs.features is None:
                skipped[name] = "no example features"
                continue
            try:
                cls = _CLASSES[name]
                memory = self.memory
                if name == "hybrid" and memory == "auto" and "linear" in fitted:
                    # linear's kernel (chosen among many, cheaply) or none: two hybrid fits
                    memory = f"none,{spec_of(fitted['linear'].memory_kernel())}"  # type: ignore[attr-defined]
                options = {
                    "memory": memory,
                    "unseen": self.unseen,
                    "cv_tests": self.cv_tests,
                }
                taken = set(cls._param_names())
                simulator = cls(**{k: v for k, v in options.items() if k in taken})
                simulator.fit(runs)
                true, simulated, _ = simulator._calibration_rollouts(runs, self.cv_folds)
            except SimfluenceError as exc:
                skipped[name] = str(exc)
                continue
            scores[name] = float(all_steps_mse(true, simulated).mean)
            fitted[name] = simulator
        finite = {k: v for k, v in scores.items() if np.isfinite(v)}
        if not finite:
            raise SimfluenceError(f"auto: no candidate could be fitted ({skipped})")
        chosen = min(finite, key=lambda k: (finite[k], self.candidates.index(k)))
        self.chosen_ = chosen
        self.cv_scores_ = scores
        self.skipped_ = skipped
        self._delegate = fitted[chosen]
        self.chosen_params_ = self._delegate.get_params()

    @property
    def chosen_simulator(self) -> Simulator:
        """The fitted simulator chosen (rebuilt from its saved state after `load_simulator`)."""
        self._check_fitted()
        delegate = getattr(self, "_delegate", None)
        if delegate is None:
            delegate = _CLASSES[self.chosen_](**self.chosen_params_)
            for key, value in vars(self).items():
                if key.startswith(_PREFIX):
                    setattr(delegate, key[len(_PREFIX) :], value)
            self._delegate = delegate
        return delegate

    def choice(self) -> dict[str, Any]:
        """What was chosen, as JSON-able data: ``method``, its ``memory`` kernel (the
        ``memory`` parameter that names it; None for methods without memory) and ``l2`` (None
        without), ``cv_folds``, ``cv_all_steps_mse`` (candidate -> held-out all-steps MSE),
        ``skipped`` (candidate -> why) and the one-line ``description``."""
        self._check_fitted()
        delegate = self.chosen_simulator
        memory = None
        if getattr(delegate, "memory_", None) is not None:
            memory = spec_of(delegate.memory_kernel())  # type: ignore[attr-defined]
        l2 = getattr(delegate, "l2_", None)
        return {
            "method": self.chosen_,
            "memory": None if memory is None else str(memory),
            "l2": None if l2 is None else float(l2),
            "cv_folds": int(self.cv_folds),
            "cv_all_steps_mse": {k: float(v) for k, v in self.cv_scores_.items()},
            "skipped": dict(self.skipped_),
            "description": self.describe(),
        }

    def describe(self) -> str:
        """One line: what was picked, and every candidate's cross-validated all-steps MSE
        (``auto picked linear (memory 0.8+lr, l2 0.1): 5-fold run-wise CV all-steps MSE
        linear 0.0314, hybrid 0.0643, mean 0.0832``)."""
        self._check_fitted()
        delegate = self.chosen_simulator
        details = []
        if getattr(delegate, "memory_", None) is not None:
            details.append(f"memory {spec_of(delegate.memory_kernel())}")  # type: ignore[attr-defined]
        if getattr(delegate, "l2_", None) is not None:
            details.append(f"l2 {delegate.l2_:g}")  # type: ignore[attr-defined]
        detail = f" ({', '.join(details)})" if details else ""
        scored = ", ".join(
            f"{k} {v:.4g}" for k, v in sorted(self.cv_scores_.items(), key=lambda kv: kv[1])
        )
        skipped = "".join(f"; {k} skipped: {v}" for k, v in self.skipped_.items())
        return (
            f"auto picked {self.chosen_}{detail}: {self.cv_folds}-fold run-wise CV all-steps "
            f"MSE {scored}{skipped}"
        )

    # -- simulating and intervals: the chosen simulator's --------------------------------------
    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        return self.chosen_simulator._simulate_many(curricula, initial)

    def calibrate(self, runs: RunSet, n_folds: int = 5) -> AutoSimulator:
        if not hasattr(self, "test_ids_"):
            self.fit(runs)
        delegate = self.chosen_simulator
        delegate.calibrate(runs, n_folds)
        self.calibration_scale_ = delegate.calibration_scale_
        self.calibration_residuals_ = delegate.calibration_residuals_
        return self

    # -- persistence ---------------------------------------------------------------------------
    def _learned(self) -> dict[str, Any]:
        own = {k: v for k, v in super()._learned().items() if not k.startswith(_PREFIX)}
        theirs = {_PREFIX + k: v for k, v in self.chosen_simulator._learned().items()}
        return {**own, **theirs}


__all__ = ["AUTO_CANDIDATES", "AutoSimulator"]
