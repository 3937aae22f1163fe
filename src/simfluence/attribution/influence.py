"""Influence functions (Koh & Liang 2017) as additive Simfluence parameters ``B_i(z)``.

Convention (same sign and units as `simfluence.attribution.tracin`)::

    B_i(z) = -(eta / b) * grad l(z)^T (H + lambda I)^{-1} grad l(z_i)

at one checkpoint ``theta`` (usually the final one), where

* ``H`` is the Hessian of the **mean** training loss over the pool,
  ``H = (1/n) sum_i d^2 l(z_i; theta) / d theta^2`` (``curvature="hessian"``), or the
  empirical Fisher ``F = (1/n) sum_i g_i g_i^T`` (``curvature="fisher"``; positive
  semi-definite, a Gauss-Newton-like approximation -- the true generalized Gauss-Newton needs
  the model outputs, which the `Task` contract does not expose);
* ``lambda`` is the damping (``damping``, absolute, added to every eigenvalue);
* ``eta`` is the learning rate and ``b`` the batch size.

**How the influence is spread over the steps.** ``B_i(z)`` is the effect of *one consumption*
of ``i``: the first-order change of the test loss from one SGD step's share of example ``i``
(``-(eta / b) g_i``), preconditioned by ``(H + lambda I)^{-1}``. The simulator adds it every time
``i`` is consumed, so an example consumed ``m`` times contributes ``m * B_i(z)``. Without the
preconditioner this is exactly one TracIn step. (Koh & Liang's "upweighting" influence
``-g_z^T H^{-1} g_i`` is ``B_i(z) * b / eta``; pass ``lr=1, batch_size=1`` to get it.)

A **negative** entry means that consuming ``i`` once lowers ``z``'s loss.

Solvers: ``method="dense"`` builds ``H`` column block by column block from exact
Hessian-vector products (``D x D`` memory) and calls ``torch.linalg.solve`` -- the reference for
small models. The iterative solvers solve ``(H + lambda I) s_z = g_z`` for all test examples at
once (batched Hessian-vector products by forward-over-reverse ``jvp(grad)``), never forming
``H``: ``method="minres"`` (MINRES; right for a symmetric *indefinite* matrix, which the Hessian
of a network away from a minimum usually is -- e.g. eigenvalues in [-0.85, 0.83] for the
digits MLP at initialisation) and ``method="cg"`` (conjugate gradient; needs ``H + lambda I``
positive definite, warns on non-positive curvature; right for ``curvature="fisher"``).
``"auto"`` picks dense for ``D <= 3000``, else MINRES for the Hessian and CG for the Fisher.
With an indefinite ``H`` the solve is exact but ``(H + lambda I)^{-1}`` may amplify directions
whose eigenvalue is near ``-lambda``: choose ``damping`` above ``-lambda_min(H)`` or use the
Fisher when that matters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

from simfluence.attribution.gradients import FunctionalLoss, iter_per_example_gradients
from simfluence.recording.task import Examples, Task

__all__ = ["DENSE_MAX_DIM", "batched_cg", "batched_minres", "influence_scores"]

#: ``method="auto"`` solves densely up to this many trainable parameters
DENSE_MAX_DIM = 3000


def batched_cg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    tol: float = 1e-8,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``A x_j = rhs_j`` for every row ``j`` by conjugate gradient, all rows at once.

    Args:
        matvec: maps ``(m, D)`` to ``(m, D)``, row-wise ``A @ v`` (``A`` symmetric positive
            definite).
        rhs: ``(m, D)``.
        tol: stop a row when ``||r|| <= tol * ||rhs||``.
        max_iter: iteration cap.

    Returns:
        ``(x, relative_residual)`` with shapes ``(m, D)`` and ``(m,)``.
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    bnorm = rs.sqrt().clamp_min(torch.finfo(rhs.dtype).tiny)
    active = rs.sqrt() > tol * bnorm
    warned = False
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ap = matvec(p)
        pap = (p * ap).sum(1)
        bad = active & (pap <= 0)
        if bool(bad.any()):
            if not warned:
                warnings.warn(
                    "CG met non-positive curvature: H + damping*I is not positive definite; "
                    "increase the damping or use curvature='fisher'",
                    RuntimeWarning,
                    stacklevel=3,
                )
                warned = True
            active = active & ~bad
        safe = torch.where(active, pap, torch.ones_like(pap))
        alpha = torch.where(active, rs / safe, torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), 0.0)
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > tol * bnorm)
    residual = rs.sqrt() / bnorm
    if bool((residual > tol).any()) and not warned:
        warnings.warn(
            f"CG stopped after {max_iter} iterations with relative residual "
            f"{float(residual.max()):.2e} > tol {tol:.0e}",
            RuntimeWarning,
            stacklevel=3,
        )
    return x, residual


def batched_minres(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    tol: float = 1e-8,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``A x_j = rhs_j`` for every row ``j`` by MINRES, all rows at once.

    ``A`` must be symmetric and nonsingular but may be **indefinite** (a Hessian away from a
    minimum). Unpreconditioned MINRES of Paige & Saunders (1975), following
    `scipy.sparse.linalg.minres`, with every scalar turned into an ``(m,)`` tensor.

    Args:
        matvec: maps ``(m, D)`` to ``(m, D)``, row-wise ``A @ v``.
        rhs: ``(m, D)``.
        tol: stop a row when its residual norm estimate ``<= tol * ||rhs||``.
        max_iter: iteration cap.

    Returns:
        ``(x, relative_residual)`` with shapes ``(m, D)`` and ``(m,)`` (the residual is
        MINRES's estimate ``||rhs - A x|| / ||rhs||``).
    """
    tiny = torch.finfo(rhs.dtype).tiny
    eps = torch.finfo(rhs.dtype).eps
    x = torch.zeros_like(rhs)
    r1 = rhs.clone()
    r2 = rhs.clone()
    y = rhs.clone()
    beta1 = rhs.norm(dim=1)
    beta = beta1.clone()
    oldb = torch.zeros_like(beta1)
    dbar = torch.zeros_like(beta1)
    epsln = torch.zeros_like(beta1)
    phibar = beta1.clone()
    cs = -torch.ones_like(beta1)
    sn = torch.zeros_like(beta1)
    w = torch.zeros_like(rhs)
    w2 = torch.zeros_like(rhs)
    scale = beta1.clamp_min(tiny)
    active = beta1 > 0
    for itn in range(1, max_iter + 1):
        if not bool(active.any()):
            break
        beta_safe = torch.where(beta > tiny, beta, torch.ones_like(beta))
        v = y / beta_safe[:, None]
        y = matvec(v)
        if itn >= 2:
            oldb_safe = torch.where(oldb > tiny, oldb, torch.ones_like(oldb))
            y = y - (beta / oldb_safe)[:, None] * r1
        alfa = (v * y).sum(1)
        y = y - (alfa / beta_safe)[:, None] * r2
        r1, r2 = r2, y
        oldb, beta = beta, y.norm(dim=1)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar**2 + beta**2).clamp_min(eps)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        phibar = torch.where(active, sn * phibar, phibar)
        w1, w2 = w2, w
        w = (v - oldeps[:, None] * w1 - delta[:, None] * w2) / gamma[:, None]
        x = torch.where(active[:, None], x + phi[:, None] * w, x)
        active = active & (phibar > tol * scale) & (beta > tiny)
    residual = phibar / scale
    if bool((residual > tol).any()):
        warnings.warn(
            f"MINRES stopped after {max_iter} iterations with relative residual "
            f"{float(residual.max()):.2e} > tol {tol:.0e}",
            RuntimeWarning,
            stacklevel=3,
        )
    return x, residual


def _dense_matrix(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    dtype: torch.dtype,
    block: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    mat = torch.empty(dim, dim, dtype=dtype, device=device)
    for start in range(0, dim, block):
        stop = min(start + block, dim)
        eye = torch.zeros(stop - start, dim, dtype=dtype, device=device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        mat[start:stop] = matvec(eye)
    return 0.5 * (mat + mat.T)


def influence_scores(
    task: Task,
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    lr: float,
    pool: Examples,
    tests: Examples,
    batch_size: int,
    *,
    damping: float = 1e-3,
    curvature: Literal["hessian", "fisher"] = "hessian",
    method: Literal["auto", "dense", "cg", "minres"] = "auto",
    hessian_examples: Examples | None = None,
    tol: float = 1e-8,
    max_iter: int = 1000,
    chunk_size: int = 256,
    vector_chunk: int = 64,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Influence-function parameters ``B_i(z) = -(lr/b) g_z^T (H + damping I)^{-1} g_i``.

    Args:
        task, model: the workload and an instance of its architecture.
        checkpoint: ``name -> tensor``, the parameters ``theta`` (usually the final ones).
        lr: ``eta``, the learning rate of a step at ``theta``.
        pool: the ``n_train`` training examples (scored; also define ``H`` by default).
        tests: the ``n_test`` test examples.
        batch_size: ``b``, the training batch size.
        damping: ``lambda >= 0`` added to the diagonal.
        curvature: ``"hessian"`` (exact, via Hessian-vector products) or ``"fisher"``
            (empirical Fisher of the per-example gradients; keeps ``n x D`` gradients).
        method: ``"dense"`` (exact solve, ``D x D`` memory), ``"minres"`` (batched MINRES,
            indefinite-safe), ``"cg"`` (batched conjugate gradient, positive definite only) or
            ``"auto"`` (dense iff ``D <= DENSE_MAX_DIM``, else MINRES for the Hessian and CG
            for the Fisher). The iterative solvers never form ``H``.
        hessian_examples: examples whose mean loss defines ``H``; default ``pool``.
        tol, max_iter: iterative solver's stopping rule (relative residual) and cap.
        chunk_size: examples per forward pass; vector_chunk: vectors per batched HVP.
        dtype: optional compute dtype (``torch.float64`` recommended for small references).

    Returns:
        float64 array ``(n_test, n_train)``; negative = consuming ``i`` once lowers ``z``'s loss.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if curvature not in ("hessian", "fisher"):
        raise ValueError(f"curvature must be 'hessian' or 'fisher', got {curvature!r}")
    if method not in ("auto", "dense", "cg", "minres"):
        raise ValueError(f"method must be 'auto', 'dense', 'cg' or 'minres', got {method!r}")
    fl = FunctionalLoss(task, model, checkpoint, dtype)
    h_examples = pool if hessian_examples is None else hessian_examples
    if len(h_examples) == 0:
        raise ValueError("the Hessian needs at least one example")
    if method == "auto":
        iterative = "cg" if curvature == "fisher" else "minres"
        method = "dense" if fl.dim <= DENSE_MAX_DIM else iterative

    def grads(examples: Examples) -> torch.Tensor:
        chunks = [
            g
            for _, g in iter_per_example_gradients(
                task, model, checkpoint, examples, chunk_size=chunk_size, loss=fl
            )
        ]
        if chunks:
            return torch.cat(chunks)
        return torch.zeros(0, fl.dim, dtype=fl.theta.dtype, device=fl.theta.device)

    if curvature == "fisher":
        fisher_grads = grads(h_examples)
        n_h = fisher_grads.shape[0]

        def curv_mv(v: torch.Tensor) -> torch.Tensor:
            return (v @ fisher_grads.T) @ fisher_grads / n_h

    else:

        def curv_mv(v: torch.Tensor) -> torch.Tensor:
            return fl.mean_loss_hvp(h_examples, v, chunk_size, vector_chunk)

    def damped_mv(v: torch.Tensor) -> torch.Tensor:
        return curv_mv(v) + damping * v

    test_grads = grads(tests)  # (n_test, D)
    if method == "dense":
        mat = _dense_matrix(
            damped_mv, fl.dim, fl.theta.dtype, max(vector_chunk, 1), fl.theta.device
        )
        solved = torch.linalg.solve(mat, test_grads.T).T
    else:
        solver = batched_cg if method == "cg" else batched_minres
        solved, _ = solver(damped_mv, test_grads, tol=tol, max_iter=max_iter)
    out = torch.zeros(len(tests), len(pool), dtype=torch.float64)
    for start, g in iter_per_example_gradients(
        task, model, checkpoint, pool, chunk_size=chunk_size, loss=fl
    ):
        out[:, start : start + g.shape[0]] = (solved @ g.T).to("cpu", torch.float64)
    return (-(lr / batch_size) * out).numpy()
