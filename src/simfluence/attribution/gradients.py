"""Per-example loss gradients at a checkpoint, with `torch.func`, plus random projections.

Everything here talks to a model only through the `Task` contract
(`simfluence.recording.task`): ``task.example_losses(model, inputs) -> (n,)``. A checkpoint is
a plain mapping ``name -> tensor`` as produced by ``model.state_dict()``; its trainable entries
(the names of ``model.named_parameters()`` with ``requires_grad``) are *required*, buffers and
frozen parameters are taken from the checkpoint when present and from the model otherwise. The
model instance itself is never modified: parameters are substituted with
`torch.func.functional_call`.

Conventions
-----------
* A gradient is taken w.r.t. the trainable parameters only, flattened in the order of
  ``model.named_parameters()`` and concatenated: one row of length ``D`` per example.
* The model is put in ``eval()`` mode while gradients are computed (dropout off, batch norm on
  its running statistics) and its previous mode is restored afterwards; per-example gradients
  of a batch-statistics layer are not defined.
* Memory is bounded by ``chunk_size``: at most ``chunk_size`` examples are pushed through
  ``vmap(grad(...))`` at once, so peak memory is about ``chunk_size * (D + activations)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from simfluence.errors import SimfluenceError
from simfluence.recording.task import Examples, Task

__all__ = [
    "CheckpointError",
    "FunctionalLoss",
    "RandomProjection",
    "iter_per_example_gradients",
    "per_example_gradients",
    "trainable_parameter_names",
]

#: rows of the projection matrix generated (and cached) per block
DEFAULT_BLOCK_ROWS = 16384


class CheckpointError(SimfluenceError):
    """A checkpoint does not match the model (missing, unexpected or misshapen parameter)."""


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that gradients are taken with respect to, in model order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


class _LossModule(nn.Module):
    """Wraps ``task.example_losses(model, inputs)`` as a module so `functional_call` applies."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.example_losses(self.model, inputs)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class FunctionalLoss:
    """The per-example loss of ``model`` at one checkpoint, as a function of a flat vector.

    Args:
        task: the workload (gives ``example_losses``).
        model: the architecture; its own parameter values are ignored for trainable names.
        checkpoint: ``name -> tensor``; must hold every trainable parameter with its shape.
        dtype: if given, floating parameters, buffers and floating input tensors are cast to it
            (``torch.float64`` for reference computations); otherwise the checkpoint's dtype.

    Attributes:
        names: trainable parameter names, in flattening order.
        shapes: their shapes.
        dim: ``D``, the total number of trainable scalars.
        theta: the flat parameter vector at the checkpoint, shape ``(D,)``.

    Raises:
        CheckpointError (a `ValueError`): a trainable parameter is missing, has the wrong
            shape, or the checkpoint holds a name the model does not have. The message names it.
    """

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        checkpoint: Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
    ) -> None:
        self.task = task
        self.model = model
        self.dtype = dtype
        self._wrapper = _LossModule(task, model)
        model_params = dict(model.named_parameters())
        model_buffers = dict(model.named_buffers())
        self.names = trainable_parameter_names(model)
        if not self.names:
            raise CheckpointError("the model has no trainable parameters (requires_grad=True)")
        for name in checkpoint:
            if name not in model_params and name not in model_buffers:
                raise CheckpointError(
                    f"checkpoint holds {name!r}, which is not a parameter or buffer of the model"
                )
        params: dict[str, torch.Tensor] = {}
        for name in self.names:
            if name not in checkpoint:
                raise CheckpointError(f"checkpoint is missing trainable parameter {name!r}")
            value = checkpoint[name]
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"checkpoint entry {name!r} is not a tensor")
            expected = model_params[name].shape
            if value.shape != expected:
                raise CheckpointError(
                    f"checkpoint parameter {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(expected)}"
                )
            params[name] = self._cast(value.detach(), model_params[name].device)
        fixed: dict[str, torch.Tensor] = {}
        for name, tensor in [*model_params.items(), *model_buffers.items()]:
            if name in params:
                continue
            value = checkpoint.get(name, tensor)
            if value.shape != tensor.shape:
                raise CheckpointError(
                    f"checkpoint entry {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(tensor.shape)}"
                )
            fixed[name] = self._cast(value.detach(), tensor.device)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.dim = int(sum(self.sizes))
        self.theta = torch.cat([params[n].reshape(-1) for n in self.names])
        self._fixed = {f"model.{n}": t for n, t in fixed.items()}

    def _cast(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        tensor = tensor.to(device)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor

    def _inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inputs on the parameters' device (and in `dtype`, when one was given)."""
        device = self.theta.device
        if self.dtype is None:
            return {k: v.to(device) for k, v in inputs.items()}
        return {
            k: (v.to(device, self.dtype) if v.is_floating_point() else v.to(device))
            for k, v in inputs.items()
        }

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``(D,)`` vector -> ``{"model.<name>": tensor}`` (views; works under vmap)."""
        pieces = torch.split(theta, self.sizes)
        out = {
            f"model.{n}": p.view(s) for n, p, s in zip(self.names, pieces, self.shapes, strict=True)
        }
        out.update(self._fixed)
        return out

    def losses(self, theta: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example losses ``(n,)`` at the flat parameters ``theta`` ``(D,)``."""
        return functional_call(self._wrapper, self.unflatten(theta), (dict(inputs),))

    def _single_loss(self, theta: torch.Tensor, row: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.unsqueeze(0) for k, v in row.items()}
        return self.losses(theta, batch).sum()

    def gradients(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example gradients of a batch, shape ``(n, D)``, via ``vmap(grad(...))``."""
        inputs = self._inputs(inputs)
        with _eval_mode(self.model):
            return vmap(grad(self._single_loss), in_dims=(None, 0))(self.theta, inputs)

    def mean_loss_hvp(
        self,
        examples: Examples,
        vectors: torch.Tensor,
        chunk_size: int = 256,
        vector_chunk: int = 64,
    ) -> torch.Tensor:
        """Hessian-vector products of the *mean* loss over ``examples`` at the checkpoint.

        Args:
            examples: the examples whose mean loss defines ``H`` (``n`` rows).
            vectors: ``(m, D)``, one vector per row.
            chunk_size: examples per forward pass.
            vector_chunk: vectors pushed through ``vmap(jvp(grad))`` at once.

        Returns:
            ``(m, D)``: row ``j`` is ``H @ vectors[j]`` (forward-over-reverse, exact).
        """
        n = len(examples)
        out = torch.zeros_like(vectors)
        with _eval_mode(self.model):
            for start in range(0, n, chunk_size):
                inputs = self._inputs(examples.take(range(start, min(start + chunk_size, n))))

                def chunk_loss(theta: torch.Tensor, inputs: dict = inputs) -> torch.Tensor:
                    return self.losses(theta, inputs).sum() / n

                grad_fn = grad(chunk_loss)

                def hvp(v: torch.Tensor, grad_fn=grad_fn) -> torch.Tensor:
                    return jvp(grad_fn, (self.theta,), (v,))[1]

                for vs in range(0, vectors.shape[0], vector_chunk):
                    block = vectors[vs : vs + vector_chunk]
                    out[vs : vs + vector_chunk] += vmap(hvp)(block)
        return out


class RandomProjection:
    """A fixed Johnson-Lindenstrauss projection ``R^D -> R^k``, generated block by block.

    The implicit matrix ``P`` has shape ``(D, k)`` with i.i.d. entries ``N(0, 1) / sqrt(k)``
    (``kind="gaussian"``) or ``+-1 / sqrt(k)`` (``kind="rademacher"``), drawn in float32 and
    cast to the gradients' dtype, so
    ``E[(g1 @ P) . (g2 @ P)] = g1 . g2``: projected dot products are unbiased estimates of the
    originals, with relative error about ``sqrt(2 / k)``.

    Rows ``[b * block_rows, (b + 1) * block_rows)`` of ``P`` are drawn from a `torch.Generator`
    seeded by ``numpy.random.SeedSequence([seed, b])`` only, so ``P`` depends on
    ``(k, seed, kind, block_rows)`` and not on ``D`` or on how gradients are chunked; the full
    ``D x k`` matrix is never built at once. Blocks are cached while the cache stays under
    ``max_cache_bytes`` and regenerated otherwise. Apply the *same* object (or one with equal
    settings) to train and test gradients.
    """

    def __init__(
        self,
        k: int,
        seed: int = 0,
        kind: Literal["gaussian", "rademacher"] = "gaussian",
        block_rows: int = DEFAULT_BLOCK_ROWS,
        max_cache_bytes: int = 256 * 2**20,
    ) -> None:
        if k <= 0:
            raise ValueError(f"projection dimension k must be positive, got {k}")
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"projection kind must be 'gaussian' or 'rademacher', got {kind!r}")
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.k = int(k)
        self.seed = int(seed)
        self.kind = kind
        self.block_rows = int(block_rows)
        self.max_cache_bytes = int(max_cache_bytes)
        self._cache: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._cache_bytes = 0

    def __repr__(self) -> str:
        return f"RandomProjection(k={self.k}, seed={self.seed}, kind={self.kind!r})"

    def block(self, index: int, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``[index * block_rows, index * block_rows + rows)`` of ``P``, ``(rows, k)``."""
        key = (index, rows, dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        state = np.random.SeedSequence([self.seed, index]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        if self.kind == "gaussian":
            mat = torch.randn(self.block_rows, self.k, generator=gen, dtype=torch.float32)
        else:
            bits = torch.randint(0, 2, (self.block_rows, self.k), generator=gen)
            mat = bits.to(torch.float32).mul_(2).sub_(1)
        mat = mat[:rows].to(dtype).mul_(1.0 / np.sqrt(self.k))
        size = mat.numel() * mat.element_size()
        if self._cache_bytes + size <= self.max_cache_bytes:
            self._cache[key] = mat
            self._cache_bytes += size
        return mat

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """Project ``(n, D)`` -> ``(n, k)`` (``grads @ P``), in ``grads``' dtype."""
        if grads.ndim != 2:
            raise ValueError(f"expected a (n, D) matrix, got shape {tuple(grads.shape)}")
        dim = grads.shape[1]
        out = torch.zeros(grads.shape[0], self.k, dtype=grads.dtype, device=grads.device)
        for index, start in enumerate(range(0, dim, self.block_rows)):
            stop = min(start + self.block_rows, dim)
            block = self.block(index, stop - start, grads.dtype).to(grads.device)
            out += grads[:, start:stop] @ block
        return out


def iter_per_example_gradients(
    task: Task,
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    examples: Examples,
    *,
    chunk_size: int = 256,
    dtype: torch.dtype | None = None,
    projection: RandomProjection | None = None,
    loss: FunctionalLoss | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, grads)`` chunks of per-example gradients, in example order.

    ``grads`` has shape ``(m, D)`` (or ``(m, k)`` with a projection) for examples
    ``start .. start + m - 1``, ``m <= chunk_size``. ``loss`` may pass an already built
    `FunctionalLoss` for this checkpoint (then ``checkpoint`` and ``dtype`` are not re-read).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    fl = loss if loss is not None else FunctionalLoss(task, model, checkpoint, dtype)
    n = len(examples)
    for start in range(0, n, chunk_size):
        g = fl.gradients(examples.take(range(start, min(start + chunk_size, n)))).detach()
        yield start, (projection(g) if projection is not None else g)


def per_example_gradients(
    task: Task,
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    examples: Examples,
    *,
    chunk_size: int = 256,
    dtype: torch.dtype | None = None,
    projection: RandomProjection | None = None,
) -> torch.Tensor:
    """Per-example gradients of ``task.example_losses`` w.r.t. the trainable parameters.

    Args:
        task, model, checkpoint: see `FunctionalLoss`.
        examples: ``n`` examples.
        chunk_size: examples per ``vmap(grad)`` call (bounds memory).
        dtype: optional compute dtype (e.g. ``torch.float64``).
        projection: optional `RandomProjection`; applied chunk by chunk.

    Returns:
        Tensor ``(n, D)``, row ``i`` = ``d loss_i / d theta`` flattened in
        ``model.named_parameters()`` order; ``(n, k)`` with a projection. Use ``.numpy()`` for
        an array.
    """
    chunks = [
        g
        for _, g in iter_per_example_gradients(
            task,
            model,
            checkpoint,
            examples,
            chunk_size=chunk_size,
            dtype=dtype,
            projection=projection,
        )
    ]
    if not chunks:
        fl = FunctionalLoss(task, model, checkpoint, dtype)
        width = projection.k if projection is not None else fl.dim
        return torch.zeros(0, width, dtype=fl.theta.dtype, device=fl.theta.device)
    return torch.cat(chunks)
