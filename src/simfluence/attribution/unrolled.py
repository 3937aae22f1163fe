"""Exact attribution for one recorded run: metagradients through the whole training run.

The question "which consumptions of which training examples moved this test loss, in *this*
run?" has an exact first-order answer: give every consumption ``c`` (training example ``i``
consumed at step ``t``) a loss weight ``w_c`` (1 in the recorded run), so that step ``t``
minimises ``sum_{c in batch t} w_c loss_c / |batch t|``, and differentiate each test example's
final loss through the whole run:

    G[z, c] = d L_T(z) / d w_c   at w = 1.

This is the metagradient of REPLAY / MAGIC (Ilyas & Engstrom, 2025). It is computed here by
replaying the run from its step-0 checkpoint with the `Task` (`simfluence.attribution.replay`)
and walking back with the adjoint ``a_t = dL_T(z) / d theta_t``, for all test examples at once:
``a_{t-1} = a_t - eta_t H_t a_t`` and ``G[z, c] = -(eta_t / |batch t|) a_t . grad
loss_c(theta_{t-1})``, with ``H_t`` the *exact* Hessian of step ``t``'s batch loss (no
Gauss-Newton or Fisher approximation, no checkpoint sampling). The steps are grouped in
segments: each segment's SGD steps are rebuilt as one autograd graph of its start parameters
and its consumption weights (gradients taken with ``create_graph``), and one backward pass
batched over the test examples (``is_grads_batched``) returns both the adjoints at the segment's
start and the segment's ``G``. Small models take the whole run as one segment (fastest); large
ones one step at a time, with test examples in chunks (memory). Cost: a replay plus, per
segment, one differentiable re-run and one batched double-backward pass: measured in the
README (about 3x one recorded training run on digits-mlp for all 50 test examples). The
reverse pass costs in proportion to the number of test examples: ask only for those needed.

Signs (the convention of `simfluence.counterfactual`): the first-order effect of removing
example ``i`` is ``effect_i = L_T(with) - L_T(without) ~ sum_{c of i} G[z, c]`` for the
"zero-weight" removal (the example stays in its batch with weight 0); **negative = consuming
it lowered the final loss (helpful)**. The "renormalize" removal (drop it, re-average the batch
as `simfluence.curricula.remove` and real retraining on a shorter list do) shifts weight to its
batch mates: ``effect_i ~ sum_t [G[z, (t, i)] - n_ti / (|c_t| - n_ti) sum_{j in c_t, j != i}
G[z, (t, j)]]``. Both are first-order: exact for small effects, an approximation for large
ones (measured against actual retraining in the README).

The replay must reproduce the recorded run: the parameters are compared with every saved
checkpoint and the final test losses with the recorded ones, and a mismatch is an error (runs
are bit-deterministic on the same machine; replaying a run recorded elsewhere may differ in the
last bits, hence a tolerance). Only plain SGD is replayed (what the built-in workloads train
with); any other optimizer is refused by name.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from simfluence.attribution.optimizers import State
from simfluence.attribution.probes import probe_schedule
from simfluence.attribution.replay import (
    REPLAY_TOLERANCE,
    Replay,
    ReplayError,
    batch_inputs,
    check_final_losses,
    load_recorded_run,
    replay_optimizer,
    replay_parameters,
)
from simfluence.attribution.run_effects import RunEffectsSimulator
from simfluence.attribution.segment import Segment
from simfluence.counterfactual.attribution import REMOVALS, check_removal
from simfluence.errors import SimfluenceError
from simfluence.recording.loop import SMALL_MODEL_PARAMS, torch_threads
from simfluence.recording.task import Examples, Task
from simfluence.runlog.runs import RunSet

__all__ = [
    "REMOVALS",
    "Metagradients",
    "UnrolledSimulator",
    "run_metagradients",
    "unrolled_metagradients",
]


@dataclass
class Metagradients:
    """Per-consumption metagradients of one run's final test losses.

    Attributes:
        test_ids: the ``M`` test examples (rows).
        steps: shape ``(C,)``, the 1-based step of each consumption (column).
        train_ids: length ``C``, the training id of each consumption.
        batch_sizes: shape ``(T,)``, ``|c_t|``.
        grads: shape ``(M, C)``, ``d L_T(z) / d w_c`` at ``w = 1``; negative = more weight on
            that consumption lowers ``z``'s final loss.
        final_loss: shape ``(M,)``, the replayed final test losses.
        replay_error: max |replayed - recorded| over the checks made (0.0 = bit-identical).
        seconds: wall time of the replay and reverse pass.
        probe_ids, probe_steps, probe_grads: the zero-weight probes of examples the run did not
            consume (`simfluence.attribution.probes`; empty without them): length ``P``,
            shape ``(P,)`` (1-based steps), shape ``(M, P)`` (``d L_T / d w`` at weight 0:
            the first-order effect of adding that consumption; negative = helpful).
    """

    test_ids: list[str]
    steps: np.ndarray
    train_ids: list[str]
    batch_sizes: np.ndarray
    grads: np.ndarray
    final_loss: np.ndarray
    replay_error: float = 0.0
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    probe_ids: list[str] = field(default_factory=list)
    probe_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    probe_grads: np.ndarray | None = None

    def addition_effects(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(ids (N,), E (M, N), probes (N,))``: for each probed example (one the run did not
        consume), first-order ``L_T(with its probes as real consumptions) - L_T(as run)``,
        and how many probes that sums; negative = adding it lowers the final loss."""
        ids = sorted(set(self.probe_ids))
        if not ids or self.probe_grads is None:
            return [], np.zeros((len(self.test_ids), 0)), np.zeros(0)
        column = {i: k for k, i in enumerate(ids)}
        owner = np.array([column[i] for i in self.probe_ids])
        effects = np.zeros((len(self.test_ids), len(ids)))
        np.add.at(effects.T, owner, self.probe_grads.T)
        return ids, effects, np.bincount(owner, minlength=len(ids)).astype(np.float64)

    def distinct_ids(self) -> list[str]:
        """The distinct training ids, sorted (the columns of `effects`)."""
        return sorted(set(self.train_ids))

    def effects(self, removal: str = "zero-weight") -> tuple[list[str], np.ndarray]:
        """First-order leave-one-out effects ``L_T(with) - L_T(without)`` of every distinct id.

        Returns ``(ids, E)`` with ``E`` of shape ``(M, N)``; negative = helpful. `removal`:
        ``"zero-weight"`` (kept in its batches at weight 0) or ``"renormalize"`` (dropped, its
        batch mates re-averaged); see the module docstring.
        """
        ids = self.distinct_ids()
        return ids, self.removal_effects([[i] for i in ids], removal)

    def removal_effects(
        self, groups: Sequence[Collection[str]], removal: str = "zero-weight"
    ) -> np.ndarray:
        """Shape ``(M, G)``: first-order ``L_T(with) - L_T(without group g)``.

        Removing a group changes the consumption weights by ``dw``: ``-1`` for each of its
        consumptions, and with ``"renormalize"`` ``+k / (|c_t| - k)`` for the batch mates of
        the ``k`` removed ones in batch ``t`` (a batch left empty gets weight 0 throughout);
        the effect is ``-G @ dw``.
        """
        check_removal(removal)
        delta = np.zeros((len(self.train_ids), len(groups)))
        bounds = np.concatenate([[0], np.cumsum(self.batch_sizes)])
        owner = np.array(self.train_ids)
        for g, group in enumerate(groups):
            gone = np.isin(owner, [str(i) for i in group])
            delta[gone, g] = -1.0
            if removal == "renormalize":
                for t in np.unique(self.steps[gone]) - 1:
                    batch = slice(bounds[t], bounds[t + 1])
                    k = int(gone[batch].sum())
                    size = int(self.batch_sizes[t])
                    mates = np.flatnonzero(~gone[batch]) + bounds[t]
                    delta[mates, g] = k / (size - k) if k < size else 0.0
        return -(self.grads @ delta)

    def step_effects(self) -> np.ndarray:
        """Shape ``(M, T)``: the summed metagradient of each step's consumptions ("where in
        training" the final loss was made; zero-weight units)."""
        out = np.zeros((len(self.test_ids), self.batch_sizes.size))
        np.add.at(out.T, self.steps - 1, self.grads.T)
        return out


def unrolled_metagradients(
    task: Task,
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    pool: Examples,
    tests: Examples,
    curriculum: Sequence[Sequence[str]],
    lrs: Sequence[float],
    *,
    recorded_final_loss: np.ndarray | None = None,
    saved: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    tolerance: float = REPLAY_TOLERANCE,
    segment: int | None = None,
    test_chunk: int | None = None,
    seed: int | None = None,
    progress: bool | None = None,
    optimizer: dict[str, Any] | None = None,
    max_grad_norm: float | None = None,
    probes: Sequence[Sequence[str]] | None = None,
) -> Metagradients:
    """Metagradients ``d L_T(z) / d w_c`` of every test example w.r.t. every consumption.

    Args:
        task, model: the workload and an instance of its architecture (weights unused).
        checkpoint: the model's ``state_dict`` at step 0 of the run.
        pool, tests: the run set's examples (``Task.prepare``).
        curriculum: the run's ``T`` batches of training ids.
        lrs: shape ``(T,)``, the learning rate of each step.
        recorded_final_loss: shape ``(M,)``; when given, the replayed final test losses must
            match within `tolerance` (`ReplayError` otherwise).
        saved: ``{step: state_dict}`` of saved checkpoints; each must match the replay.
        segment: steps differentiated through in one autograd graph. Longer segments are
            faster (one batched backward pass per segment) and hold more memory (the
            double-backward graph of every step in it). Default: the whole run for models under
            a million parameters, one step otherwise.
        test_chunk: test examples whose adjoints go back through a segment at once (memory
            grows with it). Default: all of them for models under a million parameters, 10
            otherwise.
        seed: the run's seed (``torch.manual_seed`` before training), for tasks with dropout.
        progress: a progress bar over the reverse pass (default: for large models only).
        optimizer: the recorded optimizer description (``config["optimizer"]``; None: the
            task's own). SGD (with or without momentum and weight decay), Adam and AdamW are
            differentiated through exactly, their moments included (MAGIC's metagradient);
            others are refused by name.
        max_grad_norm: the recorded gradient clipping (None: none), differentiated through.
        probes: per step, training ids consumed there at weight 0 (`simfluence.attribution.
            probes`): the run is unchanged, and their metagradients come back as
            ``probe_grads``.

    Returns:
        `Metagradients` with ``grads`` of shape ``(M, C)``, ``C`` the number of consumptions.
    """
    started = time.perf_counter()
    curriculum = [list(b) for b in curriculum]
    if len(lrs) != len(curriculum) or not curriculum:
        raise ReplayError(f"{len(lrs)} learning rates for {len(curriculum)} steps")
    lrs = [float(v) for v in lrs]
    update = replay_optimizer(task, model, lrs[0], optimizer, max_grad_norm)
    rule = None if update.is_plain_sgd else update  # plain SGD keeps the stateless graph
    replay = Replay(task, model, checkpoint)
    batches = batch_inputs(pool, curriculum)
    n_steps = len(curriculum)
    probes = [list(p) for p in probes] if probes is not None else [[] for _ in curriculum]
    if len(probes) != n_steps:
        raise ReplayError(f"{len(probes)} probe lists for {n_steps} steps")
    probed = batch_inputs(pool, probes)
    probe_inputs = [b if p else None for b, p in zip(probed, probes, strict=True)]
    small = sum(t.numel() for t in replay.start.values()) < SMALL_MODEL_PARAMS
    if segment is None:
        segment = n_steps if small else 1
    test_chunk = max(1, test_chunk or (len(tests) if small else 10))
    segment = max(1, min(int(segment), n_steps))
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.train()  # the run trained in train mode
    try:
        start_state: State = {} if rule is None else rule.initial_state(replay.start)
        if segment == n_steps:
            # one segment: its differentiable forward is the replay (and is checked as one)
            whole = Segment(
                replay, replay.start, start_state, batches, lrs, 1, rule, None, saved, tolerance,
                probe_inputs,
            )  # fmt: skip
            kept, error = {0: replay.start, n_steps: whole.end}, whole.error
            states, rng = {0: start_state, n_steps: whole.end_state}, []
        else:
            trace = replay_parameters(
                replay,
                batches,
                lrs,
                optimizer=rule,
                keep=lambda t: t % segment == 0,
                saved=saved,
                tolerance=tolerance,
            )
            kept, states, rng, error = trace.kept, trace.states, trace.rng, trace.error
        final_loss = replay.test_losses(kept[n_steps], tests)
        error = max(error, check_final_losses(final_loss, recorded_final_loss, tolerance))
        adjoint = replay.example_gradients(kept[n_steps], tests)  # name -> (M, *shape)
        adjoint_state: list[torch.Tensor] | None = None  # the final loss ignores the state
        sizes = np.array([len(b) for b in curriculum])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        out = np.zeros((len(tests), int(offsets[-1])))
        probe_sizes = np.array([len(p) for p in probes])
        probe_offsets = np.concatenate([[0], np.cumsum(probe_sizes)])
        probe_out = np.zeros((len(tests), int(probe_offsets[-1])))
        bar = tqdm(
            list(pairwise(sorted(kept, reverse=True))),
            desc="unrolled: reverse pass",
            unit="segment",
            disable=not (progress if progress is not None else not small),
            leave=False,
        )
        for stop, start in bar:
            if segment == n_steps:
                graph = whole
            else:
                graph = Segment(
                    replay,
                    kept[start],
                    states[start],
                    batches[start:stop],
                    lrs[start:stop],
                    start + 1,
                    rule,
                    rng[start:stop],
                    probes=probe_inputs[start:stop],
                )
            adjoint, adjoint_state, g_w, g_p = graph.pull_back(adjoint, adjoint_state, test_chunk)
            out[:, offsets[start] : offsets[stop]] = g_w
            probe_out[:, probe_offsets[start] : probe_offsets[stop]] = g_p
    finally:
        model.train(was_training)
    return Metagradients(
        test_ids=list(tests.ids),
        steps=np.repeat(np.arange(1, n_steps + 1), sizes),
        train_ids=[i for b in curriculum for i in b],
        batch_sizes=sizes,
        grads=out,
        final_loss=final_loss,
        replay_error=error,
        seconds=time.perf_counter() - started,
        info={"segment": segment, "optimizer": update.name},
        probe_ids=[i for p in probes for i in p],
        probe_steps=np.repeat(np.arange(1, n_steps + 1), probe_sizes),
        probe_grads=probe_out,
    )


def run_metagradients(
    runs: RunSet,
    run_id: str,
    *,
    workload: str | None = None,
    directory: str | None = None,
    tolerance: float = REPLAY_TOLERANCE,
    segment: int | None = None,
    num_threads: int | None = None,
    test_ids: Sequence[str] | None = None,
    probe_unconsumed: bool = False,
) -> Metagradients:
    """`unrolled_metagradients` of run `run_id` of a run set recorded with a step-0
    checkpoint (``simfluence record --checkpoints 0,...``); the replay is checked against the
    recorded final losses and every saved checkpoint. `test_ids`: only these test examples
    (the reverse pass costs in proportion to their number; default: all).
    `probe_unconsumed`: also probe the pool examples the run did not consume
    (`simfluence.attribution.probes.probe_schedule`)."""
    rec = load_recorded_run(runs, run_id, workload=workload, directory=directory)
    columns = np.arange(len(rec.tests))
    if test_ids is not None:
        index = {t: j for j, t in enumerate(rec.tests.ids)}
        unknown = [t for t in test_ids if t not in index]
        if unknown:
            raise SimfluenceError(f"unknown test id {unknown[0]!r} for run set {runs.source}")
        columns = np.array([index[t] for t in test_ids])
    with torch_threads(rec.model, num_threads):
        return unrolled_metagradients(
            rec.task,
            rec.model,
            rec.checkpoint,
            rec.pool,
            rec.tests.subset(columns.tolist()),
            rec.run.curriculum,
            rec.lrs,
            recorded_final_loss=rec.run.losses[-1][columns],
            saved=rec.saved,
            tolerance=tolerance,
            segment=segment,
            seed=rec.run.seed,
            optimizer=rec.optimizer,
            max_grad_norm=rec.max_grad_norm,
            probes=_probes(rec.run, rec.pool.ids) if probe_unconsumed else None,
        )


def _probes(run: Any, pool_ids: Sequence[str]) -> list[list[str]]:
    """The run's probes, drawn from its seed (its id's bytes when it has none)."""
    seed = run.seed if run.seed is not None else int.from_bytes(run.run_id.encode()[-8:], "big")
    return probe_schedule(run.curriculum, pool_ids, seed)


# -- as a simulator ---------------------------------------------------------------------------
#: the cache variant of a run's metagradients with probes
_PROBED = ("probes",)


class UnrolledSimulator(RunEffectsSimulator):
    """Metagradients as a method: exact for the recorded run, additive for other curricula.

    * For "this run" questions (`run_removal_effects`: what ``validate --kinds loo`` and
      ``attribute --method unrolled`` use) the answer is the run's own metagradients.
    * As a simulator of other curricula (``evaluate``, ``validate``), ``B_i(z)`` is the mean
      effect per consumption over up to `max_runs` recorded runs (`RunEffectsSimulator`).

    Parameters: as `GradientSimulator` (no projection: metagradients are exact), plus
    `segment` (see `unrolled_metagradients`) and `probe_unconsumed`: as a simulator, also
    probe in every averaged run the pool examples it did not consume (zero-weight
    consumptions, `simfluence.attribution.probes`), so each run gives every example an
    effect (on 50% subsets of digits-logreg, 8 runs averaged: LDS 0.867 -> 0.918).
    """

    name = "unrolled"

    def __init__(
        self,
        scaled: bool = False,
        max_runs: int | None = 8,
        workload: str | None = None,
        checkpoints_dir: str | None = None,
        unseen: str = "error",
        batch_weighting: str = "mean",
        segment: int | None = None,
        task: str | None = None,
        probe_unconsumed: bool = True,
    ) -> None:
        super().__init__(
            scaled=scaled,
            max_runs=max_runs,
            workload=workload,
            checkpoints_dir=checkpoints_dir,
            unseen=unseen,
            batch_weighting=batch_weighting,
            task=task,
        )
        self.segment = segment
        self.probe_unconsumed = probe_unconsumed

    def _run_key(self) -> tuple[Any, ...]:
        return (*super()._run_key(), self.segment)

    def _compute_run(
        self,
        runs: RunSet,
        run_id: str,
        test_ids: tuple[str, ...] | None,
        probe_unconsumed: bool = False,
    ) -> Metagradients:
        return run_metagradients(
            runs,
            run_id,
            workload=self.task or self.workload,
            directory=self.checkpoints_dir,
            segment=self.segment,
            test_ids=test_ids,
            probe_unconsumed=probe_unconsumed,
        )

    def _zero_weight_effects(self, answer: Metagradients) -> tuple[list[str], np.ndarray]:
        return answer.effects("zero-weight")

    def _fit_answer(self, runs: RunSet, run_id: str) -> Metagradients:
        if not self.probe_unconsumed:
            return self.run_answer(runs, run_id)
        probed = partial(self._compute_run, runs, run_id, None, probe_unconsumed=True)
        return self._cached(runs, run_id, None, _PROBED, probed)

    def _addition_effects(self, answer: Metagradients) -> tuple[list[str], np.ndarray, np.ndarray]:
        return answer.addition_effects()

    def metagradients(
        self, runs: RunSet, run_id: str, test_ids: Sequence[str] | None = None
    ) -> Metagradients:
        """The (cached) metagradients of run `run_id` of `runs` (`test_ids`: only those; the
        answer with probes when `fit` computed it: its consumptions' metagradients are the
        same)."""
        if test_ids is None:
            probed = self._cached_only(runs, run_id, _PROBED)
            if probed is not None:
                return probed
        return self.run_answer(runs, run_id, test_ids)

    def run_removal_effects(
        self,
        runs: RunSet,
        run_id: str,
        groups: Sequence[Collection[str]],
        removal: str = "zero-weight",
    ) -> np.ndarray:
        """Shape ``(M, G)``: first-order effects of removing each group from run `run_id`."""
        return self.metagradients(runs, run_id).removal_effects(groups, removal)
