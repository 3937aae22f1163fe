"""Optimizer memory: lag kernels applied to a run's step x example count matrix.

Under momentum (SGD with momentum, Adam's first moment) an example consumed at step ``t`` keeps
moving the parameters, and so the loss, at steps ``t + 1, t + 2, ...``. A one-step Markov model
of the loss (Simfluence-Linear) cannot see that from the batch of step ``t`` alone. Its input
can: replace the batch-weighted count matrix ``N`` (``(T, P)``, one row per step) by

    N'_t = s_t * sum_{k=0}^{t-1} w_{t,k} N_{t-k},   w_{t,k} = (1 - b) b^k / (1 - b^t),

the first-moment kernel with decay ``b``, bias-corrected as Adam corrects its first moment
(the weights of step ``t`` sum to 1, so a row of ``N'`` has the mass of a typical row of ``N``
and "no effect", ``A = 1/b``, still leaves the loss unchanged), and ``s_t`` the learning rate of
step ``t`` over the largest one (1 when the schedule is constant or not scaled). ``b = 0`` and
``s = 1`` give ``N`` itself: today's model.

Scaling by ``s_t`` removes mass from a row: an example's *departure* from "no effect" is scaled,
not the loss itself. Step ``t``'s multiplier is

    alpha_t = sum_i A_i N'_ti + (rest_t / b),   rest_t = (1 - s_t) * sum_i (K N)_ti,

the ``rest`` a neutral pseudo-example (``A = 1/b``, ``B = 0``) that carries the mass the scaling
took away. `MemoryKernel.rest` computes it; the regression treats it as part of its prior.

The same transformation is applied to the recorded runs (the regression) and to every curriculum
simulated later (`LinearSimulator.encode`), so fits, rollouts, attributions and searches agree.
It is a linear map of each count matrix's rows over time, column by column: editing a column
(removing an example) before or after it gives the same result.

Kernels are described by small JSON-able dicts (stored as ``memory_`` on fitted simulators):
``{"decay": b, "lr_scale": bool}``; the per-step scale is stored with the fitted simulator as
an array (``memory_scale_``) and extends a curriculum longer than it with its last value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from simfluence.errors import SimfluenceError
from simfluence.metrics import all_steps_mse
from simfluence.runlog.runs import RunSet
from simfluence.simulators.base import soft_floor
from simfluence.simulators.encoding import encode_runs
from simfluence.simulators.ridge import Design

#: weights of the kernel below this share of its first one are dropped (banded, sparse product)
KERNEL_CUTOFF = 1e-2
#: the decays tried by ``memory="auto"`` besides the recorded optimizer's own
AUTO_DECAYS: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9)


@dataclass(frozen=True)
class MemoryKernel:
    """A lag kernel: first-moment decay ``decay`` in ``[0, 1)``, and whether effects scale with
    the per-step learning rate (``scale``, shape ``(T,)``, in ``(0, 1]``; None: no scaling)."""

    decay: float = 0.0
    scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.decay) < 1.0:
            raise SimfluenceError(f"memory decay must be in [0, 1), got {self.decay!r}")

    @property
    def is_identity(self) -> bool:
        return float(self.decay) == 0.0 and self.scale is None

    def describe(self) -> str:
        text = "none" if float(self.decay) == 0.0 else f"momentum {float(self.decay):g}"
        return text + (" x lr" if self.scale is not None else "")

    def to_config(self) -> dict[str, Any]:
        return {"decay": float(self.decay), "lr_scale": self.scale is not None}

    def lag_matrix(self, n_steps: int) -> sparse.csr_matrix:
        """``(T, T)`` lower-triangular ``diag(s) W``: row ``t`` holds the bias-corrected weights
        ``w_{t,k}`` at column ``t - k`` (times ``s_t`` when scaled)."""
        b = float(self.decay)
        if b == 0.0:
            lag = sparse.identity(n_steps, format="csr")
        else:
            width = min(n_steps, int(np.ceil(np.log(KERNEL_CUTOFF) / np.log(b))) + 1)
            diagonals = [np.full(n_steps - k, (1.0 - b) * b**k) for k in range(width)]
            lag = sparse.diags(diagonals, [-k for k in range(width)], format="csr")
            # bias correction: row t's weights sum to 1 - b^t (Adam divides by that); rows
            # truncated by the cutoff are renormalized alike, so every row sums to 1
            lag = sparse.diags(1.0 / np.asarray(lag.sum(axis=1)).ravel()) @ lag
        return (sparse.diags(self.step_scale(n_steps)) @ lag).tocsr()

    def step_scale(self, n_steps: int) -> np.ndarray:
        """``s_t`` of steps ``1..n_steps``: the stored scale, extended with its last value."""
        if self.scale is None:
            return np.ones(n_steps)
        scale = np.asarray(self.scale, dtype=np.float64)
        if n_steps <= len(scale):
            return scale[:n_steps].copy()
        return np.concatenate([scale, np.full(n_steps - len(scale), scale[-1])])

    def apply(self, counts: sparse.csr_matrix) -> sparse.csr_matrix:
        """``N'`` of one ``(T, P)`` count matrix (the matrix itself for the identity kernel)."""
        if self.is_identity:
            return counts
        out = (self.lag_matrix(counts.shape[0]) @ counts).tocsr()
        out.eliminate_zeros()
        return out

    def rest(self, counts: sparse.csr_matrix) -> np.ndarray:
        """``(T,)``: the mass that lr scaling took away from each row of ``N'`` (zeros without
        scaling): ``(1 - s_t) sum_i (W N)_ti``."""
        n_steps = counts.shape[0]
        if self.scale is None:
            return np.zeros(n_steps)
        unscaled = MemoryKernel(self.decay).apply(counts)
        return (1.0 - self.step_scale(n_steps)) * np.asarray(unscaled.sum(axis=1)).ravel()


def optimizer_decay(runs: RunSet) -> float | None:
    """The first-moment decay of the optimizer the runs were recorded with: Adam's ``beta1``,
    SGD's ``momentum`` (0 for plain SGD); None when the run set does not say."""
    config = runs.metadata.get("config") or {}
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, dict):
        return None
    if "betas" in optimizer:
        return float(optimizer["betas"][0])
    if "momentum" in optimizer:
        return float(optimizer["momentum"])
    return None


def lr_profile(runs: RunSet) -> np.ndarray | None:
    """``(T,)``: the recorded learning rate of each step over the largest one (the median over
    runs that recorded it, by step), or None when no run recorded its rates or they are all the
    same (a constant schedule: nothing to scale)."""
    rates = [r.lr for r in runs.runs if r.lr is not None and len(r.lr)]
    if not rates:
        return None
    longest = max(len(r) for r in rates)
    table = np.full((len(rates), longest), np.nan)
    for k, r in enumerate(rates):
        table[k, : len(r)] = r
    profile = np.nanmedian(table, axis=0)
    top = float(np.max(profile))
    if not np.isfinite(top) or top <= 0 or np.allclose(profile, top, rtol=1e-9, atol=0):
        return None
    return np.clip(profile / top, 0.0, 1.0)


def resolve(spec: Any) -> str | float | tuple[float, str]:
    """Check a ``memory`` parameter: ``"none"``, ``"adam"``, ``"lr"``, ``"adam+lr"``, ``"auto"``,
    a decay in ``[0, 1)`` (a number or its string), or ``"<decay>+lr"`` (that decay, scaled by
    the recorded learning rates). Returns the name, the decay, or ``(decay, "lr")``."""
    usage = "use none, adam, lr, adam+lr, auto, a decay in [0, 1) or '<decay>+lr'"
    scaled = False
    if isinstance(spec, str):
        if spec in ("none", "adam", "lr", "adam+lr", "auto"):
            return spec
        text = spec
        if text.endswith("+lr"):
            text, scaled = text[: -len("+lr")], True
        try:
            spec = float(text)
        except ValueError:
            raise SimfluenceError(f"memory={spec!r}: {usage}") from None
    if isinstance(spec, bool) or not isinstance(spec, int | float | np.floating | np.integer):
        raise SimfluenceError(f"memory={spec!r}: {usage}")
    if not 0.0 <= float(spec) < 1.0:
        raise SimfluenceError(f"memory={spec!r}: a decay must be in [0, 1)")
    return (float(spec), "lr") if scaled else float(spec)


def spec_of(kernel: MemoryKernel) -> str | float:
    """The ``memory`` parameter that stands for `kernel` alone (calibration's refits)."""
    if kernel.scale is None:
        return "none" if float(kernel.decay) == 0.0 else float(kernel.decay)
    return f"{float(kernel.decay):g}+lr"


def candidates(spec: Any, runs: RunSet, weighting: str = "mean") -> list[MemoryKernel]:
    """The kernels a ``memory`` parameter stands for on `runs` (several only for ``"auto"``):

    * ``"none"``: the identity (today's model); a number ``b``: decay ``b``, no scaling;
    * ``"adam"``: the recorded optimizer's first-moment decay (Adam's ``beta1``, SGD's
      momentum; 0 when it has none or the run set does not say); ``"lr"``: scaling by the
      recorded learning rates only; ``"adam+lr"``, ``"<decay>+lr"``: both;
    * ``"auto"``: the identity, `AUTO_DECAYS` and the recorded decay; when the recorded
      learning rates vary, the identity and each of those decays scaled by them instead;
      deduplicated, identity first;
    * several of the above joined by commas (``"none,0.8+lr"``): each one's kernels, in order,
      deduplicated (`auto` gives `hybrid` the kernel that `linear` chose and none this way).

    Scaling needs recorded rates that vary (otherwise a scaled kernel is the unscaled one) and
    "mean" batch weighting (its neutral rest assumes rows of mass ``b``).
    """
    if isinstance(spec, str) and "," in spec:
        out: list[MemoryKernel] = []
        for part in spec.split(","):
            for kernel in candidates(part.strip(), runs, weighting):
                if kernel.to_config() not in [k.to_config() for k in out]:
                    out.append(kernel)
        return out
    spec = resolve(spec)
    profile = lr_profile(runs)
    if profile is not None and weighting != "mean":
        if spec in ("lr", "adam+lr") or isinstance(spec, tuple):
            raise SimfluenceError(
                f"memory={spec!r}: learning-rate scaling needs batch_weighting='mean'"
            )
        profile = None
    recorded = optimizer_decay(runs) or 0.0
    if spec == "none":
        return [MemoryKernel()]
    if isinstance(spec, tuple):
        return [MemoryKernel(spec[0], profile)]
    if not isinstance(spec, str):
        return [MemoryKernel(spec)]
    if spec == "lr":
        return [MemoryKernel(0.0, profile)]
    if spec == "adam":
        return [MemoryKernel(recorded)]
    if spec == "adam+lr":
        return [MemoryKernel(recorded, profile)]
    decays = sorted({*AUTO_DECAYS, recorded})
    if profile is None:
        return [MemoryKernel(b) for b in decays]
    # a varying schedule: the identity, then every decay scaled by it (the unscaled decays,
    # the densest and so dearest kernels, lost to their scaled twins on every AdamW run set
    # measured: benchmarks/results/adamw-*.json)
    return [MemoryKernel()] + [MemoryKernel(b, profile) for b in decays]


class MemoryInputs:
    """Mixin for `DynamicsSimulator` ridge members (`LinearSimulator`): the ``memory``
    parameter, applied to every count matrix the simulator regresses on or rolls out.

    The subclass stores ``self.memory`` (the parameter). Learned state: ``memory_`` (the
    chosen kernel's `MemoryKernel.to_config`), ``memory_scale_`` (its per-step scale, or None),
    ``memory_cv_`` (``[decay, lr_scale, l2, mse]`` rows of the joint search, or None when one
    kernel was given). A simulator without ``memory_`` (files written before it) uses none.
    """

    memory: Any
    memory_: dict[str, Any] | None = None
    memory_scale_: np.ndarray | None = None
    memory_cv_: list[list[float]] | None = None

    # -- the kernel in use ---------------------------------------------------------------------
    def _set_kernel(self, kernel: MemoryKernel) -> None:
        self.memory_ = kernel.to_config()
        self.memory_scale_ = None if kernel.scale is None else np.asarray(kernel.scale)

    def memory_kernel(self, runs: RunSet | None = None) -> MemoryKernel:
        """The kernel fitted (``memory_``), or, before any, the one the ``memory`` parameter
        names on `runs` (a shard of a sharded fit; "auto" has no single kernel there)."""
        if self.memory_ is None and runs is not None:
            found = candidates(self.memory, runs, self.batch_weighting)  # type: ignore[attr-defined]
            if len(found) != 1:
                raise SimfluenceError(
                    f"memory={self.memory!r}: several kernels to choose from; sharded fits "
                    "need one (pass memory=none, adam, a decay, ...)"
                )
            self._set_kernel(found[0])
        if self.memory_ is None:
            return MemoryKernel()
        scale = self.memory_scale_ if self.memory_.get("lr_scale") else None
        return MemoryKernel(float(self.memory_["decay"]), scale)

    def describe_memory(self) -> str:
        return self.memory_kernel().describe()

    # -- inputs --------------------------------------------------------------------------------
    def design(self, runs: RunSet) -> Design:
        kernel = self.memory_kernel(runs)
        design = super().design(runs)  # type: ignore[misc]
        if kernel.is_identity:
            return design
        raw = encode_runs(runs, self.batch_size_, self.batch_weighting)  # type: ignore[attr-defined]
        counts = [kernel.apply(c) for c in raw]
        design.counts = sparse.vstack(counts, format="csr")
        lag = sparse.block_diag([kernel.lag_matrix(c.shape[0]) for c in raw], format="csr")
        stacked = sparse.vstack(raw, format="csr")
        if lag.nnz + stacked.nnz < design.counts.nnz:  # the two products are cheaper
            design.factors = (lag, stacked)
        if kernel.scale is not None:
            design.rest = np.concatenate([self._rest(c) for c in counts])
        return design

    def encode(self, curricula: Sequence[Any]) -> list[sparse.csr_matrix]:
        kernel = self.memory_kernel()
        return [kernel.apply(c) for c in super().encode(curricula)]  # type: ignore[misc]

    def _rest(self, counts: sparse.csr_matrix) -> np.ndarray:
        """``(T,)``: the neutral mass a scaled kernel took from each row, ``b - sum_i N'_ti``
        (rows of mass ``b`` under "mean" weighting)."""
        mass = np.asarray(counts.sum(axis=1)).ravel()
        return np.maximum(self.batch_size_ - mass, 0.0)  # type: ignore[attr-defined]

    def row_mass(self, counts: sparse.csr_matrix) -> np.ndarray:
        mass = super().row_mass(counts)  # type: ignore[misc]
        if self.memory_kernel().scale is None:
            return mass
        return mass + self._rest(counts)

    def rollout_params(
        self,
        counts: Sequence[sparse.csr_matrix],
        A: np.ndarray | None,
        B: np.ndarray,
        slopes: Any,
        initial: np.ndarray,
        envelope: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        if self.memory_kernel().scale is None or A is None:
            return super().rollout_params(counts, A, B, slopes, initial, envelope)  # type: ignore[misc]
        # the rest as one more column: A = 1/b, B = 0 (and no drift)
        counts = [sparse.hstack([c, self._rest(c)[:, None]], format="csr") for c in counts]
        m = B.shape[0]
        A = np.hstack([A, np.full((m, 1), 1.0 / self.batch_size_)])  # type: ignore[attr-defined]
        B = np.hstack([B, np.zeros((m, 1))])
        if slopes is not None:
            slopes = tuple(None if s is None else np.hstack([s, np.zeros((m, 1))]) for s in slopes)
        return super().rollout_params(counts, A, B, slopes, initial, envelope)  # type: ignore[misc]

    # -- choosing the kernel -------------------------------------------------------------------
    def run_counts(self, runs: RunSet) -> list[sparse.csr_matrix]:
        kernel = self.memory_kernel()
        return [kernel.apply(c) for c in super().run_counts(runs)]  # type: ignore[misc]

    def _validation_mse(
        self, runs: RunSet, params: Any, floor: Any, slopes: Any = None, time_scale: float = 0.0
    ) -> float:
        kernel = self.memory_kernel()
        if kernel.is_identity:
            return super()._validation_mse(runs, params, floor, slopes, time_scale)  # type: ignore[misc]
        if slopes is not None:  # a prior's drift (the ridge inside `hybrid`)
            self.time_scale_ = time_scale
        initial = np.stack([r.initial_loss for r in runs.runs])
        simulated = self.rollout_params(self.run_counts(runs), *params, slopes, initial)
        for traj in simulated:
            soft_floor(traj[1:], *floor)
        return all_steps_mse([r.losses for r in runs.runs], simulated).mean

    def _calibration_params(self) -> dict[str, Any]:
        params = super()._calibration_params()  # type: ignore[misc]
        if self.memory_ is not None:
            params["memory"] = spec_of(self.memory_kernel())  # no nested choice of kernel
        return params

    def _fit_parameters(self, runs: RunSet) -> None:
        self.memory_ = self.memory_scale_ = self.memory_cv_ = None
        kernels = candidates(self.memory, runs, self.batch_weighting)  # type: ignore[attr-defined]
        self._set_kernel(kernels[0])
        if len(kernels) == 1:
            super()._fit_parameters(runs)  # type: ignore[misc]
            return
        if self.test_shards is not None or self.backend != "serial":  # type: ignore[attr-defined]
            raise SimfluenceError(
                f"memory={self.memory!r}: choosing the kernel is not sharded; pass one kernel "
                "(memory=none, adam, a decay, ...) with test_shards or a backend"
            )
        grid = self._validate_params(runs)  # type: ignore[attr-defined]
        if len(runs.runs) < 2:
            raise SimfluenceError(
                f"memory={self.memory!r}: choosing the kernel by cross-validation needs at "
                f"least 2 training runs (got {len(runs.runs)})"
            )
        cv_runs = self._cv_runs(runs)  # type: ignore[attr-defined]
        table: list[list[float]] = []
        best: tuple[float, int, float] | None = None
        curves = []
        for k, kernel in enumerate(kernels):
            self._set_kernel(kernel)
            curve = self._cross_validate(cv_runs, grid)  # type: ignore[attr-defined]
            curves.append(curve)
            for lam, mse in curve:
                table.append([float(kernel.decay), float(kernel.scale is not None), lam, mse])
                # strictly better only: ties keep the earlier (simpler) kernel, larger l2
                if np.isfinite(mse) and (best is None or mse < best[0]):
                    best = (mse, k, lam)
        choice, lam = (0, grid[0]) if best is None else (best[1], best[2])
        self._set_kernel(kernels[choice])
        self.memory_cv_ = table
        self.cv_mse_ = curves[choice]
        self.l2_ = lam
        design = self.design(runs)
        self.A_, self.B_ = next(self._path(design, [lam], final=True))  # type: ignore[attr-defined]
        self.seen_ = design.seen


__all__ = [
    "AUTO_DECAYS",
    "MemoryInputs",
    "MemoryKernel",
    "candidates",
    "lr_profile",
    "optimizer_decay",
    "resolve",
    "spec_of",
]
