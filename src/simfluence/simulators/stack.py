"""``stack``: several simulators' rollouts, weighted per test example and stage of training.

No single simulator wins everywhere: on AdamW runs the hybrid fits the loss best where it is
large, its log-space twin ranks the small final losses best, and the curriculum-blind mean
trajectory steadies test examples that no curriculum moves (`benchmarks/results/adamw-*.json`).
Stacking (Wolpert 1992; Breiman 1996) combines them by the protocol's own error: for test
example ``j`` and step ``t`` of a curriculum of ``T`` steps,

    L_t(j) = sum_k w_{b(t), j, k} L^k_t(j),   b(t) = floor(B (t - 1) / T),

the ``K`` members' rollouts ``L^k`` weighted on the simplex (non-negative, summing to 1), one
weight vector per test example and per block ``b`` of ``B`` equal stretches of training. The
weights minimize the squared error of the members' free-running rollouts of held-out runs
(run-wise cross-validation, the refits of `Simulator.calibrate`), exactly (`simplex_least_squares`),
shrunk toward the weights shared by all test examples:

    w_{b, j} = argmin_w  (w Q_bj w - 2 q_bj w) + lam (w Qbar_b w - 2 qbar_b w),

``Q_bj``, ``q_bj`` the moments of test example ``j``'s held-out errors in block ``b`` and
``Qbar_b``, ``qbar_b`` their mean over test examples. ``B`` (`STACK_BLOCKS`) and ``lam``
(`STACK_SHRINKAGE`) are chosen by cross-fitting: the weights of each fold are fitted on the
other folds' rollouts and scored on its own, so the stack's score (all-steps MSE) is held out
like its members'. `auto` fits the members once and stacks them when that scores best.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.metrics import all_steps_mse
from simfluence.runlog.runs import AnyCurriculum, RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.candidates import (
    CANDIDATE_CLASSES,
    ComposedSimulator,
    FittedCandidates,
    check_candidates,
    fit_candidates,
    fit_summary,
)

#: the members `stack` fits by default (`hybrid` ones only with example features)
STACK_MEMBERS: tuple[str, ...] = ("linear", "hybrid", "log-linear", "log-hybrid", "mean")
#: numbers of equal stretches of training with their own weights, chosen by cross-fitting
STACK_BLOCKS: tuple[int, ...] = (1, 2, 4)
#: strengths of the shrinkage toward weights shared by all test examples, chosen alike
STACK_SHRINKAGE: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0)
#: learned attributes of member ``k`` are saved under the prefix ``member<k>__``
MEMBER_PREFIX = "member{}__"
_MEMBER_KEY = re.compile(r"member\d+__")


def simplex_least_squares(Q: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per row, the exact minimizer of ``w Q w - 2 q w`` over the simplex.

    Args:
        Q: ``(N, K, K)``, symmetric positive semi-definite.
        q: ``(N, K)``.

    Returns:
        ``(N, K)``: non-negative weights summing to 1 per row. The minimizer lies inside one
        face of the simplex, where it solves that face's equality-constrained problem; every
        face (``2^K - 1`` supports, a few dozen for the members here) is solved in closed form,
        vectorized over rows, and the best feasible solution kept. Ties go to the smaller
        support met first (members in order).
    """
    n, k = q.shape
    scale = np.maximum(np.einsum("nkk->n", Q) / k, np.finfo(float).tiny)[:, None]
    Qs, qs = Q / scale[..., None], q / scale  # scale-free: the tolerances below are relative
    best = np.zeros((n, k))
    best[:, 0] = 1.0
    best_loss = np.full(n, np.inf)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            kkt = np.zeros((n, size + 1, size + 1))
            kkt[:, :size, :size] = Qs[:, s][:, :, s] + 1e-12 * np.eye(size)
            kkt[:, :size, size] = kkt[:, size, :size] = 1.0
            rhs = np.concatenate([qs[:, s], np.ones((n, 1))], axis=1)
            solution = _solve(kkt, rhs)
            w = np.zeros((n, k))
            w[:, s] = solution[:, :size]
            feasible = (w[:, s] >= -1e-10).all(axis=1) & np.isfinite(w).all(axis=1)
            w = np.clip(w, 0.0, None)
            w /= np.maximum(w.sum(axis=1, keepdims=True), np.finfo(float).tiny)
            loss = np.einsum("nk,nkl,nl->n", w, Qs, w) - 2 * np.einsum("nk,nk->n", qs, w)
            margin = 1e-12 * np.maximum(np.abs(np.where(feasible, loss, 0.0)), 1.0)
            better = feasible & (loss < best_loss - margin)
            best[better], best_loss[better] = w[better], loss[better]
    return best


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched ``a x = b`` (``(N, n, n)``, ``(N, n)``); singular systems by least squares."""
    try:
        return np.linalg.solve(a, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(m, v, rcond=None)[0] for m, v in zip(a, b, strict=True)])


def step_blocks(n_steps: int, blocks: int) -> np.ndarray:
    """``(n_steps,)``: the block ``floor(B (t - 1) / T)`` of steps ``t = 1..T``."""
    return (blocks * np.arange(n_steps)) // max(n_steps, 1)


def block_moments(
    sides: Sequence[Sequence[np.ndarray]], true: Sequence[np.ndarray], blocks: int
) -> tuple[np.ndarray, np.ndarray]:
    """The moments of the held-out errors, per run.

    Args:
        sides: ``K`` members' rollouts of ``R`` runs, each ``(T_r + 1, M)``.
        true: the ``R`` recorded trajectories (NaN: not scored, left out).
        blocks: ``B``.

    Returns:
        ``Q`` ``(R, B, M, K, K)`` and ``q`` ``(R, B, M, K)``: the squared error of run ``r``'s
        block ``b`` of test example ``j`` under weights ``w`` is ``w Q w - 2 q w`` plus a
        constant. Step 0 (the given start) is left out.
    """
    n_runs, n_tests, k = len(true), true[0].shape[1], len(sides)
    Q = np.zeros((n_runs, blocks, n_tests, k, k))
    q = np.zeros((n_runs, blocks, n_tests, k))
    for r, y in enumerate(true):
        x = np.stack([side[r][1:] for side in sides])  # (K, T, M)
        seen = ~np.isnan(y[1:])
        x, target = np.where(seen, x, 0.0), np.where(seen, y[1:], 0.0)
        which = step_blocks(len(target), blocks)
        for b in range(blocks):
            rows = which == b
            Q[r, b] = np.einsum("atm,btm->mab", x[:, rows], x[:, rows])
            q[r, b] = np.einsum("atm,tm->ma", x[:, rows], target[rows])
    return Q, q


def stack_weights(Q: np.ndarray, q: np.ndarray, shrinkage: float) -> np.ndarray:
    """``(B, M, K)`` weights from summed moments ``Q`` ``(B, M, K, K)``, ``q`` ``(B, M, K)``,
    shrunk toward the test examples' shared weights with strength `shrinkage`."""
    shared_Q, shared_q = Q.mean(axis=1, keepdims=True), q.mean(axis=1, keepdims=True)
    Q, q = Q + shrinkage * shared_Q, q + shrinkage * shared_q
    b, m, k = q.shape
    return simplex_least_squares(Q.reshape(b * m, k, k), q.reshape(b * m, k)).reshape(b, m, k)


def combine(rollouts: Sequence[np.ndarray], weight: np.ndarray) -> np.ndarray:
    """One curriculum's stacked trajectory: ``K`` members' ``(T + 1, M)`` rollouts weighted by
    ``weight`` ``(B, M, K)`` per block of steps; row 0 is the first member's (the start)."""
    x = np.stack(rollouts)  # (K, T + 1, M)
    out = x[0].copy()
    which = step_blocks(x.shape[1] - 1, weight.shape[0])
    out[1:] = np.einsum("ktm,tmk->tm", x[:, 1:], weight[which])
    return out


@dataclass(frozen=True)
class StackChoice:
    """The weights chosen by cross-fitting: ``blocks`` ``B``, ``shrinkage``, the held-out
    all-steps MSE ``cv_mse`` of the cross-fitted stack, its rollouts ``held_out`` (one per
    run, each weighted by the other folds' weights), and ``weight`` ``(B, M, K)`` fitted on
    every held-out rollout."""

    blocks: int
    shrinkage: float
    cv_mse: float
    weight: np.ndarray
    held_out: list[np.ndarray]


def choose_stack(
    sides: Sequence[Sequence[np.ndarray]], true: Sequence[np.ndarray], folds: Sequence[int]
) -> StackChoice:
    """Choose ``B`` and the shrinkage by cross-fitting over the runs' `folds` (fold index of
    each run of `true`), then fit the weights on every run."""
    folds_arr = np.asarray(folds)
    best: tuple[float, int, float, list[np.ndarray]] | None = None
    moments = {}
    for blocks in STACK_BLOCKS:
        Q, q = moments[blocks] = block_moments(sides, true, blocks)
        for shrinkage in STACK_SHRINKAGE:
            predicted: list[np.ndarray] = [np.empty(0)] * len(true)
            for fold in np.unique(folds_arr):
                rest = folds_arr != fold
                weight = stack_weights(Q[rest].sum(axis=0), q[rest].sum(axis=0), shrinkage)
                for r in np.flatnonzero(~rest):
                    predicted[r] = combine([side[r] for side in sides], weight)
            score = float(all_steps_mse(true, predicted).mean)
            if best is None or score < best[0]:
                best = (score, blocks, shrinkage, predicted)
    assert best is not None
    score, blocks, shrinkage, predicted = best
    Q, q = moments[blocks]
    weight = stack_weights(Q.sum(0), q.sum(0), shrinkage)
    return StackChoice(blocks, shrinkage, score, weight, predicted)


def _pinned_params(member: Simulator) -> dict[str, Any]:
    """A fitted member's constructor arguments with the hyperparameters it chose pinned (as
    calibration's refits take them), its ``unseen`` policy kept as given."""
    params = member._calibration_params()
    if "unseen" in params:
        params["unseen"] = member.get_params()["unseen"]
    return params


class StackSimulator(ComposedSimulator, Simulator):
    """Several simulators' rollouts weighted per test example and stretch of training.

    Parameters:
        members: method names to stack (`simulators.candidates.CANDIDATE_CLASSES`); the
            ``hybrid`` ones are left out on run sets without example features, and any member
            whose fit fails is left out and reported.
        cv_folds: folds of whole training runs whose held-out rollouts weigh the members.
        memory, unseen, cv_tests: passed to the members that take them (as `auto` does).

    Learned attributes:
        members_: the names of the members kept (at least one weight above zero).
        member_params_: their constructor arguments (hyperparameters pinned).
        weight_: ``(B, M, K)``, the weights of block ``b``, test example ``j``, member ``k``
            (non-negative, summing to 1 over ``k``).
        shrinkage_: the shrinkage chosen; cv_mse_: the cross-fitted held-out all-steps MSE.
        skipped_: member -> why it was left out.
        the members' own, saved with the prefix ``member<k>__``.
    """

    name = "stack"

    def __init__(
        self,
        members: Sequence[str] = STACK_MEMBERS,
        cv_folds: int = 5,
        memory: str | float = "auto",
        unseen: str = "error",
        cv_tests: int | None = None,
    ) -> None:
        self.members = list(members)
        self.cv_folds = cv_folds
        self.memory = memory
        self.unseen = unseen
        self.cv_tests = cv_tests

    def _fit(self, runs: RunSet) -> None:
        check_candidates(self.members, self.name)
        if len(runs.runs) < 2 or self.cv_folds < 2:
            raise SimfluenceError(
                f"{self.name}: weighing members by cross-validation needs at least 2 training "
                f"runs and 2 folds (got {len(runs.runs)} runs, cv_folds={self.cv_folds})"
            )
        options = {"memory": self.memory, "unseen": self.unseen, "cv_tests": self.cv_tests}
        fitted = fit_candidates(runs, self.members, self.cv_folds, options)
        if not fitted.fitted:
            raise SimfluenceError(f"{self.name}: no member could be fitted ({fitted.skipped})")
        self.adopt(fitted, list(fitted.fitted))

    def adopt(self, fitted: FittedCandidates, names: Sequence[str]) -> StackSimulator:
        """Stack the members `names` of `fitted` (fitted on the runs this simulator is being
        fitted on; `auto` passes its own candidates): choose and fit the weights, drop the
        members that no weight uses. Returns self."""
        sides = [fitted.held_out[n] for n in names]
        choice = choose_stack(sides, fitted.true, fitted.folds)
        used = choice.weight.max(axis=(0, 1)) > 0
        keep = [n for n, u in zip(names, used, strict=True) if u]
        self.members_ = keep
        self.member_params_ = [_pinned_params(fitted.fitted[n]) for n in keep]
        self.weight_ = choice.weight[:, :, used]
        self.shrinkage_ = choice.shrinkage
        self.cv_mse_ = choice.cv_mse
        self.skipped_ = dict(fitted.skipped)
        self._members = [fitted.fitted[n] for n in keep]
        self._cv = (fitted.run_ids, fitted.n_folds, fitted.true, choice.held_out)
        return self

    # -- the members ---------------------------------------------------------------------------
    @property
    def fitted_members(self) -> list[Simulator]:
        """The fitted members, in the order of ``members_`` (rebuilt after loading)."""
        self._check_fitted()
        if getattr(self, "_members", None) is None:
            self._members = self._rebuild_members()
        return self._members

    def _rebuild_members(self) -> list[Simulator]:
        """The members from their saved names, parameters and ``member<k>__`` attributes; a
        file whose members are not candidate methods, or do not match the weights, is a
        `SimfluenceError`."""
        names, params_list = list(self.members_), list(self.member_params_)
        shape = np.shape(self.weight_)
        if len(names) != len(params_list) or len(shape) != 3 or shape[2] != len(names):
            raise SimfluenceError(
                f"{self.name}: the saved members ({len(names)} names, {len(params_list)} "
                f"parameter sets) do not match the weights of shape {shape}"
            )
        members = []
        for k, (name, params) in enumerate(zip(names, params_list, strict=True)):
            if name not in CANDIDATE_CLASSES or not isinstance(params, dict):
                raise SimfluenceError(
                    f"{self.name}: saved member {k} is {name!r}, not one of "
                    f"{', '.join(CANDIDATE_CLASSES)} with its parameters"
                )
            try:
                member = CANDIDATE_CLASSES[name](**params)
            except TypeError as exc:
                raise SimfluenceError(f"{self.name}: saved member {k} ({name}): {exc}") from None
            prefix = MEMBER_PREFIX.format(k)
            for key, value in vars(self).items():
                if key.startswith(prefix):
                    setattr(member, key[len(prefix) :], value)
            members.append(member)
        return members

    def _fitted_members(self) -> list[Simulator]:
        return [getattr(m, "inner", m) for m in self.fitted_members]

    def mean_weights(self) -> dict[str, float]:
        """Member -> its weight averaged over test examples and blocks."""
        self._check_fitted()
        return dict(zip(self.members_, self.weight_.mean(axis=(0, 1)).tolist(), strict=True))

    def describe(self) -> str:
        """One line: the members with their mean weights and what each chose, the blocks and
        the shrinkage (``stack of hybrid 0.54 (memory 0.8+lr, l2 3), mean 0.08; 4 blocks,
        shrinkage 10``)."""
        parts = []
        for member, (name, w) in zip(self.fitted_members, self.mean_weights().items(), strict=True):
            summary = fit_summary(member)
            parts.append(f"{name} {w:.2f}" + (f" ({summary})" if summary else ""))
        blocks = self.weight_.shape[0]
        return (
            f"stack of {', '.join(parts)}; {blocks} block{'s' if blocks > 1 else ''}, "
            f"shrinkage {self.shrinkage_:g}"
        )

    # -- simulating ----------------------------------------------------------------------------
    def _simulate_many(
        self, curricula: Sequence[AnyCurriculum], initial: np.ndarray
    ) -> list[np.ndarray]:
        rollouts = [m.simulate_many(curricula, initial) for m in self.fitted_members]
        return [combine([r[c] for r in rollouts], self.weight_) for c in range(len(curricula))]

    def _calibration_rollouts(
        self, runs: RunSet, n_folds: int
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[Simulator]]:
        """On the runs it was fitted on (same folds): the cross-fitted rollouts of the fit
        itself (members held out, weights from the other folds), with no refit; otherwise
        refits, as every simulator."""
        cached = getattr(self, "_cv", None)
        if cached is not None and (cached[0], cached[1]) == (
            sorted(runs.run_ids),
            min(n_folds, len(runs.runs)),
        ):
            return list(cached[2]), list(cached[3]), []
        return super()._calibration_rollouts(runs, n_folds)

    # -- persistence ---------------------------------------------------------------------------
    def _learned(self) -> dict[str, Any]:
        own = {k: v for k, v in super()._learned().items() if not _MEMBER_KEY.match(k)}
        for k, member in enumerate(self.fitted_members):
            prefix = MEMBER_PREFIX.format(k)
            own |= {prefix + key: value for key, value in member._learned().items()}
        return own


__all__ = [
    "STACK_BLOCKS",
    "STACK_MEMBERS",
    "STACK_SHRINKAGE",
    "StackChoice",
    "StackSimulator",
    "choose_stack",
    "simplex_least_squares",
]
