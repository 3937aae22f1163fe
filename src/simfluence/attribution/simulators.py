"""Gradient-based TDA as simulators: TracIn-CP, Grad-Dot and influence functions.

Simfluence's central claim is that these methods are special cases of Simfluence-Linear: purely
additive (``alpha = 1``) with ``B_i(z)`` computed from gradients instead of learned,

    L_t(z) = L_{t-1}(z) + w_t * sum_{i in c_t} B_i(z),     w_t = b / |c_t| (mean weighting),

so they are fitted, simulated, saved and evaluated exactly like `linear`. ``B`` has shape
``(M, P)`` = (test examples, pool); a negative ``B_i(z)`` means consuming ``i`` once lowers
``z``'s loss.

`fit(runs)` needs a run set recorded by `simfluence record` with checkpoints (the default): it
rebuilds the task (`simfluence.recording.tasks.task_for_runset`: the reference stored in the
manifest, or the ``task`` parameter) and its pool and test examples, loads every training run's
checkpoints,
computes each run's scores and **averages them over runs** (the expected scores for a random
run of the protocol). Per checkpoint ``k`` of a run, the learning rate ``eta_k`` is the one of
the step taken from that checkpoint, and ``b`` is the batch size of the protocol:

* ``tracin-cp``: ``B_i(z) = -(1/K) sum_k eta_k / b * g_z(theta_k) . g_i(theta_k)`` over the
  ``K`` saved checkpoints. We **average** over checkpoints (TracIn-CP sums): ``B`` is an effect
  *per consumption*, and each consumption happens at one step, so the average over the run is
  the right unit for a simulator (the ``-scaled`` variants make the choice moot).
* ``grad-dot``: the same at the last saved checkpoint only.
* ``influence``: ``B_i(z) = -(eta / b) g_z^T (F + lambda I)^{-1} g_i`` at the last checkpoint,
  with ``F`` the empirical Fisher of the pool (a positive semi-definite Gauss-Newton-style
  approximation of the training-loss Hessian), solved in closed form through Woodbury's
  identity with ``n x n`` Gram matrices (never a ``D x D`` matrix), and damping
  ``lambda = damping * trace(F) / D`` (relative to the mean eigenvalue);
  ``curvature="hessian"`` uses the exact Hessian through iterative Hessian-vector products.

Every method also comes as ``NAME-scaled``: one global factor ``s >= 0`` on ``B`` fitted in
closed form on the *training* runs' rollouts (least squares of ``L_t - L_0`` on the rollout's
cumulative change), never on the held-out runs. The raw variants use ``s = 1``.

These formulas are first-order effects of an **SGD** step. For runs recorded with **Adam or
AdamW** (``config["optimizer"]``), ``tracin-cp`` and ``grad-dot`` (and their ``-scaled``
twins) use the optimizer's preconditioner instead: example ``i``'s share of the step taken
from checkpoint ``k`` moves the parameters by about ``-(eta_k / b) g_i / (sqrt(v_hat) + eps)``
(the momentum spreads it over later steps, with weights summing to about 1), so

    B_i(z) = -(1/K) sum_k eta_k / b * g_z(theta_k) . (g_i(theta_k) / (sqrt(v_hat_{k+1}) + eps)),

with ``v_hat_{k+1}`` the bias-corrected second moment of the step taken from checkpoint ``k``
(the last step's for the final checkpoint), reconstructed exactly by replaying the run from its
step-0 checkpoint (`simfluence.attribution.replay`; no optimizer state is saved, and the replay
costs about one training run per run used). A run set without a step-0 checkpoint, other
optimizers (SGD with momentum), and ``influence`` still compute the plain-SGD formula and say
so once in ``warnings_`` (a list of strings; `evaluate` prints it under its table and writes it
into its JSON): an adaptive optimizer rescales every parameter's step, which the dot product of
raw gradients does not see.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch

from simfluence.errors import SimfluenceError
from simfluence.recording.checkpoints import require_checkpoint
from simfluence.recording.devices import resolve_device
from simfluence.recording.task import Examples, Task
from simfluence.recording.tasks import prepare_for_runset, task_for_runset
from simfluence.runlog.runs import Run, RunSet
from simfluence.simulators.base import Simulator
from simfluence.simulators.dynamics import DynamicsSimulator, rollout
from simfluence.simulators.encoding import encode_runs

#: per-checkpoint kernels, shared by the simulators of one process (-scaled twins, grad-dot)
_KERNELS: dict[tuple[Any, ...], np.ndarray] = {}
_KERNEL_CACHE_SIZE = 512


class GradientSimulator(DynamicsSimulator):
    """Base of the gradient methods: ``A_`` is None, ``B_`` comes from the per-checkpoint
    `_kernel`.

    Parameters:
        scaled: fit one global scale on the training runs (the ``-scaled`` variants).
        max_runs: average the scores of at most this many training runs (None: all; 8 by
            default: the average barely moves beyond a few runs, and each costs gradients).
        projection_dim: project gradients to this many dimensions (None: exact dot products).
        projection_seed: seed of the projection.
        workload: older name of `task` (kept so that saved files load).
        checkpoints_dir: where the checkpoints are (default: the run set's directory).
        task: a task reference (`resolve_task`) to use instead of the one the run set's
            manifest stores (e.g. the task's file moved); the recorded constructor arguments
            are kept.
        device: where gradients are computed: ``cpu`` (default), ``auto``, ``cuda``, ``cuda:K``
            (``B_`` always ends on the CPU as float64).

    Learned attributes: ``B_`` (M, P), ``A_`` None, ``scale_`` (1.0 unless scaled),
    ``runs_used_``, ``checkpoint_steps_`` (per run used), ``warnings_`` (list of str: e.g. the
    runs' optimizer is not plain SGD).
    """

    #: "all" checkpoints of a run, or only the "last" one
    checkpoints_used: str = "all"
    #: the ``-scaled`` variants scale whatever their ``scaled`` parameter says
    always_scaled: bool = False
    #: use Adam's preconditioner on Adam/AdamW runs (module docstring)
    adam_aware: bool = False

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
        task: str | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(unseen=unseen, batch_weighting=batch_weighting)
        self.device = device
        self.scaled = scaled
        self.max_runs = max_runs
        self.projection_dim = projection_dim
        self.projection_seed = projection_seed
        self.workload = workload
        self.checkpoints_dir = checkpoints_dir
        self.task = task

    # -- what subclasses say ----------------------------------------------------------------
    def _kernel(
        self,
        task: Task,
        model: torch.nn.Module,
        checkpoint: Mapping[str, torch.Tensor],
        pool: Examples,
        tests: Examples,
    ) -> np.ndarray:
        """``K`` of shape ``(M, P)`` at one checkpoint, with ``B = -(eta / b) K`` for one step:
        ``g_z . g_i`` for TracIn, ``g_z^T (F + lambda I)^{-1} g_i`` for influence."""
        raise NotImplementedError

    def _kernel_key(self) -> tuple[Any, ...]:
        """What, besides the checkpoint file, the kernel depends on (for the cache)."""
        return (type(self)._kernel, self.projection_dim, self.projection_seed)

    def _cached_kernel(
        self,
        task: Task,
        model: torch.nn.Module,
        path: Path,
        pool: Examples,
        tests: Examples,
        precondition: torch.Tensor | None = None,
    ) -> np.ndarray:
        # the -scaled twin and grad-dot (tracin-cp's last checkpoint) reuse these: computing
        # per-example gradients is the whole cost of a gradient method
        key = (
            str(path),
            path.stat().st_mtime_ns,
            tuple(pool.ids),
            tuple(tests.ids),
            *self._kernel_key(),
            precondition is not None,  # the replayed run's preconditioner (deterministic)
        )
        if key not in _KERNELS:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if len(_KERNELS) >= _KERNEL_CACHE_SIZE:
                _KERNELS.pop(next(iter(_KERNELS)))
            extra = {} if precondition is None else {"precondition": precondition}
            _KERNELS[key] = self._kernel(task, model, checkpoint, pool, tests, **extra)
        return _KERNELS[key]

    # -- fitting ----------------------------------------------------------------------------
    def _fit_parameters(self, runs: RunSet) -> None:
        task, config = self._task(runs)
        pool, tests = prepare_for_runset(task, runs)
        self.warnings_ = optimizer_warnings(self.name, config.get("optimizer"))
        self.preconditioned_ = False
        model = task.make_model(config["seed"]).to(resolve_device(self.device))
        used = runs.runs[: self.max_runs] if self.max_runs else runs.runs
        directory = self.checkpoints_dir or runs.source
        if directory is None:
            raise SimfluenceError(
                f"{self.name}: the run set has no directory to find checkpoints in"
            )
        total = np.zeros((len(runs.test_ids), len(runs.train_ids)))
        self.checkpoint_steps_ = {}
        for run in used:
            steps = self._steps(run)
            pre = self._adam_preconditioners(runs, run, steps, task) if self.adam_aware else None
            for step in steps:
                path = require_checkpoint(directory, run.run_id, step)
                p = None if pre is None else pre[step]
                kernel = self._cached_kernel(task, model, path, pool, tests, p)
                eta = _lr_at(run, step, config["lr"])
                total -= (eta / self.batch_size_ / len(steps)) * kernel
            self.checkpoint_steps_[run.run_id] = steps
        self.runs_used_ = len(used)
        self.A_ = None
        self.B_ = total / len(used)
        self.seen_ = np.ones(len(runs.train_ids), dtype=bool)  # gradients exist for all
        self.scale_ = self._fit_scale(runs) if self.scaled or self.always_scaled else 1.0
        self.B_ = self.B_ * self.scale_

    def _adam_preconditioners(
        self, runs: RunSet, run: Run, steps: list[int], task: Task
    ) -> dict[int, torch.Tensor] | None:
        """``{checkpoint step k: 1 / (sqrt(v_hat) + eps)}`` (flattened like the gradients, times
        each group's rate ratio) of the step taken from checkpoint ``k``, by replaying `run`;
        None (plain formula) unless every trained parameter is Adam's and the run has a
        step-0 checkpoint. Sets ``preconditioned_`` and replaces the optimizer warning."""
        from simfluence.attribution.gradients import trainable_parameter_names
        from simfluence.attribution.replay import Replay, load_recorded_run, replay_parameters
        from simfluence.recording.loop import torch_threads

        optimizer = (runs.metadata.get("config") or {}).get("optimizer") or {}
        if optimizer.get("name") not in ("Adam", "AdamW"):
            return None
        directory = self.checkpoints_dir or runs.source
        if 0 not in (run.metadata.get("checkpoint_steps") or []):
            return None
        rec = load_recorded_run(runs, run.run_id, directory=directory, task=task)
        rule = rec.replay_optimizer()
        if not rule.rules or any(r.kind != "adam" for r in rule.rules.values()):
            return None
        taken = {k: min(k + 1, run.n_steps) for k in steps}  # the step taken from k
        torch.manual_seed(run.seed)
        with torch_threads(rec.model):
            trace = replay_parameters(
                Replay(task, rec.model, rec.checkpoint),
                rec.batches(),
                rec.lrs,
                optimizer=rule,
                keep=lambda t: t in taken.values(),
                saved=rec.saved,
            )
        at: dict[int, torch.Tensor] = {}
        for t in sorted(set(taken.values())):
            parts = []
            for name in trainable_parameter_names(rec.model):
                r, (_, exp_avg_sq) = rule.rules[name], trace.states[t][name]
                root_bc2 = (1 - r.betas[1] ** float(t)) ** 0.5
                denom = (exp_avg_sq.sqrt() / root_bc2).add(r.eps)
                parts.append((r.lr_ratio / denom).reshape(-1))
            at[t] = torch.cat(parts)
        out = {k: at[t] for k, t in taken.items()}
        self.preconditioned_ = True
        self.warnings_ = []
        return out

    def _calibration_rollouts(
        self, runs: RunSet, n_folds: int
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[Simulator]]:
        """In-sample rollouts of `runs`: ``B`` comes from gradients, not from the recorded
        losses (at most one global scale is fitted on them), so there is nothing to hold out,
        and refitting per fold would recompute per-example gradients of other runs."""
        simulated = self.simulate_many(
            [r.curriculum for r in runs.runs], np.stack([r.initial_loss for r in runs.runs])
        )
        return [r.losses for r in runs.runs], simulated, []

    def _task(self, runs: RunSet) -> tuple[Task, dict[str, Any]]:
        try:
            task = task_for_runset(runs, self.task or self.workload)
        except SimfluenceError as exc:
            raise SimfluenceError(f"{self.name}: {exc}") from None
        return task, runs.metadata["config"]

    def _steps(self, run: Run) -> list[int]:
        steps = sorted(run.metadata.get("checkpoint_steps") or [])
        if not steps:
            raise SimfluenceError(
                f"{self.name}: run {run.run_id!r} has no saved checkpoints (was it recorded "
                "with --checkpoints none?); gradient methods need them: record with the default "
                "checkpoints or e.g. --checkpoints 0,32,64"
            )
        return steps if self.checkpoints_used == "all" else steps[-1:]

    def _fit_scale(self, runs: RunSet) -> float:
        """Least-squares ``s >= 0`` of ``L_t - L_0`` on ``s * (rollout change)`` over the
        training runs' steps and test examples (closed form)."""
        counts = encode_runs(runs, self.batch_size_, self.batch_weighting)
        zeros = np.zeros((len(runs.runs), len(runs.test_ids)))
        change = rollout(counts, None, self.B_, zeros)  # cumulative sum of beta_t from 0
        observed = [r.losses - r.losses[0] for r in runs.runs]
        num = sum(float((c * o).sum()) for c, o in zip(change, observed, strict=True))
        den = sum(float((c * c).sum()) for c in change)
        return max(num / den, 0.0) if den > 0 else 0.0

    def _projection(self) -> Any:
        if self.projection_dim is None:
            return None
        from simfluence.attribution.gradients import RandomProjection

        return RandomProjection(self.projection_dim, seed=self.projection_seed)


def is_plain_sgd(optimizer: Mapping[str, Any]) -> bool:
    """Whether a recorded optimizer (`simfluence.recording.optim.optimizer_spec`) is SGD
    without momentum, the optimizer the gradient formulas model."""
    return (
        optimizer.get("name") == "SGD"
        and not optimizer.get("momentum")
        and not optimizer.get("nesterov")
    )


def optimizer_warnings(method: str, optimizer: Mapping[str, Any] | None) -> list[str]:
    """One warning when the runs' recorded optimizer is not plain SGD (none when unrecorded:
    run sets older than the record were made with the runner's SGD)."""
    if not optimizer or is_plain_sgd(optimizer):
        return []
    settings = ", ".join(
        f"{k} {v}"
        for k, v in optimizer.items()
        if k in ("lr", "momentum", "betas", "weight_decay", "eps") and v
    )
    return [
        f"{method}: the runs were trained with {optimizer.get('name')} ({settings}), but its "
        "formula assumes plain SGD steps (-lr x gradient): its scores ignore the optimizer's "
        "momentum and per-parameter step sizes"
    ]


def _lr_at(run: Run, step: int, default: float) -> float:
    """The learning rate of the step taken from the checkpoint at `step` (the last one for T)."""
    if run.lr is None or not len(run.lr):
        return float(default)
    value = float(run.lr[min(step, len(run.lr) - 1)])
    return value if np.isfinite(value) else float(default)


class TracInCPSimulator(GradientSimulator):
    """TracIn-CP as a simulator: the average over saved checkpoints (module docstring); on
    Adam/AdamW runs, with the optimizer's preconditioner."""

    name = "tracin-cp"
    adam_aware = True

    def _kernel(self, task, model, checkpoint, pool, tests, precondition=None):  # type: ignore[no-untyped-def]
        from simfluence.attribution.tracin import gradient_similarity

        return gradient_similarity(
            task, model, checkpoint, pool, tests, self._projection(), precondition=precondition
        ).numpy()


class GradDotSimulator(TracInCPSimulator):
    """Grad-Dot: TracIn at the last saved checkpoint."""

    name = "grad-dot"
    checkpoints_used = "last"


class InfluenceSimulator(GradientSimulator):
    """Influence functions at the last saved checkpoint (module docstring).

    Extra parameters:
        damping: relative damping; ``lambda = damping * trace(F) / D``.
        curvature: ``"fisher"`` (default; positive semi-definite) or ``"hessian"`` (exact).
    """

    name = "influence"
    checkpoints_used = "last"

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
        task: str | None = None,
        device: str = "cpu",
        damping: float = 0.1,
        curvature: str = "fisher",
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
            device,
        )
        self.damping = damping
        self.curvature = curvature

    def _kernel_key(self) -> tuple[Any, ...]:
        return (*super()._kernel_key(), self.damping, self.curvature)

    def _kernel(self, task, model, checkpoint, pool, tests):  # type: ignore[no-untyped-def]
        if self.curvature == "fisher":
            return self._fisher_kernel(task, model, checkpoint, pool, tests)
        from simfluence.attribution.influence import influence_scores

        mean_eigenvalue = _mean_fisher_eigenvalue(task, model, checkpoint, pool)
        # influence_scores returns -(lr / b) g_z^T (H + lambda I)^{-1} g_i: ask for lr = -b = -1
        return influence_scores(
            task,
            model,
            checkpoint,
            -1.0,
            pool,
            tests,
            1,
            damping=self.damping * mean_eigenvalue,
            curvature=self.curvature,  # type: ignore[arg-type]
        )

    def _fisher_kernel(self, task, model, checkpoint, pool, tests):  # type: ignore[no-untyped-def]
        """``g_z^T (F + lambda I)^{-1} g_i`` in closed form, never a ``D x D`` matrix.

        With ``G`` the ``(n, D)`` pool gradients, ``F = G^T G / n``; Woodbury's identity gives
        ``(F + lambda I)^{-1} = (I - G^T (n lambda I + G G^T)^{-1} G) / lambda``, so the whole
        kernel is ``n * T (K + n lambda I)^{-1}`` with the Gram matrices ``K = G G^T``
        ``(n, n)`` and ``T = G_test G^T`` ``(M, n)``: one Cholesky solve of size ``n``.
        ``lambda = damping * trace(F) / D`` (the mean eigenvalue of ``F`` times `damping`).
        """
        from simfluence.attribution.gradients import per_example_gradients

        projection = self._projection()
        pool_grads = per_example_gradients(task, model, checkpoint, pool, projection=projection)
        test_grads = per_example_gradients(task, model, checkpoint, tests, projection=projection)
        gram = (pool_grads @ pool_grads.T).to("cpu", torch.float64).numpy()
        cross = (test_grads @ pool_grads.T).to("cpu", torch.float64).numpy()
        n, dim = pool_grads.shape
        lam = self.damping * np.trace(gram) / n / dim
        factor = scipy.linalg.cho_factor(gram + n * lam * np.eye(n))
        return n * scipy.linalg.cho_solve(factor, cross.T).T


def _mean_fisher_eigenvalue(
    task: Task, model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor], pool: Examples
) -> float:
    """``trace(F) / D`` = mean squared per-example gradient norm / D, streamed in small chunks
    (a model's ``n x D`` gradients in float64 would not fit in memory)."""
    from simfluence.attribution.gradients import iter_per_example_gradients

    total, dim = 0.0, 1
    for _, grads in iter_per_example_gradients(task, model, checkpoint, pool, chunk_size=32):
        total += float(torch.linalg.vector_norm(grads, dim=1).double().pow(2).sum())
        dim = grads.shape[1]
    return total / len(pool) / dim


class ScaledTracInCPSimulator(TracInCPSimulator):
    """``tracin-cp`` with one global scale fitted on the training runs."""

    name = "tracin-cp-scaled"
    always_scaled = True


class ScaledGradDotSimulator(GradDotSimulator):
    """``grad-dot`` with one global scale fitted on the training runs."""

    name = "grad-dot-scaled"
    always_scaled = True


class ScaledInfluenceSimulator(InfluenceSimulator):
    """``influence`` with one global scale fitted on the training runs."""

    name = "influence-scaled"
    always_scaled = True
