"""Differentiable copies of the optimizer updates that recorded runs train with.

Replaying a run (`simfluence.attribution.replay`) and differentiating through it
(`simfluence.attribution.unrolled`, as MAGIC does) needs each optimizer step as a *function*
``(params, grads, state) -> (params, state)`` built from out-of-place tensor operations, so
autograd can walk back through it. These functions repeat torch's own single-tensor updates
(``torch.optim.sgd._single_tensor_sgd``, ``torch.optim.adam._single_tensor_adam``: what torch
runs on the CPU) operation for operation, so a replay reproduces a recorded run to the last bit
on the machine that recorded it:

* SGD with weight decay (L2, added to the gradient), momentum, dampening and Nesterov;
* Adam and AdamW (decoupled weight decay ``p <- p (1 - lr wd)``), the first moment by
  ``lerp``, the second by ``mul + addcmul``, bias corrections in Python floats as torch
  computes them. The only change: ``sqrt`` of the second moment has derivative 0 where the
  moment is exactly 0 (a parameter that never had a gradient) instead of ``inf``, so an unused
  parameter contributes 0 to a metagradient instead of NaN; the value is the same.

Gradient clipping by total norm (``torch.nn.utils.clip_grad_norm_``, on by default in Hugging
Face's ``Trainer``) is `clip_gradients`.

State: ``{parameter name: tuple of tensors}`` (SGD with momentum: the momentum buffer; Adam: the
two moments) plus the number of steps taken; all tensors take part in the autograd graph.
Optimizers or options outside this list (AMSGrad, ``maximize``, another class) are refused by
name with `ReplayError` rather than replayed wrongly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from simfluence.errors import SimfluenceError

Params = dict[str, torch.Tensor]
#: optimizer state: parameter name -> tensors (momentum buffer; or Adam's two moments)
State = dict[str, tuple[torch.Tensor, ...]]

#: hyper-parameters that change nothing numerically on the CPU (or are handled here)
_IGNORED = {"lr", "foreach", "fused", "capturable", "differentiable", "params", "initial_lr"}


class UnsupportedOptimizerError(SimfluenceError):
    """The recorded optimizer (or one of its options) has no differentiable copy here."""


@dataclass(frozen=True)
class GroupRule:
    """The update of one parameter group: the algorithm and its hyper-parameters.

    Attributes:
        kind: ``"sgd"`` or ``"adam"``.
        lr_ratio: this group's rate / the first group's rate (the rate recorded per step is
            the first group's; schedules scale every group alike).
        weight_decay: SGD and Adam: L2 added to the gradient; AdamW: decoupled.
        decoupled: AdamW's decoupled weight decay.
        momentum, dampening, nesterov: SGD's.
        betas, eps: Adam's.
    """

    kind: str
    lr_ratio: float = 1.0
    weight_decay: float = 0.0
    decoupled: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @property
    def stateless(self) -> bool:
        return self.kind == "sgd" and self.momentum == 0


@dataclass
class FunctionalOptimizer:
    """A torch optimizer's update as a differentiable function of parameters and state.

    Attributes:
        name: the torch class name (``"SGD"``, ``"Adam"``, ``"AdamW"``).
        rules: parameter name -> its group's `GroupRule` (trainable parameters only).
        max_grad_norm: clip the gradients to this total 2-norm before each step (None: no).
    """

    name: str
    rules: dict[str, GroupRule]
    max_grad_norm: float | None = None
    _steps: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def is_plain_sgd(self) -> bool:
        """No state, no weight decay, no clipping: ``p <- p - lr g``."""
        return self.max_grad_norm is None and all(
            r.stateless and r.weight_decay == 0 for r in self.rules.values()
        )

    def initial_state(self, params: Mapping[str, torch.Tensor]) -> State:
        """The state before the first step: zeros (Adam's moments; SGD's momentum buffer is
        created from the first gradient, as torch does, so it starts empty)."""
        state: State = {}
        for name, p in params.items():
            rule = self.rules.get(name)
            if rule is not None and rule.kind == "adam":
                state[name] = (torch.zeros_like(p), torch.zeros_like(p))
            else:
                state[name] = ()
        return state

    def step(
        self,
        params: Mapping[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor | None],
        state: State,
        step: int,
        lr: float,
    ) -> tuple[Params, State]:
        """One update at 1-based `step` with the first group's rate `lr`: new parameters and
        state (out of place; differentiable in every input tensor). A parameter whose gradient
        is None, or that no parameter group holds, is left as it is, as torch leaves it."""
        if self.max_grad_norm is not None:
            grads = clip_gradients(grads, self.max_grad_norm)
        new_params: Params = {}
        new_state: State = {}
        for name, p in params.items():
            g, rule = grads.get(name), self.rules.get(name)
            if g is None or rule is None:
                new_params[name], new_state[name] = p, state[name]
                continue
            rate = lr * rule.lr_ratio
            if rule.kind == "adam":
                new_params[name], new_state[name] = _adam(p, g, state[name], step, rate, rule)
            else:
                new_params[name], new_state[name] = _sgd(p, g, state[name], rate, rule)
        return new_params, new_state


def _sgd(
    p: torch.Tensor, g: torch.Tensor, state: tuple[torch.Tensor, ...], lr: float, rule: GroupRule
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``torch.optim.sgd._single_tensor_sgd`` for one parameter, out of place."""
    if rule.weight_decay != 0:
        g = g.add(p, alpha=rule.weight_decay)
    if rule.momentum != 0:
        buf = g if not state else state[0].mul(rule.momentum).add(g, alpha=1 - rule.dampening)
        g = g.add(buf, alpha=rule.momentum) if rule.nesterov else buf
        state = (buf,)
    return p.add(g, alpha=-lr), state


def _adam(
    p: torch.Tensor,
    g: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    step: int,
    lr: float,
    rule: GroupRule,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``torch.optim.adam._single_tensor_adam`` for one parameter (no AMSGrad), out of place."""
    beta1, beta2 = rule.betas
    if rule.weight_decay != 0:
        if rule.decoupled:
            p = p.mul(1 - lr * rule.weight_decay)
        else:
            g = g.add(p, alpha=rule.weight_decay)
    exp_avg, exp_avg_sq = state
    exp_avg = exp_avg.lerp(g, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    denom = (_safe_sqrt(exp_avg_sq) / bias_correction2**0.5).add(rule.eps)
    return p.addcdiv(exp_avg, denom, value=-step_size), (exp_avg, exp_avg_sq)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` with derivative 0 (not inf) where ``x == 0``."""
    positive = x > 0
    root = torch.where(positive, x, torch.ones_like(x)).sqrt()
    return torch.where(positive, root, torch.zeros_like(x))


def clip_gradients(
    grads: Mapping[str, torch.Tensor | None], max_norm: float
) -> dict[str, torch.Tensor | None]:
    """``torch.nn.utils.clip_grad_norm_(..., max_norm)`` out of place: every gradient times
    ``min(1, max_norm / (total 2-norm + 1e-6))``."""
    present = [g for g in grads.values() if g is not None]
    if not present:
        return dict(grads)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {k: None if g is None else g.mul(coef) for k, g in grads.items()}


def functional_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, max_grad_norm: float | None = None
) -> FunctionalOptimizer:
    """The differentiable copy of `optimizer` (built over `model`'s parameters), keyed by the
    model's parameter names; `UnsupportedOptimizerError` naming the optimizer or option that
    has none."""
    name = type(optimizer).__name__
    if type(optimizer) is torch.optim.SGD:
        kind = "sgd"
    elif type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        kind = "adam"
    else:
        raise UnsupportedOptimizerError(
            f"trains with {name}; replaying a run (unrolled, dvemb) supports SGD, Adam and "
            "AdamW: with another optimizer the replay would be another run"
        )
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise UnsupportedOptimizerError(f"max_grad_norm {max_grad_norm!r}: must be above 0")
    names = {id(p): n for n, p in model.named_parameters()}
    base_lr = float(optimizer.param_groups[0]["lr"])
    rules: dict[str, GroupRule] = {}
    for group in optimizer.param_groups:
        rule = _group_rule(name, kind, group, base_lr)
        for p in group["params"]:
            if p.requires_grad and id(p) in names:
                rules[names[id(p)]] = rule
    return FunctionalOptimizer(name, rules, max_grad_norm)


def _group_rule(name: str, kind: str, group: dict[str, Any], base_lr: float) -> GroupRule:
    for flag in ("maximize", "amsgrad"):
        if group.get(flag):
            raise UnsupportedOptimizerError(f"trains with {name}({flag}=True), not replayed")
    ratio = float(group["lr"]) / base_lr if base_lr else 1.0
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if kind == "sgd":
        return GroupRule(
            "sgd",
            ratio,
            wd,
            momentum=float(group.get("momentum", 0.0) or 0.0),
            dampening=float(group.get("dampening", 0.0) or 0.0),
            nesterov=bool(group.get("nesterov", False)),
        )
    beta1, beta2 = (float(b) for b in group["betas"])
    decoupled = bool(group.get("decoupled_weight_decay", name == "AdamW"))
    return GroupRule("adam", ratio, wd, decoupled, betas=(beta1, beta2), eps=float(group["eps"]))
