"""Static TDA methods through dattri's attributors, as scorers of any curriculum.

A *static* method scores every pool example once, on a trained model, and has no notion of
when an example is consumed. Here they are run through dattri (``pip install
'simfluence[dattri]'``; dattri is imported inside the functions):

* ``trak``: ``dattri.algorithm.trak.TRAKAttributor`` (random projection to `projection_dim`
  dimensions, default `trak_dim`: 512, but fewer than the pool's examples; the margin
  ``log p / (1 - p)`` with ``p = exp(-loss)`` as the output function, as TRAK does for
  classification), ensembled over the final checkpoints of up to
  `max_runs` recorded runs (TRAK-K with K = the runs used);
* ``logra``: ``dattri.algorithm.logra.LoGraAttributor`` (Kronecker-factorized projection of
  every linear layer's gradient, eFIM curvature, damping relative to its mean eigenvalue);
* ``if-ekfac``: ``dattri.algorithm.influence_function.IFAttributorEKFAC`` (EK-FAC over every
  ``nn.Linear`` module; the model must consist of linear layers and parameter-free functions);
* ``if-explicit``: ``IFAttributorExplicit`` (the exact, damped Hessian; only for models up to
  `EXPLICIT_LIMIT` parameters), for models EK-FAC does not apply to;
* ``if-cg``: ``IFAttributorCG`` (conjugate-gradient Hessian-inverse products).

**From scores to predictions (the additive rule).** dattri returns ``(P, M)`` scores, positive
= consuming the example lowered the test loss. A static method becomes a purely additive
simulator (``alpha = 1``) with ``B_i(z) = -s * score_i(z)`` per consumption (mean batch
weighting): the predicted final loss of any curriculum is the recorded step-0 loss plus the
sum of the scores of everything consumed, so the predicted *change* between two curricula is
the sum of the scores of what changed (the examples removed, repeated, added). ``s`` is ONE
global scale fitted in closed form on the runs the method is fitted on (least squares of
``L_t - L_0`` on the rollout's cumulative change, as the ``-scaled`` gradient methods do;
`validate` fits on all recorded runs, its leave-one-out kinds on the runs not held out). The
final loss is computed from the total (weighted) counts only, so a reordered curriculum gets
exactly the same prediction: static methods are **order-blind** (``order_blind = True``); their
LDS on ``reorder`` is 0 by construction.

Every fit records its cost in ``cost_``: ``{"seconds", "peak_rss_mb"}`` (wall time and the
highest resident memory above the level at the start of the fit, sampled every 5 ms:
`measure_cost`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from simfluence.attribution.simulators import GradientSimulator
from simfluence.errors import SimfluenceError
from simfluence.evaluation.cost import measure_cost
from simfluence.recording.task import Examples, Task

__all__ = [
    "EXPLICIT_LIMIT",
    "STATIC_METHODS",
    "StaticSimulator",
    "measure_cost",
    "static_scores",
]

INSTALL_HINT = "static methods need dattri: pip install 'simfluence[dattri]' (dattri>=0.3)"
#: the methods of this module (name -> dattri attributor)
STATIC_METHODS = {
    "trak": "TRAKAttributor",
    "logra": "LoGraAttributor",
    "if-ekfac": "IFAttributorEKFAC",
    "if-explicit": "IFAttributorExplicit",
    "if-cg": "IFAttributorCG",
}
#: ``if-explicit`` materializes the ``D x D`` Hessian: refused above this many parameters
EXPLICIT_LIMIT = 20_000
_BATCH = 64


def _import(name: str) -> tuple[Any, Any]:
    try:
        from dattri.task import AttributionTask

        if name == "TRAKAttributor":
            from dattri.algorithm.trak import TRAKAttributor as cls  # noqa: N813
        elif name == "LoGraAttributor":
            from dattri.algorithm.logra import LoGraAttributor as cls  # noqa: N813
        else:
            import dattri.algorithm.influence_function as module

            cls = getattr(module, name)
    except ImportError as exc:
        raise SimfluenceError(f"{INSTALL_HINT} ({exc})") from None
    return cls, AttributionTask


class _Wrapped(nn.Module):
    """The task's per-example losses as a module. ``forward(batch)`` (a dict of the examples'
    tensors): the losses ``(n,)``. ``forward(**batch)`` (dattri's dict-style batches, which
    LoGra feeds a model as keyword arguments): an object whose ``loss`` is their sum, what
    dattri expects of such a model (any number of inputs: newsgroups-minilm's hidden states
    and mask)."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(
        self, batch: dict[str, torch.Tensor] | None = None, /, **named: torch.Tensor
    ) -> Any:
        if batch is None:
            return SimpleNamespace(loss=self.task.example_losses(self.model, named).sum())
        return self.task.example_losses(self.model, batch)


class _Dicts(torch.utils.data.Dataset):
    """Examples as dicts of tensors (batched by the default collate into dicts)."""

    def __init__(self, examples: Examples) -> None:
        self.tensors = examples.tensors
        self.n = len(examples)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


def static_scores(
    method: str,
    task: Task,
    model: nn.Module,
    checkpoints: list[Mapping[str, torch.Tensor]],
    pool: Examples,
    tests: Examples,
    *,
    projection_dim: int | None = None,
    damping: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """dattri's scores ``(M, P)`` of `method` for every pool example and test example,
    positive = consuming the example lowers the test loss, averaged over `checkpoints`
    (TRAK ensembles them itself; the other methods are run once per checkpoint).

    `damping` is relative: the Hessian / Fisher damping is ``damping`` times the mean squared
    per-example gradient entry (``trace(F) / D``) at the checkpoint.
    """
    if method not in STATIC_METHODS:
        raise SimfluenceError(
            f"unknown static method {method!r}; static methods: {', '.join(STATIC_METHODS)}"
        )
    cls, AttributionTask = _import(STATIC_METHODS[method])
    keys = sorted(pool.tensors)
    ndims = {k: pool.tensors[k].ndim - 1 for k in keys}
    work = _Wrapped(task, _copy(model))
    dim = sum(p.numel() for p in work.parameters() if p.requires_grad)
    if method == "if-explicit" and dim > EXPLICIT_LIMIT:
        raise SimfluenceError(
            f"if-explicit: the model has {dim} parameters (more than {EXPLICIT_LIMIT}): its "
            "Hessian is out of reach; use if-ekfac or if-cg"
        )
    if method == "if-ekfac" and not any(isinstance(m, nn.Linear) for m in work.modules()):
        raise SimfluenceError("if-ekfac: the model has no nn.Linear module; use if-explicit")

    def loader(examples: Examples) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(*(examples.tensors[k] for k in keys))
        return torch.utils.data.DataLoader(data, batch_size=_BATCH, shuffle=False)

    def dict_loader(examples: Examples) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_Dicts(examples), batch_size=_BATCH, shuffle=False)

    def states(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in checkpoint.items()}

    def example_losses(params: dict[str, torch.Tensor], data: tuple) -> torch.Tensor:
        from torch.func import functional_call

        inputs = {
            k: v.reshape(-1, *v.shape[v.ndim - ndims[k] :]) if v.ndim > ndims[k] else v[None]
            for k, v in zip(keys, data, strict=True)
        }
        return functional_call(work, params, (inputs,), strict=False)

    def mean_loss(params: dict[str, torch.Tensor], data: tuple) -> torch.Tensor:
        return example_losses(params, data).mean()

    def margin(params: dict[str, torch.Tensor], data: tuple) -> torch.Tensor:
        loss = example_losses(params, data).clamp_min(1e-12)
        return (-loss - torch.log(-torch.expm1(-loss))).sum()

    def probability(params: dict[str, torch.Tensor], data: tuple) -> torch.Tensor:
        return torch.exp(-example_losses(params, data).sum())

    if method == "trak":
        attr = cls(
            AttributionTask(margin, work, [states(c) for c in checkpoints]),
            probability,
            projector_kwargs={"proj_dim": projection_dim or trak_dim(len(pool)), "proj_seed": seed},
        )
        attr.cache(loader(pool))
        with torch.no_grad():
            return attr.attribute(loader(tests)).detach().to(torch.float64).numpy().T
    total = np.zeros((len(tests), len(pool)))
    with tempfile.TemporaryDirectory(prefix="simfluence-static-") as scratch:
        for checkpoint in checkpoints:
            lam = damping * _mean_square_gradient(task, work.model, checkpoint, pool)
            at = AttributionTask(mean_loss, work, states(checkpoint))
            if method == "logra":

                def batch_loss(model: nn.Module, data: dict, device: Any) -> torch.Tensor:
                    inputs = {k: v.to(device) for k, v in data.items()}
                    return task.example_losses(model.model, inputs).sum()

                at = AttributionTask(batch_loss, work, states(checkpoint))
                side = int(np.sqrt(projection_dim or 1024))
                # dattri's block-projected IF writes batch_metadata.json into its cache_dir, by
                # default the current directory: keep it in a scratch folder
                attr = cls(at, proj_dim=side * side, damping=lam, offload="none", cache_dir=scratch)
            elif method == "if-ekfac":
                attr = cls(at, damping=lam)
            elif method == "if-explicit":
                attr = cls(at, regularization=lam)
            else:
                attr = cls(at, regularization=lam, max_iter=50)
            # LoGra's set-up and test gradients take dict-style batches (any inputs); the others
            # take tuples, unpacked by `example_losses`
            batches = dict_loader if method == "logra" else loader
            attr.cache(batches(pool))
            scores = attr.attribute(batches(pool), batches(tests))
            total += scores.detach().to(torch.float64).numpy().T
    # dattri's influence functions score -g_test^T H^-1 g_train's opposite: positive = helpful
    return total / len(checkpoints)


def trak_dim(n_pool: int) -> int:
    """TRAK's default projection: 512, but fewer than the pool's examples. TRAK inverts the
    kernel ``X^T X`` of the pool's projected gradients ``X`` ``(P, k)``: with ``k >= P`` it
    is singular (dattri adds no damping by default) and the scores are noise (LDS about 0.05
    on digits-logreg with 200 pool examples and k = 512)."""
    return max(1, min(512, n_pool // 2))


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _mean_square_gradient(
    task: Task, model: nn.Module, checkpoint: Mapping[str, torch.Tensor], pool: Examples
) -> float:
    """``trace(F) / D``: the mean squared entry of the pool's per-example gradients."""
    from simfluence.attribution.gradients import iter_per_example_gradients

    total, dim = 0.0, 1
    for _, grads in iter_per_example_gradients(task, model, checkpoint, pool, chunk_size=32):
        total += float(torch.linalg.vector_norm(grads, dim=1).double().pow(2).sum())
        dim = grads.shape[1]
    return total / len(pool) / dim


class StaticSimulator(GradientSimulator):
    """A static method (module docstring) as an order-blind additive simulator.

    Parameters (besides `GradientSimulator`'s; `scaled` is always on): `projection_dim`
    (``trak``: `trak_dim`, 512 or half the pool; ``logra``: 1024, rounded to a square),
    `damping` (relative, as `static_scores`). ``max_runs`` recorded runs' final checkpoints are
    used (default 8).

    Learned attributes: ``B_``, ``scale_`` (the one global scale), ``scores_`` ``(M, P)``
    (dattri's, positive = helpful), ``cost_`` (``seconds``, ``peak_rss_mb`` of the fit).
    """

    #: reordering a curriculum never changes a static method's prediction
    order_blind = True
    always_scaled = True
    checkpoints_used = "last"
    method = "trak"

    def __init__(
        self,
        scaled: bool = True,
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

    def _fit_parameters(self, runs):  # type: ignore[no-untyped-def]
        from simfluence.recording.checkpoints import require_checkpoint
        from simfluence.recording.tasks import prepare_for_runset

        cost: dict[str, float] = {}
        with measure_cost(cost):
            task, config = self._task(runs)
            pool, tests = prepare_for_runset(task, runs)
            self.warnings_ = []
            model = task.make_model(config["seed"])
            used = runs.runs[: self.max_runs] if self.max_runs else runs.runs
            directory = self.checkpoints_dir or runs.source
            if directory is None:
                raise SimfluenceError(f"{self.name}: the run set has no directory with checkpoints")
            checkpoints = []
            self.checkpoint_steps_ = {}
            for run in used:
                step = self._steps(run)[-1]
                path = require_checkpoint(directory, run.run_id, step)
                checkpoints.append(torch.load(path, map_location="cpu", weights_only=True))
                self.checkpoint_steps_[run.run_id] = [step]
            try:
                scores = static_scores(
                    self.method,
                    task,
                    model,
                    checkpoints,
                    pool,
                    tests,
                    projection_dim=self.projection_dim,
                    damping=self.damping,
                    seed=self.projection_seed,
                )
            except SimfluenceError:
                raise
            except Exception as exc:  # dattri's attributor on a model it does not handle
                raise SimfluenceError(
                    f"{self.name}: dattri's {STATIC_METHODS[self.method]} failed on this model "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            self.scores_ = scores
            self.runs_used_ = len(used)
            self.A_ = None
            self.B_ = -scores
            self.seen_ = np.ones(len(runs.train_ids), dtype=bool)
            self.scale_, self.offset_ = self._fit_final_scale(runs)
            self.B_ = self.B_ * self.scale_
        self.cost_ = cost

    def _fit_final_scale(self, runs):  # type: ignore[no-untyped-def]
        """One global scale ``s`` and a per-test offset: least squares, over the fitted runs
        and test examples, of the final loss's deviation from its mean over the runs on the
        deviation of the summed scores (what each run consumed vs the runs' average); the
        offset makes the mean prediction over those runs equal their mean final loss."""
        from simfluence.simulators.encoding import encode_runs

        counts = encode_runs(runs, self.batch_size_, self.batch_weighting)
        summed = np.stack([self.B_ @ np.asarray(c.sum(axis=0)).ravel() for c in counts])
        change = np.stack([r.losses[-1] - r.losses[0] for r in runs.runs])
        dp, da = summed - summed.mean(axis=0), change - change.mean(axis=0)
        den = float((dp * dp).sum())
        scale = float((dp * da).sum()) / den if den > 0 else 0.0
        return scale, (change - scale * summed).mean(axis=0)

    def rollout_encoded(self, counts, initial, columns=None, envelope=None):  # type: ignore[no-untyped-def]
        """The additive rule: the final loss is the step-0 loss plus the offset plus the summed
        scaled scores of the (weighted) total counts, the steps between interpolated linearly:
        order-blind by construction (a reordered curriculum gets bit-identical predictions).
        `envelope` (the search's trust region) is not applied."""
        B, offset = self.B_, self.offset_
        if columns is not None:
            B, offset = B[columns], offset[columns]
        out = []
        for c, start in zip(counts, initial, strict=True):
            total = np.round(np.asarray(c.sum(axis=0)).ravel(), 9)[: B.shape[1]]
            final = start + offset + B @ total
            frac = np.arange(c.shape[0] + 1, dtype=np.float64)[:, None] / max(c.shape[0], 1)
            out.append(start + frac * (final - start))
        return out


class TRAKSimulator(StaticSimulator):
    """TRAK (dattri's ``TRAKAttributor``), ensembled over up to `max_runs` final checkpoints."""

    name = "trak"
    method = "trak"


class LoGraSimulator(StaticSimulator):
    """LoGra (dattri's ``LoGraAttributor``, eFIM), averaged over the final checkpoints."""

    name = "logra"
    method = "logra"


class EKFACSimulator(StaticSimulator):
    """Influence functions with EK-FAC curvature (dattri's ``IFAttributorEKFAC``)."""

    name = "if-ekfac"
    method = "if-ekfac"


class ExplicitIFSimulator(StaticSimulator):
    """Influence functions with the explicit damped Hessian (dattri's
    ``IFAttributorExplicit``; small models only)."""

    name = "if-explicit"
    method = "if-explicit"


class CGIFSimulator(StaticSimulator):
    """Influence functions with conjugate-gradient inverse-Hessian products (dattri's
    ``IFAttributorCG``)."""

    name = "if-cg"
    method = "if-cg"
