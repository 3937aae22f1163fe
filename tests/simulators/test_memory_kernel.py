"""Optimizer memory (`simulators.memory`) on tiny run sets: the kernel's numbers, the ``memory``
parameter's parsing, and what a fitted `LinearSimulator` does with its kernel (the design it
regresses on, its rollouts, its cross-validated choice). Every test here runs in milliseconds;
tests/test_memory.py checks the same model on larger synthetic data."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from scipy import sparse

from simfluence.errors import SimfluenceError
from simfluence.metrics import all_steps_mse
from simfluence.runlog.runs import Run, RunSet, count_matrix
from simfluence.simulators import LinearSimulator
from simfluence.simulators.base import soft_floor
from simfluence.simulators.dynamics import step_times
from simfluence.simulators.encoding import weight_batches
from simfluence.simulators.linear import rollout_mse
from simfluence.simulators.memory import (
    MemoryKernel,
    candidates,
    lr_profile,
    optimizer_decay,
    resolve,
    spec_of,
)

IDS = ["a", "b", "c", "d"]
SCHEDULE = np.linspace(1.0, 0.25, 6)  # the recorded learning rates over their largest one


def tiny_runs(
    n_runs: int = 4, lr: bool = True, seed: int = 0, optimizer: dict[str, Any] | None = None
) -> RunSet:
    """``n_runs`` runs of 6 steps over 4 training and 2 test examples, batches of 1 to 3
    examples (so "mean" and "sum" weighting differ), a decaying learning rate when `lr`."""
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(n_runs):
        curriculum = [list(rng.choice(IDS, 1 + (t % 3), replace=False)) for t in range(6)]
        steps = 0.9 + 0.05 * rng.standard_normal(6)
        losses = np.cumprod(np.r_[1.0, steps])[:, None] * np.array([[1.0, 2.0]])
        runs.append(Run(f"r{r}", curriculum, losses, lr=1e-3 * SCHEDULE if lr else None))
    config = {"optimizer": optimizer or {"name": "AdamW", "betas": [0.7, 0.99]}}
    return RunSet(IDS, ["x", "y"], runs, {"config": config})


def smoothed(runs: RunSet, kernel: MemoryKernel, batch: float, weighting: str) -> list[Any]:
    """The kernel applied to each run's batch-weighted counts, by dense products."""
    out = []
    for run in runs.runs:
        raw = weight_batches(count_matrix(run.curriculum, runs.train_index), batch, weighting)
        out.append(kernel.lag_matrix(raw.shape[0]).toarray() @ raw.toarray())
    return out


def brute_rollout(
    counts: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    start: np.ndarray,
    rest: np.ndarray | None = None,
    batch: float = 1.0,
    slopes: tuple[np.ndarray, np.ndarray] | None = None,
    time_scale: float = 0.0,
) -> np.ndarray:
    """``L_t = alpha_t L_{t-1} + beta_t`` step by step: ``alpha_t = (A + tau_t A') . N_t +
    rest_t / b``, ``beta_t = (B + tau_t B') . N_t``."""
    tau = step_times(counts.shape[0], time_scale) if slopes is not None else None
    out = [np.asarray(start, dtype=np.float64)]
    for t, row in enumerate(counts):
        a, b = A, B
        if slopes is not None and tau is not None:
            a, b = A + tau[t] * slopes[0], B + tau[t] * slopes[1]
        alpha = a @ row + (0.0 if rest is None else rest[t] / batch)
        out.append(alpha * out[-1] + b @ row)
    return np.array(out)


# -- the kernel --------------------------------------------------------------------------------
def test_kernel_names_and_specs() -> None:
    """`describe` names decay and scaling; `spec_of` gives the parameter that `resolve` reads
    back as the same kernel."""
    scale = np.array([1.0, 0.5])
    assert MemoryKernel().describe() == "none"
    assert MemoryKernel(0.8).describe() == "momentum 0.8"
    assert MemoryKernel(0.0, scale).describe() == "none x lr"
    assert MemoryKernel(0.25, scale).describe() == "momentum 0.25 x lr"
    assert spec_of(MemoryKernel()) == "none"
    assert spec_of(MemoryKernel(0.8)) == 0.8
    assert spec_of(MemoryKernel(0.25, scale)) == "0.25+lr"
    assert spec_of(MemoryKernel(0.0, scale)) == "0+lr"
    assert resolve(spec_of(MemoryKernel(0.25, scale))) == (0.25, "lr")


def test_decay_must_be_below_one() -> None:
    """A decay of 1 never forgets (its weights do not sum): rejected; just below is fine."""
    with pytest.raises(SimfluenceError):
        MemoryKernel(1.0)
    with pytest.raises(SimfluenceError):
        MemoryKernel(1.5)
    assert MemoryKernel(0.999).decay == 0.999


def test_lag_matrix_keeps_lags_down_to_the_cutoff() -> None:
    """Decay 0.5 over 10 steps: each row keeps lags 0..7 (0.5^7 is the first weight at or
    below 1% of the first), renormalized to sum to 1; row t < 8 is the exact
    bias-corrected kernel."""
    b, n = 0.5, 10
    expected = np.zeros((n, n))
    for t in range(n):
        for k in range(min(t, 7) + 1):
            expected[t, t - k] = (1 - b) * b**k
        expected[t] /= expected[t].sum()
    lag = MemoryKernel(b).lag_matrix(n)
    assert sparse.issparse(lag) and lag.format == "csr"
    np.testing.assert_allclose(lag.toarray(), expected, rtol=1e-12, atol=0)
    # a slower decay keeps more lags: 0.9^44 is its first weight below 1%
    assert np.count_nonzero(MemoryKernel(0.9).lag_matrix(60).toarray()[-1]) == 45


def test_identity_kernel_is_quiet_and_exact() -> None:
    """Decay 0: the identity matrix, computed without numerical warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lag = MemoryKernel().lag_matrix(4)
    assert lag.format == "csr"
    np.testing.assert_array_equal(lag.toarray(), np.eye(4))


def test_step_scale_extends_with_the_last_value() -> None:
    """A stored scale shorter than the curriculum continues with its last entry (not its
    second); it is float64 whatever was stored."""
    kernel = MemoryKernel(0.0, np.array([1.0, 0.5, 0.25], dtype=np.float32))
    scale = kernel.step_scale(5)
    assert scale.dtype == np.float64
    np.testing.assert_array_equal(scale, [1.0, 0.5, 0.25, 0.25, 0.25])
    np.testing.assert_array_equal(kernel.step_scale(2), [1.0, 0.5])


def test_apply_and_rest_on_more_steps_than_examples() -> None:
    """A (3 steps, 2 examples) count matrix: ``N' = diag(s) W N`` and the rest
    ``(1 - s_t) sum_i (W N)_ti``, one entry per step (zeros without scaling)."""
    counts = sparse.csr_matrix(np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    kernel = MemoryKernel(0.5, np.array([1.0, 0.5, 0.25]))
    W = np.array([[1.0, 0, 0], [1 / 3, 2 / 3, 0], [1 / 7, 2 / 7, 4 / 7]])
    np.testing.assert_allclose(
        kernel.apply(counts).toarray(), np.diag([1.0, 0.5, 0.25]) @ W @ counts.toarray()
    )
    np.testing.assert_allclose(kernel.rest(counts), [0.0, 1.0, 1.5])
    assert MemoryKernel(0.5).rest(counts).tolist() == [0.0, 0.0, 0.0]


# -- the parameter -----------------------------------------------------------------------------
def test_optimizer_decay_reads_adam_and_sgd() -> None:
    """Adam's beta1, SGD's momentum, None for a plain optimizer entry or no config."""
    assert optimizer_decay(tiny_runs(1)) == 0.7
    sgd = tiny_runs(1, optimizer={"name": "SGD", "momentum": 0.9})
    assert optimizer_decay(sgd) == 0.9
    assert optimizer_decay(tiny_runs(1, optimizer={"name": "SGD"})) is None
    assert optimizer_decay(RunSet(IDS, ["x"], [], {})) is None


def test_resolve_names_decays_and_errors() -> None:
    """Named kernels pass through; ``"<b>+lr"`` keeps all of b; 0 is a valid decay; a value
    that is no decay at all is a SimfluenceError listing the accepted spellings."""
    for name in ("none", "adam", "lr", "adam+lr", "auto"):
        assert resolve(name) == name
    assert resolve("0.25+lr") == (0.25, "lr")
    assert resolve(0.0) == 0.0 and resolve("0") == 0.0 and resolve(np.float32(0.5)) == 0.5
    for bad in (None, [0.5], "fast", "+lr"):
        with pytest.raises(SimfluenceError, match=r": use none, adam, lr, adam\+lr, auto, "):
            resolve(bad)


def test_lr_profile_edge_schedules() -> None:
    """Tiny absolute rates and slight variations still form a schedule; negative rates clip to
    0; a schedule whose top is not a positive finite rate has nothing to scale."""

    def profile_of(rates: list[float]) -> np.ndarray | None:
        runs = [Run("r", [["a"]] * len(rates), np.ones((len(rates) + 1, 1)), lr=np.array(rates))]
        return lr_profile(RunSet(IDS, ["x"], runs, {}))

    np.testing.assert_allclose(profile_of([2e-9, 1e-9]), [1.0, 0.5])
    np.testing.assert_allclose(profile_of([1.0, 1.0 - 1e-6]), [1.0, 1.0 - 1e-6])
    np.testing.assert_allclose(profile_of([1.0, -0.5]), [1.0, 0.0])
    assert profile_of([0.0, -0.1]) is None
    assert profile_of([np.inf, 1.0]) is None
    assert profile_of([0.3, 0.3]) is None


def test_candidates_lr_and_weighting() -> None:
    """``"lr"`` is decay 0 scaled by the recorded schedule; scaling under "sum" weighting is an
    error, also inside a list of kernels."""
    runs = tiny_runs(2)
    (kernel,) = candidates("lr", runs)
    assert kernel.decay == 0.0 and kernel.scale is not None
    np.testing.assert_allclose(kernel.scale, SCHEDULE)
    for spec in ("adam+lr", "none,lr", "none,0.5+lr"):
        with pytest.raises(SimfluenceError, match="batch_weighting='mean'"):
            candidates(spec, runs, "sum")
    assert [k.to_config() for k in candidates("none,0.5", runs, "sum")] == [
        {"decay": 0.0, "lr_scale": False},
        {"decay": 0.5, "lr_scale": False},
    ]


# -- a fitted simulator ------------------------------------------------------------------------
def test_memory_kernel_before_and_after_a_fit() -> None:
    """Before a fit the parameter names the kernel on given runs (one only); after a fit the
    fitted kernel, scale included, is what the simulator reports."""
    runs = tiny_runs()
    assert LinearSimulator(memory="0.5+lr").memory_kernel().is_identity  # no runs: none
    named = LinearSimulator(memory="0.5+lr").memory_kernel(runs)
    assert named.decay == 0.5 and np.allclose(named.scale, SCHEDULE)  # type: ignore[arg-type]
    with pytest.raises(SimfluenceError, match="several kernels"):
        LinearSimulator(memory="auto").memory_kernel(runs)
    with pytest.raises(SimfluenceError):
        LinearSimulator(memory="lr", batch_weighting="sum").memory_kernel(runs)
    fitted = LinearSimulator(memory="0.5+lr", l2=1.0).fit(runs)
    kernel = fitted.memory_kernel()
    assert kernel.decay == 0.5 and np.allclose(kernel.scale, SCHEDULE)  # type: ignore[arg-type]
    assert fitted.describe_memory() == "momentum 0.5 x lr"
    plain = LinearSimulator(memory=0.5, l2=1.0).fit(runs)
    assert plain.memory_scale_ is None and plain.describe_memory() == "momentum 0.5"
    assert plain.memory_cv_ is None and fitted.memory_cv_ is None  # one kernel: no search


@pytest.mark.parametrize("weighting", ["mean", "sum"])
def test_design_regresses_on_the_smoothed_counts(weighting: str) -> None:
    """The design's counts are the kernel applied to each run's weighted counts; a scaled
    kernel's rows carry the neutral rest ``b - sum_i N'_ti``."""
    runs = tiny_runs()
    spec = "0.5+lr" if weighting == "mean" else 0.5
    sim = LinearSimulator(memory=spec, l2=1.0, batch_weighting=weighting).fit(runs)
    kernel = sim.memory_kernel()
    design = sim.design(runs)
    expected = np.vstack(smoothed(runs, kernel, sim.batch_size_, weighting))
    np.testing.assert_allclose(design.counts.toarray(), expected, rtol=1e-12, atol=1e-15)
    if kernel.scale is None:
        assert design.rest is None
    else:
        rest = np.maximum(sim.batch_size_ - expected.sum(axis=1), 0.0)
        assert rest.max() > 0.5
        np.testing.assert_allclose(design.rest, rest, rtol=1e-12, atol=1e-12)  # type: ignore[arg-type]


def test_design_factors_for_long_runs_only() -> None:
    """Long runs over many examples: the design also carries ``(lag, raw)`` whose product is
    the smoothed counts (two sparse products are cheaper); short runs do not."""
    rng = np.random.default_rng(1)
    pool = [f"e{i}" for i in range(30)]
    runs = [
        Run(
            f"r{r}", [list(rng.choice(pool, 4, replace=False)) for _ in range(20)], np.ones((21, 1))
        )
        for r in range(2)
    ]
    long_runs = RunSet(pool, ["x"], runs, {})
    sim = LinearSimulator(memory=0.5, l2=1.0).fit(long_runs)
    design = sim.design(long_runs)
    assert design.factors is not None
    lag, raw = design.factors
    assert lag.shape == (40, 40) and raw.shape == (40, 30)
    assert lag.format == raw.format == design.counts.format == "csr"  # as `Design` documents
    np.testing.assert_allclose((lag @ raw).toarray(), design.counts.toarray(), rtol=1e-12)
    short = LinearSimulator(memory=0.5, l2=1.0).fit(tiny_runs(2))
    assert short.design(tiny_runs(2)).factors is None


def test_scaled_rollout_by_hand() -> None:
    """A scaled kernel's rollout: ``alpha_t = A . N'_t + rest_t / b``, ``beta_t = B . N'_t``,
    the drift of slopes on the real examples only, and a hard envelope respected."""
    runs = tiny_runs()
    sim = LinearSimulator(memory="0.5+lr", l2=1.0).fit(runs)
    curriculum = runs.runs[0].curriculum
    (counts,) = sim.encode([curriculum])
    dense = counts.toarray()
    rest = np.maximum(sim.batch_size_ - dense.sum(axis=1), 0.0)
    start = np.array([1.0, 2.0])
    expected = brute_rollout(dense, sim.A_, sim.B_, start, rest, sim.batch_size_)
    np.testing.assert_allclose(sim.simulate(curriculum, start), expected, rtol=1e-10)
    # drifting effects (A', B') over time scale 3
    rng = np.random.default_rng(2)
    slopes = (0.05 * rng.standard_normal(sim.A_.shape), 0.05 * rng.standard_normal(sim.B_.shape))
    sim.time_scale_ = 3.0
    (got,) = sim.rollout_params([counts], sim.A_, sim.B_, slopes, start[None])
    drifting = brute_rollout(dense, sim.A_, sim.B_, start, rest, sim.batch_size_, slopes, 3.0)
    np.testing.assert_allclose(got, drifting, rtol=1e-10)
    # a hard lower bound per step
    envelope = np.full((1, 2), 10.0)
    (bounded,) = sim.rollout_params([counts], sim.A_, sim.B_, None, start[None], envelope)
    assert np.all(bounded[1:] >= 10.0)


def test_validation_mse_is_the_floored_rollout_error() -> None:
    """The CV score of a non-identity kernel: all-steps MSE of the floored rollouts of the
    held-out runs under the kernel (with a prior's drift when given); the identity kernel
    scores like `rollout_mse`."""
    runs = tiny_runs()
    sim = LinearSimulator(memory="0.5+lr", l2=1.0).fit(runs)
    params = (sim.A_, sim.B_)
    floor = (np.array([0.75, 1.5]), np.array([0.2, 0.3]))  # bites: the losses reach ~0.6
    rest_of = [np.maximum(sim.batch_size_ - c.sum(axis=1), 0.0) for c in _dense(sim, runs)]
    rng = np.random.default_rng(3)
    slopes = (0.02 * rng.standard_normal(sim.A_.shape), 0.02 * rng.standard_normal(sim.B_.shape))
    for drift, scale in ((None, 0.0), (slopes, 2.0)):
        trajectories = []
        for run, dense, rest in zip(runs.runs, _dense(sim, runs), rest_of, strict=True):
            traj = brute_rollout(
                dense, *params, run.initial_loss, rest, sim.batch_size_, drift, scale
            )
            soft_floor(traj[1:], *floor)
            trajectories.append(traj)
        expected = all_steps_mse([r.losses for r in runs.runs], trajectories).mean
        got = sim._validation_mse(runs, params, floor, drift, scale)
        assert got == pytest.approx(expected, rel=1e-10)
    # the identity kernel: the plain rollout error, drift and time scale passed on
    none = LinearSimulator(memory="none", l2=1.0).fit(runs)
    args = (none.batch_size_, none.batch_weighting, floor, slopes, 2.0)
    assert none._validation_mse(runs, (none.A_, none.B_), floor, slopes, 2.0) == pytest.approx(
        rollout_mse(runs, none.A_, none.B_, *args), rel=1e-12
    )


def _dense(sim: LinearSimulator, runs: RunSet) -> list[np.ndarray]:
    """The fitted simulator's kernel applied to each run's counts, dense."""
    return smoothed(runs, sim.memory_kernel(), sim.batch_size_, sim.batch_weighting)


# -- choosing the kernel -----------------------------------------------------------------------
def test_joint_search_is_the_union_of_per_kernel_searches() -> None:
    """``memory="none,0.5+lr"``: the table lists each kernel's own CV curve (as a fit with that
    kernel alone finds it), the lowest error picks kernel and l2 (here the second kernel, at
    an inner l2), and the final parameters are those of a fit with that kernel alone."""
    runs = tiny_runs(seed=1)
    grid = [10.0, 1.0, 0.1, 0.01]
    joint = LinearSimulator(memory="none,0.5+lr", l2_grid=grid).fit(runs)
    alone = [LinearSimulator(memory=m, l2_grid=grid).fit(runs) for m in ("none", "0.5+lr")]
    table = [
        [decay, scaled, lam, mse]
        for (decay, scaled), sim in zip([(0.0, 0.0), (0.5, 1.0)], alone, strict=True)
        for lam, mse in sim.cv_mse_  # type: ignore[union-attr]
    ]
    assert joint.memory_cv_ == table
    best = min(range(len(table)), key=lambda k: table[k][3])
    chosen = alone[int(table[best][1])]
    assert chosen is alone[1] and table[best][2] == 0.1  # lr scaling fits these runs best
    assert joint.memory_ == chosen.memory_ == {"decay": 0.5, "lr_scale": True}
    np.testing.assert_allclose(joint.memory_scale_, SCHEDULE)  # type: ignore[arg-type]
    assert joint.l2_ == table[best][2] == chosen.l2_
    assert joint.cv_mse_ == chosen.cv_mse_
    np.testing.assert_array_equal(joint.A_, chosen.A_)
    np.testing.assert_array_equal(joint.B_, chosen.B_)
    np.testing.assert_array_equal(joint.seen_, chosen.seen_)
    assert joint.cg_iterations_ == chosen.cg_iterations_
    assert joint._calibration_params()["memory"] == "0.5+lr"  # calibration refits keep it


def _choose(curves: dict[float, list[list[float]]]) -> LinearSimulator:
    """A ``memory="none,0.5"`` fit whose CV curves per decay are `curves` (the selection rule
    alone), grid 10, 3, 1."""
    sim = LinearSimulator(memory="none,0.5", l2_grid=[1.0, 10.0, 3.0])

    def cross_validate(cv_runs: RunSet, grid: list[float]) -> list[list[float]]:
        assert grid == [10.0, 3.0, 1.0] and len(cv_runs.runs) == 3
        return [list(row) for row in curves[float(sim.memory_kernel().decay)]]

    sim._cross_validate = cross_validate  # type: ignore[method-assign]
    return sim.fit(tiny_runs(3))


@pytest.mark.parametrize(
    ("curves", "decay", "lam"),
    [
        # a tie keeps the earlier kernel and the larger l2; NaN is skipped
        ({0.0: [[10.0, np.nan], [3.0, 2.0], [1.0, 2.0]], 0.5: [[10.0, 2.0]]}, 0.0, 3.0),
        # strictly better wins, wherever it is
        ({0.0: [[10.0, 3.0], [3.0, 2.5]], 0.5: [[10.0, np.inf], [3.0, 2.0]]}, 0.5, 3.0),
        # nothing finite: the first kernel at the largest l2
        ({0.0: [[10.0, np.nan]], 0.5: [[10.0, np.inf], [3.0, np.nan]]}, 0.0, 10.0),
    ],
)
def test_kernel_choice_rule(
    curves: dict[float, list[list[float]]], decay: float, lam: float
) -> None:
    """The lowest finite CV error picks kernel and l2; ties keep the simpler kernel and the
    larger l2; the parameters are then solved with that kernel at that l2."""
    sim = _choose(curves)
    assert sim.memory_ == {"decay": decay, "lr_scale": False} and sim.l2_ == lam
    table = [[d, 0.0, row[0], row[1]] for d in (0.0, 0.5) for row in curves[d]]
    np.testing.assert_equal(sim.memory_cv_, table)
    np.testing.assert_equal(sim.cv_mse_, curves[decay])
    direct = LinearSimulator(memory=decay, l2=lam).fit(tiny_runs(3))
    np.testing.assert_array_equal(sim.A_, direct.A_)
    np.testing.assert_array_equal(sim.B_, direct.B_)
    np.testing.assert_array_equal(sim.seen_, direct.seen_)


def test_kernel_choice_needs_two_serial_runs() -> None:
    """Choosing among kernels is neither sharded nor run on a backend, scales by the learning
    rate only under "mean" weighting, and needs 2 runs (2 are enough)."""
    runs = tiny_runs(2)
    with pytest.raises(SimfluenceError, match="not sharded"):
        LinearSimulator(memory="none,0.5", test_shards=2).fit(runs)
    with pytest.raises(SimfluenceError, match="not sharded"):
        LinearSimulator(memory="none,0.5", backend="process:2").fit(runs)
    with pytest.raises(SimfluenceError, match="batch_weighting='mean'"):
        LinearSimulator(memory="none,lr", l2=1.0, batch_weighting="sum").fit(runs)
    with pytest.raises(SimfluenceError, match="2 training runs"):
        LinearSimulator(memory="none,0.5", l2=1.0).fit(tiny_runs(1))
    two = LinearSimulator(memory="none,0.5", l2=1.0).fit(runs)
    assert two.memory_cv_ is not None and len(two.memory_cv_) == 2


def test_sharded_fit_uses_the_kernel() -> None:
    """One kernel fitted in test shards (each shard names the kernel on its runs): the same
    parameters as the unsharded fit, to the solver's tolerance."""
    runs = tiny_runs()
    whole = LinearSimulator(memory="0.5+lr", l2=1.0).fit(runs)
    sharded = LinearSimulator(memory="0.5+lr", l2=1.0, test_shards=2).fit(runs)
    assert sharded.memory_ == whole.memory_ and sharded.l2_ == whole.l2_
    np.testing.assert_allclose(sharded.A_, whole.A_, rtol=1e-6)
    np.testing.assert_allclose(sharded.B_, whole.B_, rtol=1e-6, atol=1e-9)
