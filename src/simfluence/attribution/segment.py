"""One stretch of a recorded run rebuilt as an autograd graph, for `unrolled`'s reverse pass:
consecutive optimizer steps as a differentiable function of their start parameters, their
optimizer state and their consumption weights (MAGIC's metagradient, one segment at a time)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from simfluence.attribution.optimizers import FunctionalOptimizer, State
from simfluence.attribution.replay import (
    REPLAY_TOLERANCE,
    Params,
    Replay,
    compare_parameters,
)


class Segment:
    """Consecutive optimizer steps rebuilt as one autograd graph of their start parameters,
    optimizer state and consumption weights (each step's gradient taken with
    ``create_graph``; plain SGD's update as ``torch.add(p, g, alpha=-lr)`` like
    `torch.optim.SGD`, any other through its differentiable copy, so the graph's forward
    reproduces the run). `pull_back` then takes adjoints at the segment's end back to its start.

    Args:
        start_state: the optimizer state at the segment's start (``{}`` for plain SGD).
        first_step: the 1-based step number of the segment's first step (Adam's bias
            corrections count steps).
        rule: the differentiable optimizer; None for plain SGD.
        rng: the torch RNG state before each step, restored before it (tasks with dropout);
            None: record them while building (the segment starts the run).
        saved, tolerance: checkpoints ``{step: state_dict}`` to compare the forward with
            (steps counted from the segment's start); ``error`` is the largest difference.
        probes: per step, the inputs of its zero-weight probes (`simfluence.attribution.probes`)
            or None: their losses enter the batch loss at weight 0 over the real batch size,
            which leaves the forward as it was to the last bit, and `pull_back` returns the
            metagradients of their weights too.
    """

    def __init__(
        self,
        replay: Replay,
        start: Params,
        start_state: State,
        batches: list[dict[str, torch.Tensor]],
        lrs: list[float],
        first_step: int,
        rule: FunctionalOptimizer | None,
        rng: list[torch.Tensor] | None,
        saved: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        tolerance: float = REPLAY_TOLERANCE,
        probes: list[dict[str, torch.Tensor] | None] | None = None,
    ) -> None:
        self.names = list(start)
        self.leaves = {n: p.detach().requires_grad_(True) for n, p in start.items()}
        self.state_leaves = [t.detach().requires_grad_(True) for t in _flat(start_state)]
        dtype = self.leaves[self.names[0]].dtype
        self.weights: list[torch.Tensor] = []
        self.probe_weights: list[torch.Tensor] = []
        self.error = 0.0
        params: Params = self.leaves
        state = _unflat(start_state, self.state_leaves)
        with torch.enable_grad():
            for t, (inputs, lr) in enumerate(zip(batches, lrs, strict=True), start=1):
                n = next(iter(inputs.values())).shape[0]
                w = torch.ones(n, dtype=dtype, requires_grad=True)
                self.weights.append(w)
                if rng is not None:
                    torch.set_rng_state(rng[t - 1])
                loss = (replay.losses(params, inputs) * w).sum() / n
                if probes is not None and probes[t - 1] is not None:
                    loss = loss + self._probe_term(replay, params, probes[t - 1], n, dtype)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                if rule is None:
                    params = {
                        k: torch.add(p, g, alpha=-lr)
                        for (k, p), g in zip(params.items(), grads, strict=True)
                    }
                else:
                    named = dict(zip(params, grads, strict=True))
                    params, state = rule.step(params, named, state, first_step + t - 1, lr)
                if saved and t in saved:
                    detached = {k: v.detach() for k, v in params.items()}
                    self.error = max(
                        self.error, compare_parameters(detached, saved[t], t, tolerance)
                    )
        self.outputs = [params[k] for k in self.names]
        self.state_outputs = _flat(state)
        self.end: Params = {k: params[k].detach() for k in self.names}
        self.end_state: State = _unflat(state, [t.detach() for t in self.state_outputs])

    def _probe_term(
        self,
        replay: Replay,
        params: Params,
        inputs: dict[str, torch.Tensor],
        n: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``sum(0 x probe losses) / n``, its zero weights kept for `pull_back`; the torch RNG
        is left as it was (a task with dropout draws the real batch's masks as recorded)."""
        k = next(iter(inputs.values())).shape[0]
        weight = torch.zeros(k, dtype=dtype, requires_grad=True)
        self.probe_weights.append(weight)
        rng = torch.get_rng_state()
        term = (replay.losses(params, inputs) * weight).sum() / n
        torch.set_rng_state(rng)
        return term

    def pull_back(
        self, adjoint: Params, adjoint_state: list[torch.Tensor] | None, test_chunk: int
    ) -> tuple[Params, list[torch.Tensor] | None, np.ndarray, np.ndarray]:
        """Adjoints ``name -> (M, *shape)`` of the parameters (and, in `_flat` order, of the
        optimizer state; None: zero, as at the run's end) at the end -> at the start, and
        ``d L_T / d w`` of the segment's consumptions ``(M, C_segment)`` and of its probes
        ``(M, P_segment)``: one backward pass per chunk of test examples, batched over them
        (``is_grads_batched``); frees the graph."""
        m = adjoint[self.names[0]].shape[0]
        outputs = list(self.outputs)
        if adjoint_state is not None:
            outputs += self.state_outputs
        weights = self.weights + self.probe_weights
        inputs = [self.leaves[k] for k in self.names] + self.state_leaves + weights
        n_params, n_state = len(self.names), len(self.state_leaves)
        new: list[list[torch.Tensor]] = [[] for _ in range(n_params + n_state)]
        g_w = []
        with torch.enable_grad():
            for s in range(0, m, test_chunk):
                given = [adjoint[k][s : s + test_chunk] for k in self.names]
                if adjoint_state is not None:
                    given += [a[s : s + test_chunk] for a in adjoint_state]
                res = torch.autograd.grad(
                    outputs,
                    inputs,
                    grad_outputs=given,
                    is_grads_batched=True,
                    retain_graph=s + test_chunk < m,
                    allow_unused=True,
                )
                pairs = zip(inputs[: len(new)], res[: len(new)], strict=True)
                for k, (leaf, r) in enumerate(pairs):
                    shape = (len(given[0]), *leaf.shape)
                    new[k].append(r.detach() if r is not None else leaf.new_zeros(shape))
                g_w.append(torch.cat([r.detach() for r in res[n_params + n_state :]], dim=1))
        self.outputs, self.state_outputs = [], []  # the graph is spent
        params = {k: torch.cat(new[j]) for j, k in enumerate(self.names)}
        state = [torch.cat(v) for v in new[n_params:]] if n_state else None
        both = torch.cat(g_w).double().numpy()
        real = sum(w.numel() for w in self.weights)
        return params, state, both[:, :real], both[:, real:]


def _flat(state: State) -> list[torch.Tensor]:
    """The state's tensors in a fixed order (parameter name order, then each one's tuple)."""
    return [t for name in state for t in state[name]]


def _unflat(like: State, tensors: Sequence[torch.Tensor]) -> State:
    """`like`'s structure filled with `tensors` (`_flat`'s order)."""
    out: State = {}
    k = 0
    for name, parts in like.items():
        out[name] = tuple(tensors[k : k + len(parts)])
        k += len(parts)
    return out
