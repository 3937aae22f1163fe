"""``auto``: choose the simulator of a run set by run-wise cross-validation, then delegate to it.

Candidates (`AUTO_CANDIDATES`, `simulators.candidates`): Simfluence-Linear with its optimizer
memory chosen too (``memory="auto"``, `simulators.memory`), Simfluence-Additive, the
curriculum-blind ``mean``, ``hybrid`` and ``featurized`` when the run set has example features
(``featurized`` is the strongest fit from sparsely scored runs,
`simulators.featurized.multistep`), and the log-space twins of linear and hybrid
(`simulators.logspace`). Each is fitted on all training runs (its own cross-validation picks
its hyperparameters), then refitted with those hyperparameters pinned on all folds of whole
runs but one and rolled out on the held-out fold (exactly the refits of
`Simulator.calibrate`). The same held-out rollouts are stacked (`simulators.stack`:
per test example and stretch of training, weights fitted on the other folds), and whichever
of the candidates and their stack has the lowest all-steps MSE over every held-out run wins.
Hyperparameters are chosen on all training runs before the folds, which favours the
candidates that have them a little; it avoids a nested cross-validation that would multiply
the cost by the number of folds.

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
from simfluence.simulators.candidates import (
    CANDIDATE_CLASSES,
    ComposedSimulator,
    check_candidates,
    fit_candidates,
    fit_summary,
)
from simfluence.simulators.memory import spec_of
from simfluence.simulators.stack import StackSimulator

AUTO_CANDIDATES: tuple[str, ...] = (
    "linear",
    "additive",
    "mean",
    "hybrid",
    "log-linear",
    "log-hybrid",
    "featurized",
)
#: the methods `auto` can choose: its candidates and their stack (core methods: no torch)
_CLASSES: dict[str, type[Simulator]] = {**CANDIDATE_CLASSES, StackSimulator.name: StackSimulator}
#: learned attributes of the chosen simulator are saved under this prefix
_PREFIX = "delegate__"


class AutoSimulator(ComposedSimulator, Simulator):
    """The best of several simulators, or of their stack, on the training runs, by run-wise
    cross-validation.

    Parameters:
        candidates: method names to choose among (`simulators.candidates`); ``hybrid``,
            ``log-hybrid`` and ``featurized`` are skipped when the run set has no example
            features (and any candidate whose fit fails is skipped and reported).
        cv_folds: folds of whole training runs scoring the candidates.
        memory: the ``memory`` of the candidates that take one (default ``"auto"``:
            ``linear`` chooses its kernel among many by run-wise CV, `simulators.memory`; the
            others, fitted after it, between that kernel and none).
        unseen: passed to the candidates that take it.
        cv_tests: passed to the candidates that take it (``linear``, ``additive``: choose
            ``l2`` and the memory kernel on that many test examples drawn at random).
        stack: also score the candidates' stack (`simulators.stack`; needs two candidates).

    Learned attributes: ``chosen_`` (the method name; ``stack`` for the stack),
    ``chosen_params_`` (its constructor arguments), ``cv_scores_`` (method -> held-out
    all-steps MSE; NaN for failed fits), ``skipped_`` (method -> why), and the chosen
    simulator's own (saved with a prefix).
    """

    name = "auto"

    def __init__(
        self,
        candidates: Sequence[str] = AUTO_CANDIDATES,
        cv_folds: int = 5,
        memory: str | float = "auto",
        unseen: str = "error",
        cv_tests: int | None = None,
        stack: bool = True,
    ) -> None:
        self.candidates = list(candidates)
        self.cv_folds = cv_folds
        self.memory = memory
        self.unseen = unseen
        self.cv_tests = cv_tests
        self.stack = stack

    # -- fitting -----------------------------------------------------------------------------
    def _fit(self, runs: RunSet) -> None:
        check_candidates(self.candidates, self.name)
        if len(runs.runs) < 2 or self.cv_folds < 2:
            raise SimfluenceError(
                f"auto: choosing by cross-validation needs at least 2 training runs and 2 folds "
                f"(got {len(runs.runs)} runs, cv_folds={self.cv_folds})"
            )
        options = {"memory": self.memory, "unseen": self.unseen, "cv_tests": self.cv_tests}
        fitted = fit_candidates(runs, self.candidates, self.cv_folds, options)
        scores = {
            name: float(all_steps_mse(fitted.true, held).mean)
            for name, held in fitted.held_out.items()
        }
        finite = {k: v for k, v in scores.items() if np.isfinite(v)}
        if not finite:
            raise SimfluenceError(f"auto: no candidate could be fitted ({fitted.skipped})")
        delegates: dict[str, Simulator] = {k: fitted.fitted[k] for k in finite}
        if self.stack and len(finite) > 1:
            stack = StackSimulator(
                list(finite), self.cv_folds, self.memory, self.unseen, self.cv_tests
            )
            stack._set_basics(runs)
            stack.adopt(fitted, list(finite))
            scores[stack.name] = finite[stack.name] = float(stack.cv_mse_)
            delegates[stack.name] = stack
        order = [*self.candidates, StackSimulator.name]
        chosen = min(finite, key=lambda k: (finite[k], order.index(k)))
        self.chosen_ = chosen
        self.cv_scores_ = scores
        self.skipped_ = dict(fitted.skipped)
        self._delegate = delegates[chosen]
        self.chosen_params_ = self._delegate.get_params()

    @property
    def chosen_simulator(self) -> Simulator:
        """The fitted simulator chosen (rebuilt from its saved state after `load_simulator`)."""
        self._check_fitted()
        delegate = getattr(self, "_delegate", None)
        if delegate is None:
            if self.chosen_ not in _CLASSES or not isinstance(self.chosen_params_, dict):
                raise SimfluenceError(
                    f"auto: the saved choice {self.chosen_!r} is not one of {', '.join(_CLASSES)}"
                )
            delegate = _CLASSES[self.chosen_](**self.chosen_params_)
            for key, value in vars(self).items():
                if key.startswith(_PREFIX):
                    setattr(delegate, key[len(_PREFIX) :], value)
            self._delegate = delegate
        return delegate

    def _fitted_members(self) -> list[Simulator]:
        delegate = self.chosen_simulator
        if isinstance(delegate, StackSimulator):
            return delegate.fitted_members
        return [getattr(delegate, "inner", delegate)]

    def choice(self) -> dict[str, Any]:
        """What was chosen, as JSON-able data: ``method``, its ``memory`` kernel (the
        ``memory`` parameter that names it; None for methods without memory) and ``l2`` (None
        without), ``members`` (a stack's members -> mean weight; None otherwise),
        ``cv_folds``, ``cv_all_steps_mse`` (candidate -> held-out all-steps MSE),
        ``skipped`` (candidate -> why) and the one-line ``description``."""
        self._check_fitted()
        delegate = self.chosen_simulator
        inner = getattr(delegate, "inner", delegate)  # a log-space fit's memory and l2
        memory = None
        if getattr(inner, "memory_", None) is not None:
            memory = spec_of(inner.memory_kernel())
        l2 = getattr(inner, "l2_", None)
        members = delegate.mean_weights() if isinstance(delegate, StackSimulator) else None
        return {
            "method": self.chosen_,
            "memory": None if memory is None else str(memory),
            "l2": None if l2 is None else float(l2),
            "members": members,
            "cv_folds": int(self.cv_folds),
            "cv_all_steps_mse": {k: float(v) for k, v in self.cv_scores_.items()},
            "skipped": dict(self.skipped_),
            "description": self.describe(),
        }

    def describe(self) -> str:
        """One line: what was picked, and every candidate's cross-validated all-steps MSE
        (``auto picked linear (memory 0.8+lr, l2 0.1): 5-fold run-wise CV all-steps MSE
        linear 0.0314, hybrid 0.0643, mean 0.0832``; a stack names its members' mean
        weights)."""
        self._check_fitted()
        delegate = self.chosen_simulator
        if isinstance(delegate, StackSimulator):
            detail = f" ({delegate.describe().removeprefix('stack of ')})"
        else:
            summary = fit_summary(delegate)
            detail = f" ({summary})" if summary else ""
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
