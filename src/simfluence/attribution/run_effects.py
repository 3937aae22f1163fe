"""The base of the methods that answer for one recorded run by replaying it (``unrolled``,
``dvemb``, ``combined``): a cache of each run's answer, and ``B_i(z)`` for other curricula from
the runs' own answers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from simfluence.attribution.simulators import GradientSimulator
from simfluence.runlog.runs import RunSet


class RunEffectsSimulator(GradientSimulator):
    """Base of the methods that answer for one recorded run by replaying it (``unrolled``,
    ``dvemb``): subclasses compute a run's answer (`_compute_run`) and its zero-weight
    leave-one-out effects (`_zero_weight_effects`); this class caches the answers (small:
    ``M`` x consumptions; the fold copies of `calibrate` and several kinds of one validation
    reuse them) and, as a simulator of other curricula, sets ``B_i(z)`` to the mean over up to
    `max_runs` recorded runs of ``i``'s effect in that run divided by the times it was
    consumed there (an effect per consumption; Simfluence-Additive), and, from a run that
    probed the examples it did not consume (`_addition_effects`; ``unrolled``), their effect
    of being added, per probe.
    """

    #: "this run" answers come from the run itself: no fit needed for them
    answers_from_run = True

    def _compute_run(self, runs: RunSet, run_id: str, test_ids: tuple[str, ...] | None) -> Any:
        raise NotImplementedError

    def _zero_weight_effects(self, answer: Any) -> tuple[list[str], np.ndarray]:
        """``(distinct ids (N,), effects (M, N))`` of a run's answer, negative = helpful."""
        raise NotImplementedError

    def _run_key(self) -> tuple[Any, ...]:
        """What, besides the run, a run's answer depends on (for the cache)."""
        return (type(self).name, self.task or self.workload)

    def run_answer(self, runs: RunSet, run_id: str, test_ids: Sequence[str] | None = None) -> Any:
        """The (cached) answer for run `run_id` of `runs` (`test_ids`: only those)."""
        wanted = None if test_ids is None else tuple(test_ids)
        return self._cached(
            runs, run_id, wanted, (), partial(self._compute_run, runs, run_id, wanted)
        )

    def _answer_key(
        self, runs: RunSet, run_id: str, wanted: tuple[str, ...] | None, variant: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        source = str(self.checkpoints_dir or runs.source)
        return (source, run_id, wanted, *self._run_key(), *variant)

    def _cached(
        self,
        runs: RunSet,
        run_id: str,
        wanted: tuple[str, ...] | None,
        variant: tuple[Any, ...],
        compute: Callable[[], Any],
    ) -> Any:
        """The cached answer of this `variant` (a subclass's richer answer: ``()`` is the
        plain one), computed by `compute` when missing."""
        key = self._answer_key(runs, run_id, wanted, variant)
        if key not in _RUN_ANSWERS:
            if len(_RUN_ANSWERS) >= RUN_CACHE_SIZE:
                _RUN_ANSWERS.pop(next(iter(_RUN_ANSWERS)))
            _RUN_ANSWERS[key] = compute()
        return _RUN_ANSWERS[key]

    def _cached_only(self, runs: RunSet, run_id: str, variant: tuple[Any, ...]) -> Any | None:
        """The cached whole answer of this `variant`, or None (nothing is computed)."""
        return _RUN_ANSWERS.get(self._answer_key(runs, run_id, None, variant))

    def _fit_answer(self, runs: RunSet, run_id: str) -> Any:
        """The answer of a run that `fit` averages (default: `run_answer`)."""
        return self.run_answer(runs, run_id)

    def _addition_effects(self, answer: Any) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """``(ids, effects (M, N), times (N,))``: first-order effects of adding examples the
        run did not consume, summed over `times` consumptions each; None: the answer has
        none."""
        return None

    def _fit_parameters(self, runs: RunSet) -> None:
        index = runs.train_index
        total = np.zeros((len(runs.test_ids), len(runs.train_ids)))
        count = np.zeros(len(runs.train_ids))
        used = runs.runs[: self.max_runs] if self.max_runs else runs.runs
        for run in used:
            answer = self._fit_answer(runs, run.run_id)
            ids, effects = self._zero_weight_effects(answer)
            consumed = Counter(i for b in run.curriculum for i in b)
            cols = np.array([index[i] for i in ids])
            total[:, cols] += effects / np.array([consumed[i] for i in ids], dtype=np.float64)
            count[cols] += 1
            added = self._addition_effects(answer)
            if added is not None and added[0]:  # the examples this run did not consume
                cols = np.array([index[i] for i in added[0]])
                total[:, cols] += added[1] / added[2]
                count[cols] += 1
        self.runs_used_ = len(used)
        self.A_ = None
        self.seen_ = count > 0
        self.B_ = total / np.maximum(count, 1)
        self.scale_ = self._fit_scale(runs) if self.scaled else 1.0
        self.B_ = self.B_ * self.scale_


#: cached run answers of `RunEffectsSimulator`s, shared by the simulators of one process
RUN_CACHE_SIZE = 256
_RUN_ANSWERS: dict[tuple[Any, ...], Any] = {}
