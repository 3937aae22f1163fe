"""The core simulators `auto` and `stack` choose among, fitted with their held-out rollouts.

Each candidate is fitted on all training runs (its own cross-validation picks its
hyperparameters), then refitted with those hyperparameters pinned on all folds of whole runs
but one and rolled out on the held-out fold: exactly the refits of `Simulator.calibrate`
(`Simulator._calibration_rollouts`). The held-out rollouts score the candidate (`auto`) and
weigh it (`stack`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.baselines import MeanTrajectorySimulator
from simfluence.simulators.featurized import FeaturizedSimulator, HybridSimulator
from simfluence.simulators.intervals import run_folds
from simfluence.simulators.linear import AdditiveSimulator, LinearSimulator
from simfluence.simulators.logspace import (
    LogHybridSimulator,
    LogLinearSimulator,
    LogSpaceSimulator,
)
from simfluence.simulators.memory import spec_of

#: the core methods (no torch) that can be candidates, by name
CANDIDATE_CLASSES: dict[str, type[Simulator]] = {
    cls.name: cls
    for cls in (
        LinearSimulator,
        AdditiveSimulator,
        MeanTrajectorySimulator,
        FeaturizedSimulator,
        HybridSimulator,
        LogLinearSimulator,
        LogHybridSimulator,
    )
}
#: candidates that need example features (skipped on run sets without them)
NEEDS_FEATURES = frozenset({"featurized", "hybrid", "log-hybrid"})
#: candidates that, with ``memory="auto"``, take linear's kernel or none (fitted after it)
FOLLOW_LINEAR = frozenset({"hybrid", "log-linear", "log-hybrid"})


@dataclass
class FittedCandidates:
    """Candidates fitted on one run set, in the order given.

    Attributes:
        fitted: name -> the simulator fitted on every run.
        held_out: name -> its held-out rollouts, one ``(T + 1, M)`` array per run, in the
            order of `true` (fold by fold, `simulators.intervals.run_folds`).
        true: the recorded losses of those runs, same order.
        folds: the fold of each of those runs; run_ids: the runs' ids, sorted; n_folds: the
            number of folds.
        skipped: name -> why it was not fitted (no features, or the error its fit raised).
    """

    fitted: dict[str, Simulator] = field(default_factory=dict)
    held_out: dict[str, list[np.ndarray]] = field(default_factory=dict)
    true: list[np.ndarray] = field(default_factory=list)
    folds: list[int] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    n_folds: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


class ComposedSimulator:
    """Mixin of the simulators made of other fitted simulators (`auto`, `stack`; subclasses
    give `_fitted_members`).

    Sparsely scored runs go to the members as they are, each of which fits them its own way
    (`simulators.gaps`), instead of through rounds of imputation that would refit every member
    and its cross-validation each round; the held-out rollouts are scored on the recorded
    losses only (NaN elsewhere). The batch size is the members' (`batch_size_`)."""

    def fit(self, runs: RunSet) -> Any:
        if not runs.runs or runs.complete:
            return super().fit(runs)  # type: ignore[misc]
        self._set_basics(runs)  # type: ignore[attr-defined]
        self._fit(runs)  # type: ignore[attr-defined]
        return self

    @property
    def batch_size_(self) -> float:
        """The typical batch size of the first member that learned one (what a search builds
        its curricula with); AttributeError when none did (``mean`` alone)."""
        for member in self._fitted_members():
            if hasattr(member, "batch_size_"):
                return float(member.batch_size_)
        raise AttributeError("batch_size_")

    def _fitted_members(self) -> list[Simulator]:
        raise NotImplementedError


def check_candidates(names: Sequence[str], who: str) -> None:
    """`SimfluenceError` unless `names` is a non-empty list of `CANDIDATE_CLASSES`."""
    unknown = [c for c in names if c not in CANDIDATE_CLASSES]
    if not names or unknown:
        raise SimfluenceError(
            f"{who}: candidates must be among {', '.join(CANDIDATE_CLASSES)}, got {list(names)}"
        )


def fit_candidates(
    runs: RunSet, names: Sequence[str], cv_folds: int, options: dict[str, Any]
) -> FittedCandidates:
    """Fit every candidate of `names` on `runs` and roll it out on `cv_folds` held-out folds.

    `options` (``memory``, ``unseen``, ``cv_tests``) reach the candidates that take them. With
    ``memory="auto"`` the candidates fitted after ``linear`` (``hybrid`` and the log-space
    ones) choose between no memory and the kernel ``linear`` chose (linear's choice among many
    kernels is the cheap one). A candidate whose fit fails is skipped with its error.
    """
    n_folds = min(cv_folds, len(runs.runs))
    out = FittedCandidates(run_ids=sorted(runs.run_ids), n_folds=n_folds)
    out.folds = [f for f, (_, held) in enumerate(run_folds(runs, n_folds)) for _ in held.runs]
    for name in names:
        if name in NEEDS_FEATURES and runs.features is None:
            out.skipped[name] = "no example features"
            continue
        cls = CANDIDATE_CLASSES[name]
        given = dict(options)
        if given.get("memory") == "auto" and "linear" in out.fitted and name in FOLLOW_LINEAR:
            kernel = out.fitted["linear"].memory_kernel()  # type: ignore[attr-defined]
            given["memory"] = f"none,{spec_of(kernel)}"
        taken = set(cls._param_names())
        try:
            simulator = cls(**{k: v for k, v in given.items() if k in taken}).fit(runs)
            true, held, _ = simulator._calibration_rollouts(runs, cv_folds)
        except SimfluenceError as exc:
            out.skipped[name] = str(exc)
            continue
        out.fitted[name], out.held_out[name], out.true = simulator, held, true
    return out


def fit_summary(simulator: Simulator) -> str:
    """What a fitted candidate chose, for people: ``memory 0.8+lr, l2 3`` (empty for methods
    without a memory kernel or ridge; a log-space simulator's are its inner fit's)."""
    if isinstance(simulator, LogSpaceSimulator):
        simulator = simulator.inner
    details = []
    if getattr(simulator, "memory_", None) is not None:
        details.append(f"memory {spec_of(simulator.memory_kernel())}")  # type: ignore[attr-defined]
    if getattr(simulator, "l2_", None) is not None:
        details.append(f"l2 {simulator.l2_:g}")  # type: ignore[attr-defined]
    return ", ".join(details)


__all__ = [
    "CANDIDATE_CLASSES",
    "ComposedSimulator",
    "FittedCandidates",
    "check_candidates",
    "fit_candidates",
    "fit_summary",
]
