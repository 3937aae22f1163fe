"""What removing training examples from a curriculum does to the simulated final loss, in the
two meanings of "remove" (`REMOVALS`), and the sign convention of every effect."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from scipy import sparse

from simfluence.counterfactual.attribution.rollouts import _rollouts
from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import AnyCurriculum, normalize_curriculum
from simfluence.simulators.base import Simulator
from simfluence.simulators.dynamics import DynamicsSimulator

SIGN_CONVENTION = (
    "effect = L_T(with) - L_T(without): negative = consuming it lowered the final loss (helpful)"
)


#: the two meanings of "remove example i": drop it and re-average its batches (what
#: `simfluence.curricula.remove` and real retraining on a shorter list do), or keep it in its
#: batches with loss weight 0 (what influence functions, DVEmb and metagradients estimate)
REMOVALS = ("renormalize", "zero-weight")


def check_removal(removal: str) -> str:
    """`removal` if it is one of `REMOVALS`; `SimfluenceError` naming the choices otherwise."""
    if removal not in REMOVALS:
        raise SimfluenceError(f"removal {removal!r}: must be one of {', '.join(REMOVALS)}")
    return removal


def _without(curriculum: list[list[str]], dropped: set[str]) -> list[list[str]]:
    """`curricula.remove` that may return ``[]`` (all steps gone)."""
    return [kept for batch in curriculum if (kept := [i for i in batch if i not in dropped])]


def removal_effects(
    simulator: Simulator,
    curriculum: AnyCurriculum,
    initial: np.ndarray,
    columns: np.ndarray,
    groups: Sequence[Collection[str]],
    removal: str = "renormalize",
) -> np.ndarray:
    """Shape ``(G, len(columns))``: ``L_T(with) - L_T(without group g)`` per test column.

    ``"renormalize"``: every occurrence of the group's ids is dropped and the curriculum
    re-simulated (batches shrink, empty ones vanish). ``"zero-weight"``: the batches stay as
    they are and each consumption of the group's ids becomes neutral, ``A = 1/b``, ``B = 0``
    (a zero loss weight; needs a Simfluence-Linear-family simulator). All ``G + 1`` rollouts
    go in one vectorized call. Negative = removing the group raises the loss (it helped).
    """
    check_removal(removal)
    batches = normalize_curriculum(curriculum)
    if removal == "renormalize":
        edited = [batches] + [_without(batches, set(map(str, g))) for g in groups]
        finals = np.empty((len(edited), len(columns)))
        busy = [k for k, c in enumerate(edited) if len(c)]
        finals[:] = initial[columns]
        trajs = _rollouts(simulator, [edited[k] for k in busy], initial, columns)
        finals[busy] = [t[-1] for t in trajs]
        return finals[0] - finals[1:]
    if not isinstance(simulator, DynamicsSimulator):
        raise SimfluenceError(
            f"{simulator.name}: zero-weight removal needs a simulator of the Simfluence-Linear "
            "family (per-example parameters); use removal='renormalize'"
        )
    return _zero_weight_effects(simulator, batches, initial, columns, groups)


def _zero_weight_effects(
    simulator: DynamicsSimulator,
    batches: list[list[str]],
    initial: np.ndarray,
    columns: np.ndarray,
    groups: Sequence[Collection[str]],
) -> np.ndarray:
    # one extra, neutral pool column (A = 1/b, B = 0): a zero-weight consumption is moved there
    counts = simulator.encode([batches])[0].tocoo()
    neutral = len(simulator.train_ids_)
    index = {t: k for k, t in enumerate(simulator.train_ids_)}
    edited = [counts.tocsr()]
    for group in groups:
        cols = counts.col.copy()
        cols[np.isin(cols, [index[str(i)] for i in group if str(i) in index])] = neutral
        edited.append(
            sparse.csr_matrix(
                (counts.data, (counts.row, cols)), shape=(counts.shape[0], neutral + 1)
            )
        )
    edited[0] = sparse.hstack([edited[0], sparse.csr_matrix((counts.shape[0], 1))], format="csr")
    B = np.hstack([simulator.B_[columns], np.zeros((len(columns), 1))])
    A = None
    if simulator.A_ is not None:
        prior = 1.0 / simulator.batch_size_
        A = np.hstack([simulator.A_[columns], np.full((len(columns), 1), prior)])
    slopes = None
    if simulator.B_slope_ is not None:  # time-varying effects (featurized, hybrid): the neutral
        zero = np.zeros((len(columns), 1))  # column does not drift
        A_slope = simulator.A_slope_
        slopes = (
            None if A_slope is None else np.hstack([A_slope[columns], zero]),
            np.hstack([simulator.B_slope_[columns], zero]),
        )
    start = np.ascontiguousarray(np.broadcast_to(initial[columns], (len(edited), len(columns))))
    trajectories = simulator.rollout_params(edited, A, B, slopes, start)
    finals = np.stack([t[-1] for t in trajectories])
    return finals[0] - finals[1:]
