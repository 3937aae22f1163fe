"""DVEmb ("data value embedding", Wang et al., ICLR 2025) through dattri, on a replayed run.

DVEmb estimates the trajectory-specific leave-one-out effect of every training example: the
per-example gradient of each consumption, propagated through the later steps with a
second-order correction built from the later steps' per-example gradients (a Gauss-Newton-like
``sum g g^T`` in place of the exact Hessian, which `simfluence.attribution.unrolled` uses).
This module is a thin adapter over ``dattri.algorithm.dvemb.DVEmbAttributor`` (``pip install
'simfluence[dattri]'``; dattri is imported inside the functions): the recorded run is replayed
bit for bit from its step-0 checkpoint (`simfluence.attribution.replay`), the attributor caches
every step's per-example gradients with the step's learning rate (dattri divides it by the
batch size: the batch-mean loss), and the test gradients are taken at the final parameters.

Sign and shape: dattri returns ``(n_train, n_test)`` scores where a positive score means that
consuming the example *lowered* the test loss. `dvemb_effects` returns the simfluence
convention instead: ``effects`` of shape ``(M, N)`` = ``L_T(with) - L_T(without)`` estimated
as ``-score``, **negative = helpful**, for the "zero-weight" removal (the example's
consumptions get weight 0 in unchanged batches), summed over all its consumptions.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from simfluence.attribution.replay import (
    REPLAY_TOLERANCE,
    Params,
    Replay,
    ReplayError,
    TaskLoss,
    batch_inputs,
    check_final_losses,
    check_plain_sgd,
    load_recorded_run,
    replay_parameters,
)
from simfluence.attribution.run_effects import RunEffectsSimulator
from simfluence.counterfactual.attribution import check_removal
from simfluence.errors import SimfluenceError
from simfluence.recording.loop import torch_threads
from simfluence.recording.task import Examples, Task
from simfluence.runlog.runs import RunSet

__all__ = ["DENSE_LIMIT", "DVEmbResult", "DVEmbSimulator", "dvemb_effects", "run_dvemb"]

#: above this many trainable parameters dattri's ``D x D`` matrix is out of reach: project
DENSE_LIMIT = 16_384
#: projection used above `DENSE_LIMIT` (dattri's Kronecker factorization of linear layers)
DEFAULT_PROJECTION = 4096
FACTORIZATIONS = ("none", "kronecker", "elementwise")
INSTALL_HINT = "DVEmb needs dattri: pip install 'simfluence[dattri]' (dattri>=0.3)"


@dataclass
class DVEmbResult:
    """DVEmb effects of one run.

    Attributes:
        test_ids: the ``M`` test examples (rows).
        train_ids: the ``N`` distinct training ids of the run, sorted (columns).
        effects: shape ``(M, N)``, estimated ``L_T(with) - L_T(without)``; negative = helpful.
        final_loss: shape ``(M,)``, the replayed final test losses.
        replay_error: max |replayed - recorded| over the checks made.
        seconds: wall time.
        info: the projection and factorization used.
    """

    test_ids: list[str]
    train_ids: list[str]
    effects: np.ndarray
    final_loss: np.ndarray
    replay_error: float
    seconds: float
    info: dict[str, Any]


def _import_dattri() -> tuple[Any, Any]:
    try:
        from dattri.algorithm.dvemb import DVEmbAttributor
        from dattri.task import AttributionTask
    except ImportError as exc:
        raise SimfluenceError(f"{INSTALL_HINT} ({exc})") from None
    return DVEmbAttributor, AttributionTask


def dvemb_effects(
    task: Task,
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    pool: Examples,
    tests: Examples,
    curriculum: Sequence[Sequence[str]],
    lrs: Sequence[float],
    *,
    projection_dim: int | None = None,
    factorization: str | None = None,
    projection_seed: int = 0,
    recorded_final_loss: np.ndarray | None = None,
    saved: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    tolerance: float = REPLAY_TOLERANCE,
    seed: int | None = None,
    optimizer: dict[str, Any] | None = None,
    max_grad_norm: float | None = None,
) -> DVEmbResult:
    """DVEmb leave-one-out effects of every distinct training id of a replayed run.

    Args:
        task, model, checkpoint, pool, tests, curriculum, lrs: as
            `simfluence.attribution.unrolled.unrolled_metagradients`.
        projection_dim: project gradients to this many dimensions (dattri's random
            projection). Default: none for models up to `DENSE_LIMIT` parameters, else
            `DEFAULT_PROJECTION`.
        factorization: dattri's ``factorization_type``: ``"none"`` (exact per-example
            gradients of all parameters), ``"kronecker"`` (the paper's; linear layers only)
            or ``"elementwise"``. Default: ``"none"`` up to `DENSE_LIMIT` parameters, else
            ``"kronecker"``.
        recorded_final_loss, saved, tolerance, seed: the replay checks (see `replay`).
        optimizer, max_grad_norm: the recorded optimizer description and clipping; DVEmb's
            formula assumes plain SGD, anything else is refused (`check_plain_sgd`).

    Returns:
        `DVEmbResult` with ``effects`` ``(M, N)``, negative = helpful.
    """
    started = time.perf_counter()
    DVEmbAttributor, AttributionTask = _import_dattri()
    curriculum = [list(b) for b in curriculum]
    lrs = [float(v) for v in lrs]
    if len(lrs) != len(curriculum) or not curriculum:
        raise ReplayError(f"{len(lrs)} learning rates for {len(curriculum)} steps")
    check_plain_sgd(task, model, lrs[0], optimizer, max_grad_norm)
    replay = Replay(task, model, checkpoint)
    dim = sum(t.numel() for t in replay.start.values())
    if factorization is None:
        factorization = "none" if dim <= DENSE_LIMIT else "kronecker"
    if factorization not in FACTORIZATIONS:
        raise SimfluenceError(
            f"factorization {factorization!r}: must be one of {', '.join(FACTORIZATIONS)}"
        )
    if projection_dim is None and dim > DENSE_LIMIT:
        projection_dim = DEFAULT_PROJECTION
    work = copy.deepcopy(model)  # dattri reads the live parameters of its model: loaded per step
    keys = sorted(pool.tensors)
    row_of = {i: r for r, i in enumerate(pool.ids)}
    attributor = DVEmbAttributor(
        AttributionTask(_loss_function(task, work, keys, factorization), work, {}),
        proj_dim=projection_dim,
        proj_seed=projection_seed,
        factorization_type=factorization,
    )
    batches = batch_inputs(pool, curriculum)

    def cache_step(t: int, params: Params) -> None:
        _load(work, params)
        inputs = batches[t - 1]
        attributor.cache_gradients(
            0,
            tuple(inputs[k] for k in keys),
            torch.tensor([row_of[i] for i in curriculum[t - 1]]),
            lrs[t - 1],
        )

    if seed is not None:
        torch.manual_seed(seed)
    was_training = work.training
    work.train()
    trace = replay_parameters(
        replay,
        batches,
        lrs,
        keep=lambda t: False,
        saved=saved,
        tolerance=tolerance,
        before_step=cache_step,
    )
    final, error = trace.kept[len(curriculum)], trace.error
    final_loss = replay.test_losses(final, tests)
    error = max(error, check_final_losses(final_loss, recorded_final_loss, tolerance))
    _load(work, final)
    attributor.cache()
    test_data = [
        tuple(tests.take(range(s, min(s + 64, len(tests))))[k] for k in keys)
        for s in range(0, len(tests), 64)
    ]
    scores = attributor.attribute(test_data).detach().to(torch.float64).numpy()  # (rows, M)
    work.train(was_training)
    ids = sorted({i for b in curriculum for i in b})
    rows = [row_of[i] for i in ids]
    return DVEmbResult(
        test_ids=list(tests.ids),
        train_ids=ids,
        effects=-scores[rows].T,
        final_loss=final_loss,
        replay_error=error,
        seconds=time.perf_counter() - started,
        info={"projection_dim": projection_dim, "factorization": factorization},
    )


def _loss_function(task: Task, model: nn.Module, keys: list[str], factorization: str) -> Any:
    """The loss in the form dattri's DVEmb asks for: ``f(params, data)`` of one example
    (vmapped by dattri) without factorization, ``f(model, data, device)`` of a batch (mean
    loss) with it."""
    from torch.func import functional_call

    wrapper = TaskLoss(task, model)
    if factorization == "none":

        def per_example(params: dict[str, torch.Tensor], data: tuple) -> torch.Tensor:
            inputs = {k: v.unsqueeze(0) for k, v in zip(keys, data, strict=True)}
            named = {f"model.{n}": p for n, p in params.items()}
            return functional_call(wrapper, named, (inputs,)).sum()

        return per_example

    def batch_mean(model: nn.Module, data: tuple, device: Any) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in zip(keys, data, strict=True)}
        return task.example_losses(model, inputs).mean()

    return batch_mean


def _load(model: nn.Module, params: Params) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            named[name].copy_(value)


def run_dvemb(
    runs: RunSet,
    run_id: str,
    *,
    workload: str | None = None,
    directory: str | None = None,
    projection_dim: int | None = None,
    factorization: str | None = None,
    tolerance: float = REPLAY_TOLERANCE,
    num_threads: int | None = None,
) -> DVEmbResult:
    """`dvemb_effects` of run `run_id` of a run set recorded with a step-0 checkpoint."""
    rec = load_recorded_run(runs, run_id, workload=workload, directory=directory)
    with torch_threads(rec.model, num_threads):
        return dvemb_effects(
            rec.task,
            rec.model,
            rec.checkpoint,
            rec.pool,
            rec.tests,
            rec.run.curriculum,
            rec.lrs,
            projection_dim=projection_dim,
            factorization=factorization,
            recorded_final_loss=rec.run.losses[-1],
            saved=rec.saved,
            optimizer=rec.optimizer,
            max_grad_norm=rec.max_grad_norm,
            tolerance=tolerance,
            seed=rec.run.seed,
        )


# -- as a simulator ---------------------------------------------------------------------------
class DVEmbSimulator(RunEffectsSimulator):
    """DVEmb as a method: run-specific leave-one-out for "this run" questions
    (`run_removal_effects`), and as a simulator of other curricula Simfluence-Additive with
    ``B_i(z)`` = the mean over up to `max_runs` recorded runs of ``i``'s DVEmb effect divided
    by the number of times that run consumed it (an effect per consumption).

    DVEmb estimates the zero-weight removal of single examples; a group's effect is the sum of
    its members' (the renormalize removal is not modelled: the same numbers answer it).

    Extra parameters: `projection_dim` and `factorization` (dattri's; defaults chosen by model
    size, see `dvemb_effects`).
    """

    name = "dvemb"

    def __init__(
        self,
        scaled: bool = False,
        max_runs: int | None = 8,
        projection_dim: int | None = None,
        projection_seed: int = 0,
        workload: str | None = None,
        checkpoints_dir: str | None = None,
        unseen: str = "error",
        batch_weighting: str = "mean",
        factorization: str | None = None,
        task: str | None = None,
    ) -> None:
        super().__init__(
            scaled,
            max_runs,
            projection_dim,
            projection_seed,
            workload,
            checkpoints_dir,
            unseen,
            batch_weighting,
            task,
        )
        self.factorization = factorization

    def _run_key(self) -> tuple[Any, ...]:
        return (
            *super()._run_key(),
            self.projection_dim,
            self.projection_seed,
            self.factorization,
        )

    def _compute_run(
        self, runs: RunSet, run_id: str, test_ids: tuple[str, ...] | None
    ) -> DVEmbResult:
        if test_ids is not None:
            raise SimfluenceError("dvemb answers for all test examples of a run")
        return run_dvemb(
            runs,
            run_id,
            workload=self.task or self.workload,
            directory=self.checkpoints_dir,
            projection_dim=self.projection_dim,
            factorization=self.factorization,
        )

    def _zero_weight_effects(self, answer: DVEmbResult) -> tuple[list[str], np.ndarray]:
        return answer.train_ids, answer.effects

    def run_effects(self, runs: RunSet, run_id: str) -> DVEmbResult:
        """The (cached) DVEmb effects of run `run_id` of `runs`."""
        return self.run_answer(runs, run_id)

    def run_removal_effects(
        self,
        runs: RunSet,
        run_id: str,
        groups: Sequence[Collection[str]],
        removal: str = "zero-weight",
    ) -> np.ndarray:
        """Shape ``(M, G)``: the summed DVEmb effects of each group's members in run `run_id`."""
        check_removal(removal)
        result = self.run_effects(runs, run_id)
        col = {i: k for k, i in enumerate(result.train_ids)}
        out = np.zeros((len(result.test_ids), len(groups)))
        for g, group in enumerate(groups):
            members = [col[str(i)] for i in group if str(i) in col]
            out[:, g] = result.effects[:, members].sum(axis=1)
        return out
