"""The simulator contract, shared by every method (scikit-learn's estimator conventions).

* parameters are plain constructor arguments (`get_params`);
* `fit(runs)` learns from a `RunSet` and returns ``self``; learned attributes end in ``_``;
* `simulate(curriculum, initial_loss)` returns a free-running rollout of shape ``(T + 1, M)``:
  row 0 is `initial_loss`, row ``t`` the predicted loss after batch ``t``; the simulator feeds
  its own predictions back and never sees an observed loss after step 0;
* `calibrate(runs)` learns predictive intervals from held-out rollouts of whole runs, and
  `simulate_interval(curricula, initial_losses, level)` returns them (`simulators.intervals`);
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
from simfluence.simulators import gaps, intervals

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
        floor_: shape ``(M,)``, the floor of every rollout (see `loss_floor`): 0 for a test
            example whose recorded losses are never negative.
        floor_width_: shape ``(M,)``, the distance from the floor to the lowest loss recorded:
            below that, reported losses bend smoothly toward the floor (`soft_floor`). Files
            written before the floor existed load with a hard floor at 0.
        envelope_: shape ``(T_max + 1, M)``, the lowest loss recorded for each test example at
            each step in any fitted run (`recorded_envelope`): the curriculum search's trust
            region. Absent from files written before it existed.
    """

    #: name used by the command line and in saved files
    name: ClassVar[str] = ""

    train_ids_: list[str]
    test_ids_: list[str]
    initial_loss_: np.ndarray
    #: class-level defaults for simulator files written before the floor was learned
    floor_: np.ndarray | float = 0.0
    floor_width_: np.ndarray | float = 0.0

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
    #: rounds of re-imputation by the fitted model when fitting sparsely scored runs
    #: (`simulators.gaps`); simulators whose fit does not use the missing steps need none
    gap_rounds: int = gaps.IMPUTATION_ROUNDS

    def fit_observed(self, runs: RunSet) -> int | None:
        """Refit on the observed losses of sparsely scored `runs` directly, after the fit on
        their interpolation (`simulators.gaps`); returns the iterations taken, or None (the
        default) for a simulator fitted by imputation rounds instead."""
        return None

    def fit(self, runs: RunSet) -> Self:
        """Learn from the runs of `runs`; returns self.

        Runs scored sparsely (``observed`` masks) are fitted by imputation of the missing
        losses alternated with the fit (`simulators.gaps`); the floor comes from the observed
        losses only."""
        if not runs.runs:
            raise SimfluenceError(f"{self.name}: cannot fit on a run set with no runs")
        if not runs.complete:
            gaps.fit_with_gaps(self, runs)
            self._set_floor(runs)
            return self
        return self._fit_complete(runs)

    def _set_floor(self, runs: RunSet) -> None:
        self.floor_ = loss_floor(runs)
        self.floor_width_ = floor_width(runs)
        self.envelope_ = recorded_envelope(runs)

    def _fit_complete(self, runs: RunSet) -> Self:
        """`fit` on runs with every loss observed."""
        self._set_basics(runs)
        self._fit(runs)
        return self

    def _set_basics(self, runs: RunSet) -> None:
        """What every fit on complete runs learns first: the ids, the mean initial loss, the
        floor and the recorded envelope."""
        self.train_ids_ = list(runs.train_ids)
        self.test_ids_ = list(runs.test_ids)
        self.initial_loss_ = np.mean([r.initial_loss for r in runs.runs], axis=0)
        self._set_floor(runs)

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
            a list of ``C`` arrays, the ``c``-th of shape ``(T_c + 1, M)``; rows ``1..T_c``
            never go below ``floor_`` (`soft_floor`; row 0 is `initial_losses` as given).
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
        trajectories = self._simulate_many(curricula, initial)
        for traj in trajectories:  # on what is reported, so ranks are kept (`soft_floor`)
            soft_floor(traj[1:], self.floor_, self.floor_width_)
        return trajectories

    @abstractmethod
    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        """Rollouts for normalized curricula; `initial` has shape ``(C, M)``."""

    # -- uncertainty ------------------------------------------------------------------------
    def calibrate(self, runs: RunSet, n_folds: int = 5) -> Self:
        """Learn predictive intervals from held-out rollouts of `runs` (`simulators.intervals`).

        `runs` should be the runs this simulator was fitted on (it is fitted on them first if
        it is not fitted yet). They are split into `n_folds` folds of whole runs; an unfitted
        copy (`_calibration_params`) is fitted on all folds but one and rolls out the runs of
        that one. The residuals of every run, shape ``(R, T + 1, M)``, and the scale of every
        step and test example, ``(T + 1, M)``, are stored (``calibration_residuals_``,
        ``calibration_scale_``).
        Returns self.
        """
        if not hasattr(self, "test_ids_"):
            self.fit(runs)
        if list(runs.test_ids) != list(self.test_ids_):
            raise SimfluenceError(
                f"{self.name}: calibration runs have other test examples than the fitted model"
            )
        if not runs.complete:  # sparse runs: the unscored losses bridged by this model
            runs = gaps.bridge(
                runs,
                self.simulate_many(
                    [r.curriculum for r in runs.runs], np.stack([r.initial_loss for r in runs.runs])
                ),
            )
        true, simulated, copies = self._calibration_rollouts(runs, n_folds)
        self._keep_fold_copies(copies)
        residuals = intervals.residual_table(true, simulated)
        self.calibration_scale_ = intervals.scales(residuals)
        self.calibration_residuals_ = residuals.astype(np.float32)
        return self

    def _calibration_params(self) -> dict[str, Any]:
        """Constructor arguments of the copies fitted in calibration: `get_params`, with
        unseen ids treated as "no effect" (a fold may lack an id that another fold consumes).
        Simulators that choose hyperparameters by cross-validation pin the chosen ones here."""
        params = self.get_params()
        if "unseen" in params:
            params["unseen"] = "prior"
        return params

    def _calibration_rollouts(
        self, runs: RunSet, n_folds: int
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[Simulator]]:
        """Recorded and held-out simulated trajectories of every run of `runs` (cross-fitted),
        and the fitted copies, one per fold.

        Simulators whose parameters are not learned from the recorded losses may override this
        with in-sample rollouts (nothing to hold out, no copies)."""
        if n_folds < 2 or len(runs.runs) < 2:
            raise SimfluenceError(
                f"{self.name}: calibration needs at least 2 runs and 2 folds "
                f"(got {len(runs.runs)} runs, n_folds={n_folds})"
            )
        true: list[np.ndarray] = []
        simulated: list[np.ndarray] = []
        copies: list[Simulator] = []
        for train, held in intervals.run_folds(runs, min(n_folds, len(runs.runs))):
            copy = type(self)(**self._calibration_params()).fit(train)
            simulated += copy.simulate_many(
                [r.curriculum for r in held.runs], np.stack([r.initial_loss for r in held.runs])
            )
            true += [r.losses for r in held.runs]
            copies.append(copy)
        return true, simulated, copies

    def _keep_fold_copies(self, copies: list[Simulator]) -> None:
        """Keep what the fold copies of `calibrate` learned, where a subclass can use it
        (dynamics simulators keep their parameters for the intervals of attributions)."""
        del copies  # nothing to keep by default

    @property
    def is_calibrated(self) -> bool:
        """Whether `calibrate` (or a loaded file) gave this simulator predictive intervals."""
        return hasattr(self, "calibration_residuals_")

    def simulate_interval(
        self,
        curricula: Sequence[Sequence[Sequence[Any]]],
        initial_losses: np.ndarray,
        level: float = 0.9,
    ) -> list[intervals.Interval]:
        """Predictive intervals of the rollouts of `simulate_many` (same arguments).

        Returns:
            ``C`` `Interval` objects, the ``c``-th with ``lower``/``upper`` of shape
            ``(T_c + 1, M)``: at each step and test example, the range that holds the true loss
            with probability about `level` for curricula drawn like the calibration runs.
        """
        level = intervals.check_level(level)
        self._check_calibrated()
        simulated = self.simulate_many(curricula, initial_losses)
        return [self.interval_of(traj, level) for traj in simulated]

    def interval_of(self, simulated: np.ndarray, level: float = 0.9) -> intervals.Interval:
        """The `Interval` around one rollout ``(T + 1, M)`` of this simulator."""
        lower, upper = self._bands(level).bounds(simulated, np.asarray(self.floor_, dtype=float))
        return intervals.Interval(lower, upper, level)

    def _bands(self, level: float) -> intervals.Bands:
        """The per-step quantiles of `level`, learned once per calibration and level."""
        self._check_calibrated()
        level = intervals.check_level(level)
        residuals = self.calibration_residuals_
        cache = getattr(self, "_bands_cache", None)
        if cache is None or cache[0] is not residuals:
            cache = self._bands_cache = (residuals, {})
        if level not in cache[1]:
            cache[1][level] = intervals.Bands.learn(
                np.asarray(residuals, dtype=np.float64),
                np.asarray(self.calibration_scale_, dtype=np.float64),
                level,
            )
        return cache[1][level]

    def objective_interval(
        self, simulated: np.ndarray, columns: np.ndarray, level: float = 0.9
    ) -> tuple[float, float]:
        """Interval of the mean final loss of test examples `columns` of one rollout
        ``(T + 1, M)`` (see `intervals.aggregate_offsets`)."""
        value = float(simulated[-1, columns].mean())
        return self.mean_loss_interval(value, columns, simulated.shape[0] - 1, level)

    def mean_loss_interval(
        self, value: float, columns: np.ndarray, step: int, level: float = 0.9
    ) -> tuple[float, float]:
        """Interval around `value`, a predicted mean loss of test examples `columns` after
        `step`: `value` plus `objective_offsets`, no lower than the mean of their floors."""
        floor = float(np.mean(np.broadcast_to(self.floor_, self.initial_loss_.shape)[columns]))
        return intervals.aggregate_bounds(
            value, self.objective_offsets(columns, step, level), floor
        )

    def objective_offsets(
        self, columns: np.ndarray, step: int, level: float = 0.9
    ) -> tuple[float, float]:
        """``(low, high)``: what to add to a simulated mean loss of `columns` after `step` to
        get its interval at `level` (`intervals.aggregate_offsets`)."""
        self._check_calibrated()
        return intervals.aggregate_offsets(
            np.asarray(self.calibration_residuals_, dtype=np.float64),
            np.asarray(columns),
            step,
            intervals.check_level(level),
        )

    def _check_calibrated(self) -> None:
        self._check_fitted()
        if not self.is_calibrated:
            raise intervals.NotCalibratedError(
                f"this {self.name} simulator has no predictive intervals: call calibrate(runs) "
                "(on the command line: `simfluence fit` calibrates unless --no-intervals)"
            )

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


def loss_floor(runs: RunSet) -> np.ndarray:
    """Shape ``(M,)``: the floor of every test example's simulated loss, ``min(0, lowest loss
    recorded for it in `runs`)``. Losses such as cross-entropy are never negative, so their
    floor is 0; a loss that can be negative keeps the lowest value recorded."""
    return np.minimum(0.0, _lowest(runs))


def _lowest(runs: RunSet) -> np.ndarray:
    # unscored losses (NaN, sparse runs) are ignored; step 0 is always scored
    lowest = np.min([np.nanmin(r.losses, axis=0) for r in runs.runs], axis=0)
    return np.where(np.isfinite(lowest), lowest, 0.0)


#: `soft_floor` bends losses below this share of the way from the floor to the lowest recorded
FLOOR_BEND = 0.01


def floor_width(runs: RunSet) -> np.ndarray:
    """Shape ``(M,)``: the width of `soft_floor`'s bend, `FLOOR_BEND` times how far above its
    floor each test example's lowest recorded loss lies (0 when a loss reached its floor)."""
    return FLOOR_BEND * np.maximum(_lowest(runs) - loss_floor(runs), 0.0)


def soft_floor(
    values: np.ndarray, floor: np.ndarray | float, width: np.ndarray | float
) -> np.ndarray:
    """Keep simulated losses above their floor without changing their order, in place;
    returns `values`.

    `values` has test examples on its last axis; `floor` and `width` are ``(M,)`` or scalars.
    A value at or above ``floor + width`` is unchanged; below, it bends toward the floor,
    ``floor + width**2 / (floor + 2 * width - value)``: continuous with slope 1 at the bend,
    always above the floor and strictly increasing (no underflow: a value of -1e6 still maps
    above the floor). Applied to what a simulator reports, after the rollout (which runs on its
    own, unconstrained state), it leaves the ranking of counterfactual curricula for a test
    example exactly as it was; a hard clip would tie them at the floor, and a floor inside the
    recursion changes the paths (both measured to cost LDS: docs/intervals.md). Where
    ``width`` is 0 it is a hard clip.
    """
    floor = np.broadcast_to(np.asarray(floor, dtype=np.float64), values.shape[-1:])
    width = np.broadcast_to(np.asarray(width, dtype=np.float64), values.shape[-1:])
    knee = floor + width
    below = values < knee
    if not below.any():
        return values
    cols = np.nonzero(below)[-1]
    w = width[cols]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bent = floor[cols] + w * w / (knee[cols] + w - values[below])
    values[below] = np.where(w > 0, bent, floor[cols])
    return values


def recorded_envelope(runs: RunSet) -> np.ndarray:
    """Shape ``(T_max + 1, M)``: per step and test example, the lowest loss recorded in any run
    of `runs` that reached that step."""
    longest = max(r.n_steps for r in runs.runs)
    envelope = np.full((longest + 1, len(runs.test_ids)), np.inf)
    for run in runs.runs:
        rows = run.losses.shape[0]
        envelope[:rows] = np.fmin(envelope[:rows], run.losses)
    return np.where(np.isfinite(envelope), envelope, -np.inf)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a simulator file")
