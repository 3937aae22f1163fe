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

import inspect
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
    """``torch.optim.adam._single_tensor_adam`` for one parameter (no AMSGrad), out of place:
    `_AdamStep` (the same operations forward; one fused backward)."""
    beta1, beta2 = rule.betas
    exp_avg, exp_avg_sq = state
    new_p, m, v, *_ = _apply_adam(
        p, g, exp_avg, exp_avg_sq, step, lr, rule.weight_decay, rule.decoupled, beta1, beta2,
        rule.eps,
    )  # fmt: skip
    return new_p, (m, v)


class _AdamStep(torch.autograd.Function):
    """One Adam/AdamW update as a single autograd node.

    Forward: torch's single-tensor operations in torch's order (bit-identical values):
    ``p <- p (1 - lr wd)`` (AdamW) or ``g <- g + wd p`` (Adam), ``m <- lerp(m, g, 1 - b1)``,
    ``v <- b2 v + (1 - b2) g^2``, ``p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)``.
    Backward: the analytic adjoints of ``(p, g, m, v)`` in a dozen element-wise operations
    instead of autograd's chain through every one (the Adam part of a metagradient's reverse
    pass about 2x faster; vmappable, so batched over test examples). Only first derivatives:
    nothing differentiates a metagradient again. ``sqrt`` has derivative 0 where ``v == 0``
    (a parameter that never had a gradient) instead of ``inf``: the backward's own rule.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        p: torch.Tensor,
        g: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        step: int,
        lr: float,
        wd: float,
        decoupled: bool,
        beta1: float,
        beta2: float,
        eps: float,
    ) -> tuple[torch.Tensor, ...]:
        if wd != 0:
            if decoupled:
                p = p.mul(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        m = exp_avg.lerp(g, 1 - beta1)
        v = exp_avg_sq.mul(beta2).addcmul(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** float(step)
        bias_correction2 = 1 - beta2 ** float(step)
        root = v.sqrt()  # torch's value; its derivative at 0 is the backward's
        denom = (root / bias_correction2**0.5).add(eps)
        return p.addcdiv(m, denom, value=-lr / bias_correction1), m, v, root, denom

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        # the coefficients of the backward, unbatched, so that the backward (batched over test
        # examples) is a few multiply-adds
        p, g, _, _, step, lr, wd, decoupled, beta1, beta2, _ = inputs
        _, m, _, root, denom = output
        ctx.mark_non_differentiable(root, denom)
        if wd != 0 and not decoupled:
            g = g.add(p, alpha=wd)
        step_size = lr / (1 - beta1 ** float(step))
        root_bc2 = (1 - beta2 ** float(step)) ** 0.5
        with torch.no_grad():
            inv = denom.reciprocal()
            # d sqrt(v) / dv, 0 where v == 0 (the inf of 0.5 / 0 is never selected)
            half_inv_root = torch.where(root > 0, 0.5 / root, 0.0)
            to_m = inv.mul(-step_size)  # d p_new / d m_new
            to_v = (m * inv * inv * half_inv_root).mul(step_size / root_bc2)  # d p_new / d v_new
            to_g = g.mul(2 * (1 - beta2))  # d v_new / d g
        ctx.save_for_backward(to_m, to_v, to_g)
        ctx.constants = (1 - lr * wd if decoupled else 1.0, 0.0 if decoupled else wd, beta1, beta2)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, a_p: torch.Tensor, a_m: torch.Tensor | None, a_v: torch.Tensor | None, *_: Any
    ) -> tuple[torch.Tensor | None, ...]:
        to_m, to_v, to_g = ctx.saved_tensors
        shrink, l2, beta1, beta2 = ctx.constants
        # (mul and add: addcmul has no batching rule and would loop over the test examples)
        a_m_new = a_p * to_m if a_m is None else a_m + a_p * to_m
        a_v_new = a_p * to_v if a_v is None else a_v + a_p * to_v
        a_g = a_m_new * (1 - beta1) + a_v_new * to_g
        a_p_in = a_p * shrink if shrink != 1.0 else a_p
        if l2 != 0:
            a_p_in = a_p_in + a_g * l2
        nones = (None,) * 7
        return (a_p_in, a_g, a_m_new * beta1, a_v_new * beta2, *nones)


# `Function.apply` binds its arguments to `forward`'s signature on every call (to fill in
# defaults), and `inspect.signature` rebuilds that signature each time: about a tenth of a
# metagradient's time on digits-mlp with AdamW (384 updates per run). A function's own
# `__signature__` is what `inspect.signature` returns first, so it is computed once here.
_AdamStep.forward.__signature__ = inspect.signature(_AdamStep.forward)  # type: ignore[attr-defined]


#: ``Function.apply`` without its argument binding (`_apply_adam`)
_FUNCTION_APPLY = super(torch.autograd.Function, _AdamStep).apply


def _apply_adam(*args: Any) -> tuple[torch.Tensor, ...]:
    """``_AdamStep.apply(*args)`` (all arguments positional). Outside functorch transforms
    (a replay's forward) straight to autograd's C++ ``apply``: ``Function.apply`` first binds
    the arguments to ``forward``'s signature and applies its defaults, about a third of the
    cost of an update of a small parameter, and positional arguments need none of it."""
    if torch._C._are_functorch_transforms_active():
        return _AdamStep.apply(*args)
    return _FUNCTION_APPLY(*args)


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
