"""Is the final test loss close to linear in the example weights? (MAGIC's "metasmoothness").

First-order answers (metagradients `unrolled`, DVEmb, and every method built on them) predict
the effect of removing examples by a linear function of the consumption weights. They can only
be trusted where the final test loss *is* close to linear in those weights, over the size of
change asked about. This module measures that on the run itself, by actual retraining.

Give every consumption ``c`` of the run (training example ``i`` consumed at step ``t``) a loss
weight ``w_c`` (1 in the recorded run; `simfluence.attribution.unrolled`). A *direction*
``d`` (shape ``(C,)``) sets a random `fraction` of the consumptions toward weight 0
(``d_c = -1`` for them, 0 elsewhere). The run is retrained at ``w = 1 + s d`` for ``s = 0.5``
and ``s = 1`` (`simfluence.recording.loop.final_test_losses`, bit-identical to the recording's
training otherwise), and with ``L(w)`` the final test losses (shape ``(M,)``)::

    Delta(s) = L(1 + s d) - L(1)                                  (M,)
    nonlinearity        = ||Delta(1) - 2 Delta(0.5)|| / ||Delta(1)||
    first_order_error   = ||Delta(1) - G d|| / ||Delta(1)||      (when metagradients G are given)

norms over the test examples. ``G`` is ``(M, C)``: ``G[z, c] = d L_T(z) / d w_c`` at ``w = 1``
(`Metagradients.grads`), so ``G d`` is the first-order prediction of ``Delta(1)``. Signs:
``Delta`` is ``L(without) - L(with)``-like (removing weight), the *opposite* sign of the
``effect = L(with) - L(without)`` convention of `simfluence.counterfactual`; the ratios do not
depend on it. A linear ``L`` gives ``nonlinearity = 0`` exactly; for ``Delta(s) = a s + b s^2``
it is ``|b| / 2 / |a + b|`` (first-order error twice that), so `NONLINEAR_THRESHOLD` = 0.3
flags a curvature term larger than the linear one (``b > 1.5 a``). Removing 10% of a run's
consumptions is a large change: on digits-mlp (50 tests) the ratio measured 0.17 on plain SGD
and 0.26 on AdamW with warm-up and decay, where ``unrolled`` still ranked 10% removals with LDS
0.97 and 0.92 (docs/counterfactuals.md); the threshold sits above both. With one test example
the norm is one number and the ratio is noisier. Cost: ``2 D`` retrains (``D``
directions; ``L(1)`` is the run's recorded final loss, which retraining reproduces).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from simfluence.recording.loop import final_test_losses, torch_threads
from simfluence.recording.optim import Schedule
from simfluence.recording.task import Examples, Task
from simfluence.runlog.runs import Run, RunSet

__all__ = [
    "DEFAULT_DIRECTIONS",
    "NONLINEAR_THRESHOLD",
    "Smoothness",
    "measure_smoothness",
    "per_batch_weights",
    "random_directions",
    "recorded_run_smoothness",
    "run_smoothness",
    "smoothness_from_retrains",
    "smoothness_line",
    "smoothness_weights",
]

#: directions measured by default (`attribute`, `validate`): 2 retrains each
DEFAULT_DIRECTIONS = 3
#: share of the run's consumptions each direction sets toward weight 0
DIRECTION_FRACTION = 0.1
#: mean nonlinearity ratio above which an answer is "not close to linear"
NONLINEAR_THRESHOLD = 0.3


@dataclass
class Smoothness:
    """How close to linear the final test loss is in the consumption weights.

    Attributes:
        nonlinearity: per direction, ``||Delta(1) - 2 Delta(0.5)|| / ||Delta(1)||`` (0 =
            linear).
        first_order_error: per direction, ``||Delta(1) - G d|| / ||Delta(1)||`` (None without
            metagradients).
        change: per direction, ``||Delta(1)||`` (the size of the actual change).
        fraction: share of the consumptions each direction zeroes.
        tests: the number of test examples the norms run over.
        threshold: `NONLINEAR_THRESHOLD`.
    """

    nonlinearity: list[float]
    first_order_error: list[float] | None
    change: list[float]
    fraction: float = DIRECTION_FRACTION
    tests: int = 0
    threshold: float = NONLINEAR_THRESHOLD
    seconds: float = field(default=0.0, compare=False)

    @property
    def mean_nonlinearity(self) -> float:
        return float(np.mean(self.nonlinearity)) if self.nonlinearity else float("nan")

    @property
    def close_to_linear(self) -> bool:
        """Whether the mean nonlinearity ratio is at most the threshold."""
        return bool(self.mean_nonlinearity <= self.threshold)

    def summary(self) -> str:
        """One line: the ratios, and a warning when not close to linear."""
        return smoothness_line(self.to_json())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("seconds")
        out["mean_nonlinearity"] = self.mean_nonlinearity
        out["close_to_linear"] = self.close_to_linear
        return out


def smoothness_line(block: dict[str, Any]) -> str:
    """`Smoothness.summary` from its JSON form (`Smoothness.to_json`)."""
    ratios = block.get("nonlinearity") or []
    mean = float(np.mean(ratios)) if ratios else float("nan")
    worst = max(ratios) if ratios else float("nan")
    threshold = block.get("threshold", NONLINEAR_THRESHOLD)
    line = (
        f"smoothness ({len(ratios)} random directions, "
        f"{block.get('fraction', DIRECTION_FRACTION):.0%} of the consumptions toward weight 0, "
        f"{block.get('tests', 0)} tests): nonlinearity {mean:.3f} mean, {worst:.3f} max"
    )
    errors = block.get("first_order_error")
    if errors:
        line += f"; first-order error {float(np.mean(errors)):.3f} mean"
    if not mean <= threshold:
        line += (
            f" -- NOT close to linear (nonlinearity above {threshold:g}): first-order answers "
            "(metagradients, DVEmb) may be off from actual retraining"
        )
    return line


def random_directions(
    n_consumptions: int, count: int, seed: int = 0, fraction: float = DIRECTION_FRACTION
) -> np.ndarray:
    """``(count, C)`` directions: ``-1`` on a seeded random `fraction` of the ``C``
    consumptions (at least one), 0 elsewhere."""
    rng = np.random.default_rng([seed, 31_337])
    size = max(1, round(fraction * n_consumptions))
    out = np.zeros((count, n_consumptions))
    for k in range(count):
        out[k, rng.choice(n_consumptions, size, replace=False)] = -1.0
    return out


def per_batch_weights(
    curriculum: Sequence[Sequence[str]], weights: np.ndarray
) -> list[list[float]]:
    """Per-consumption `weights` ``(C,)`` as one list per batch of `curriculum` (what
    `final_test_losses` takes)."""
    bounds = np.concatenate([[0], np.cumsum([len(b) for b in curriculum])])
    return [weights[bounds[t] : bounds[t + 1]].tolist() for t in range(len(curriculum))]


def smoothness_weights(directions: np.ndarray, scales: Sequence[float] = (0.5, 1.0)) -> np.ndarray:
    """``(2 D, C)``: the consumption weights `measure_smoothness` retrains at, in its order
    (``1 + s_half d``, then ``1 + s_full d``, per direction ``d`` of `directions` ``(D, C)``)."""
    half, full = (float(s) for s in scales)
    return np.stack([1.0 + s * d for d in directions for s in (half, full)])


def smoothness_from_retrains(
    losses: np.ndarray,
    base: np.ndarray,
    directions: np.ndarray,
    metagradients: np.ndarray | None = None,
) -> Smoothness:
    """`measure_smoothness` from retrains done elsewhere (a backend's workers): `losses`
    ``(M, 2 D)`` are the final test losses at `smoothness_weights` (`directions`), in order."""
    table = {w.tobytes(): losses[:, k] for k, w in enumerate(smoothness_weights(directions))}
    return measure_smoothness(lambda w: table[w.tobytes()], base, directions, metagradients)


def measure_smoothness(
    retrain: Callable[[np.ndarray], np.ndarray],
    base: np.ndarray,
    directions: np.ndarray,
    metagradients: np.ndarray | None = None,
    scales: Sequence[float] = (0.5, 1.0),
) -> Smoothness:
    """The ratios of the module docstring from a retraining function.

    Args:
        retrain: consumption weights ``(C,)`` -> final test losses ``(M,)``.
        base: ``L(1)``, shape ``(M,)``.
        directions: ``(D, C)``.
        metagradients: ``G`` of shape ``(M, C)`` (optional).
        scales: the two step sizes ``(s_half, s_full)``; the ratio compares
            ``Delta(s_full)`` with ``(s_full / s_half) Delta(s_half)``.
    """
    half, full = (float(s) for s in scales)
    nonlinearity, errors, change = [], [], []
    for d in directions:
        d_half = retrain(1.0 + half * d) - base
        d_full = retrain(1.0 + full * d) - base
        size = float(np.linalg.norm(d_full))
        scale = size if size > 0 else float("nan")
        nonlinearity.append(float(np.linalg.norm(d_full - (full / half) * d_half)) / scale)
        change.append(size)
        if metagradients is not None:
            predicted = full * (metagradients @ d)
            errors.append(float(np.linalg.norm(d_full - predicted)) / scale)
    return Smoothness(
        nonlinearity,
        errors if metagradients is not None else None,
        change,
        tests=int(np.asarray(base).size),
    )


def run_smoothness(
    task: Task,
    initial_model: Any,
    pool: Examples,
    tests: Examples,
    run: Run,
    config: dict[str, Any],
    directions: int = DEFAULT_DIRECTIONS,
    *,
    seed: int = 0,
    metagradients: np.ndarray | None = None,
    columns: Sequence[int] | None = None,
    fraction: float = DIRECTION_FRACTION,
) -> Smoothness:
    """`measure_smoothness` of recorded run `run` by retraining its curriculum (its seed and
    the run set's `config`: lr, optimizer, schedule, clipping) from `initial_model`.

    `columns`: only these test examples (rows of `tests`) enter the norms; `metagradients`
    must then have one row per column. ``L(1)`` is the run's recorded final losses.
    """
    import time

    started = time.perf_counter()
    curriculum = [list(b) for b in run.curriculum]
    cols = np.arange(len(tests)) if columns is None else np.asarray(columns, dtype=int)
    schedule = Schedule.from_config(config.get("schedule"))

    def retrain(w: np.ndarray) -> np.ndarray:
        losses = final_test_losses(
            task,
            initial_model,
            pool,
            tests,
            curriculum,
            config["lr"],
            run.seed,
            weights=per_batch_weights(curriculum, w),
            optimizer=config.get("optimizer"),
            schedule=schedule,
            max_grad_norm=config.get("max_grad_norm"),
        )
        return losses[cols]

    base = np.asarray(run.losses[-1], dtype=np.float64)[cols]
    dirs = random_directions(sum(len(b) for b in curriculum), directions, seed, fraction)
    with torch_threads(initial_model):
        out = measure_smoothness(retrain, base, dirs, metagradients)
    out.fraction = fraction
    out.seconds = time.perf_counter() - started
    return out


def recorded_run_smoothness(
    runs: RunSet,
    run_id: str,
    test_ids: Sequence[str],
    method: str,
    directions: int = DEFAULT_DIRECTIONS,
    *,
    task: str | None = None,
    seed: int = 0,
) -> Smoothness:
    """`run_smoothness` of a recorded run for `simfluence attribute`: over the asked test
    examples, with the run's metagradients (cached) for ``unrolled`` and ``combined``."""
    from simfluence.attribution.replay import load_recorded_run

    rec = load_recorded_run(runs, run_id, workload=task)
    config = runs.metadata["config"]
    index = {t: j for j, t in enumerate(rec.tests.ids)}
    ids = list(dict.fromkeys(str(t) for t in test_ids))
    grads = None
    if method in ("unrolled", "combined"):
        from simfluence.attribution.unrolled import UnrolledSimulator

        mg = UnrolledSimulator(task=task).metagradients(runs, run_id, test_ids=sorted(ids))
        grads = mg.grads[[mg.test_ids.index(t) for t in ids]]
    return run_smoothness(
        rec.task,
        rec.task.make_model(config["seed"]),
        rec.pool,
        rec.tests,
        rec.run,
        config,
        directions,
        seed=seed,
        metagradients=grads,
        columns=[index[t] for t in ids],
    )
