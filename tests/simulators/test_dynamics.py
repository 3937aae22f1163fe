"""The Simfluence-Linear family's shared machinery, without any fit: the rollout itself, the
base class's defaults and curriculum checks, and the fold copies kept by calibration.

`ReadOff` is a dynamics simulator whose parameters are read off its runs by a formula (no
solve), so each test reaches the machinery it checks and little else.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import sparse

from simfluence.errors import CurriculumError
from simfluence.runlog import Run, RunSet
from simfluence.simulators import MeanTrajectorySimulator
from simfluence.simulators.dynamics import DynamicsSimulator, rollout


class ReadOff(DynamicsSimulator):
    """``B_[j, i] = -(i + 1) * d_j``, ``d_j`` test example ``j``'s mean drop per step over the
    runs; ``A_ = (1 - 0.01 R) / b`` (``R`` runs) unless `additive`; with `drift`, slopes
    ``0.1 B_`` (and ``0.1 A_`` if `drift == "both"`) over `time_scale_` = the longest run."""

    name = "read-off"

    def __init__(self, additive: bool = False, drift: str = "none", **policies: str) -> None:
        super().__init__(**policies)
        self.additive, self.drift = additive, drift

    def _fit_parameters(self, runs: RunSet) -> None:
        drops = np.mean([(r.losses[0] - r.losses[-1]) / r.n_steps for r in runs.runs], axis=0)
        P = len(runs.train_ids)
        self.B_ = -np.outer(drops, np.arange(1, P + 1))
        A = np.full_like(self.B_, (1 - 0.01 * len(runs.runs)) / self.batch_size_)
        self.A_ = None if self.additive else A
        consumed = {i for r in runs.runs for batch in r.curriculum for i in batch}
        self.seen_ = np.array([t in consumed for t in runs.train_ids])
        if self.drift != "none":
            self.time_scale_ = float(max(r.n_steps for r in runs.runs))
            self.B_slope_ = 0.1 * self.B_
            self.A_slope_ = 0.1 * A if self.drift == "both" and not self.additive else None


RUNS = RunSet(
    ["a", "b", "c", "d"],
    ["t0", "t1"],
    [
        Run(
            "r0", [["a", "b"], ["a"], ["b", "a"]], [[2.0, 1.0], [1.8, 0.9], [1.5, 0.9], [1.4, 0.7]]
        ),
        Run("r1", [["b"], ["a", "b"]], [[2.2, 1.1], [2.0, 1.0], [1.9, 0.8]]),
        Run("r2", [["a", "a"], ["b"], ["b"]], [[1.9, 1.2], [1.7, 1.0], [1.6, 0.8], [1.2, 0.8]]),
    ],
)


def plain_rollout(counts: sparse.csr_matrix, A, B, initial: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``L_t = alpha_t L_{t-1} + beta_t`` one step at a time (``alpha = 1`` for A None)."""
    L, out = initial.astype(float), [initial.astype(float)]
    for row in counts.toarray():
        alpha = 1.0 if A is None else A @ row
        L = alpha * L + B @ row
        out.append(L)
    return np.array(out)


def test_rollout_of_many_curricula_on_threads_equals_a_plain_loop() -> None:
    """Curricula of different lengths, in chunks smaller than their number, on several
    threads: each trajectory is its own plain step-by-step rollout, in order."""
    rng = np.random.default_rng(0)
    A, B = rng.uniform(0.2, 0.4, (3, 5)), rng.normal(0.0, 0.1, (3, 5))
    counts = [sparse.csr_matrix(rng.integers(0, 2, (2 + k % 4, 5)).astype(float)) for k in range(7)]
    initial = rng.uniform(1.0, 2.0, (7, 3))
    for params in ((A, B), (None, B)):
        expected = [plain_rollout(c, *params, initial[k]) for k, c in enumerate(counts)]
        for chunk, threads in ((2, 3), (3, None), (64, 1)):
            got = rollout(counts, *params, initial, chunk=chunk, threads=threads)
            assert len(got) == 7
            for a, b in zip(got, expected, strict=True):
                assert a.shape == b.shape
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_rollouts_that_overflow_give_inf_and_nan_without_warnings() -> None:
    """An exploding simulator is a bad prediction, not a stream of warnings: the loss
    overflows to inf, and an example with ``A = 0`` after it gives 0 * inf = NaN."""
    A = np.array([[1e200, 0.0]])
    B = np.zeros((1, 2))
    counts = [sparse.csr_matrix(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (traj,) = rollout(counts, A, B, np.array([[1.0]]))
    assert traj[1, 0] == 1e200 and np.isinf(traj[2:4, 0]).all() and np.isnan(traj[4, 0])


def test_dynamics_defaults_refuse_unseen_ids_and_weigh_batch_means() -> None:
    """By default a training id the runs never consumed is an error naming the curriculum,
    its step and the id, and each batch's sums are scaled by ``b / |batch|``."""
    sim = ReadOff().fit(RUNS)
    assert (sim.unseen, sim.batch_weighting) == ("error", "mean")
    assert sim.batch_size_ == 1.5  # sizes 2, 1, 2, 1, 2, 2, 1, 1
    good = [["a"], ["b"]]
    with pytest.raises(CurriculumError, match=r"curriculum #1: step 3: training id 'c' never"):
        sim.simulate_many([good, [["a"], ["d", "b"], ["c"]]], sim.initial_loss_)
    with pytest.raises(CurriculumError, match=r"curriculum #1: step 2: .*'nope'"):
        sim.simulate_many([good, [["a"], ["nope"]]], sim.initial_loss_)
    out = sim.simulate([["a", "b"]], np.array([1.0, 1.0]))
    expected = 0.75 * (sim.A_[:, :2].sum(1) * 1.0 + sim.B_[:, :2].sum(1))
    np.testing.assert_allclose(out[1], expected, rtol=1e-12)
    prior = ReadOff(unseen="prior", batch_weighting="sum").fit(RUNS)
    assert np.isfinite(prior.simulate([["c"]], np.array([1.0, 1.0]))).all()


@pytest.mark.parametrize(
    ("additive", "drift"), [(False, "none"), (True, "none"), (False, "both"), (True, "B")]
)
def test_fold_copies_are_kept_in_float32_and_rebuilt_as_simulators(
    additive: bool, drift: str
) -> None:
    """`calibrate` hands its fold copies over; from two usable ones on, their parameters are
    kept as ``(K, M, P)`` float32 (slopes too, for drifting simulators), and
    `fold_simulators` rebuilds one float64 simulator per copy, everything else unchanged."""
    sim = ReadOff(additive=additive, drift=drift).fit(RUNS)
    copies = [
        ReadOff(additive=additive, drift=drift).fit(RUNS.subset(ids))
        for ids in (["r0", "r1"], ["r1", "r2"], ["r0", "r2"])
    ]
    sim._keep_fold_copies([copies[0], MeanTrajectorySimulator().fit(RUNS)])  # one usable
    assert sim.fold_simulators() == [] and not hasattr(sim, "fold_B_")
    sim._keep_fold_copies(copies[:2])
    assert len(sim.fold_simulators()) == 2
    sim._keep_fold_copies(copies)
    assert sim.fold_B_.dtype == np.float32 and sim.fold_B_.shape == (3, 2, 4)
    twins = sim.fold_simulators()
    assert len(twins) == 3
    for twin, fitted in zip(twins, copies, strict=True):
        assert twin is not sim and twin.test_ids_ == sim.test_ids_
        for name in ("A_", "B_", "A_slope_", "B_slope_"):
            kept, source = getattr(twin, name), getattr(fitted, name)
            if source is None:
                assert kept is None, name
            else:
                assert kept.dtype == np.float64, name
                np.testing.assert_array_equal(kept, source.astype(np.float32), err_msg=name)
        assert twin.time_scale_ == sim.time_scale_
    if additive:
        assert not hasattr(sim, "fold_A_")
    if drift == "none":
        assert not hasattr(sim, "fold_B_slope_")
    else:
        assert sim.fold_B_slope_.dtype == np.float32
        assert hasattr(sim, "fold_A_slope_") == (drift == "both")


def test_run_counts_weigh_batches_as_the_simulator_does() -> None:
    """`run_counts` encodes recorded runs with the simulator's own batch weighting: under
    "sum" every consumption counts 1, under "mean" ``b / |batch|`` (``b = 1.5`` here)."""
    from simfluence.runlog.runs import Run, RunSet
    from simfluence.simulators import AdditiveSimulator

    runs = RunSet(
        ["a", "b", "c"],
        ["t"],
        [
            Run("r0", [["a", "b"], ["c"]], np.array([[1.0], [0.8], [0.7]])),
            Run("r1", [["b"], ["a", "c"]], np.array([[1.0], [0.9], [0.6]])),
        ],
    )
    for weighting, pair, single in (("sum", 1.0, 1.0), ("mean", 0.75, 1.5)):
        sim = AdditiveSimulator(l2=1.0, batch_weighting=weighting).fit(runs)
        counts = [c.toarray() for c in sim.run_counts(runs)]
        np.testing.assert_allclose(counts[0], [[pair, pair, 0], [0, 0, single]])
        np.testing.assert_allclose(counts[1][0], [0, single, 0])


def test_encoding_names_the_run_with_an_unknown_training_id() -> None:
    """A recorded run consuming an id outside the pool is named in the error."""
    from simfluence.errors import CurriculumError
    from simfluence.runlog.runs import Run, RunSet
    from simfluence.simulators.encoding import encode_runs

    runs = RunSet(["a"], ["t"], [Run("r7", [["a"], ["zz"]], np.array([[1.0], [0.9], [0.8]]))])
    with pytest.raises(CurriculumError, match=r"^run 'r7': step 2: unknown training id 'zz'"):
        encode_runs(runs, 1.0, "mean")
