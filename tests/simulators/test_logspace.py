"""``log-linear`` and ``log-hybrid`` (`simulators.logspace`): the inner fit on log losses, the
rollouts exponentiated, the floor, persistence and calibration's pinned refits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators import load_simulator
from simfluence.simulators.featurized import HybridSimulator
from simfluence.simulators.linear import LinearSimulator
from simfluence.simulators.logspace import LogHybridSimulator, LogLinearSimulator
from simfluence.synth import SynthConfig, generate

_SMALL = SynthConfig(pool=8, tests=3, runs=5, per_run=8, batch=2, epochs=2, noise=0.01)


def _logged(runs: RunSet, floor: float) -> RunSet:
    logged = [replace(r, losses=np.log(np.maximum(r.losses, floor))) for r in runs.runs]
    return RunSet(runs.train_ids, runs.test_ids, logged, runs.metadata, runs.source, runs.features)


def test_log_linear_is_linear_on_log_losses_exponentiated(tmp_path: Path) -> None:
    """The inner fit is Simfluence-Linear on ``log max(L, floor)`` (floor a tenth of the
    smallest positive loss); rollouts are its rollouts exponentiated, row 0 the start as
    given; a saved copy simulates the same."""
    runs, _ = generate(_SMALL)
    sim = LogLinearSimulator(l2=0.1, memory="none").fit(runs)
    smallest = min(r.losses[r.losses > 0].min() for r in runs.runs)
    assert sim.log_floor_ == pytest.approx(0.1 * smallest)
    inner = LinearSimulator(l2=0.1, memory="none").fit(_logged(runs, sim.log_floor_))
    np.testing.assert_allclose(sim.inner.A_, inner.A_)
    np.testing.assert_allclose(sim.inner.B_, inner.B_)
    curricula = [r.curriculum for r in runs.runs]
    starts = np.stack([r.initial_loss for r in runs.runs])
    inner.floor_ = -np.inf
    expected = [np.exp(t) for t in inner.simulate_many(curricula, np.log(starts))]
    floor = sim.floor_
    sim.floor_ = -np.inf  # the loss floor off: exactly the inner rollouts exponentiated
    for g, e, s in zip(sim.simulate_many(curricula, starts), expected, starts, strict=True):
        np.testing.assert_array_equal(g[0], s)
        np.testing.assert_allclose(g[1:], e[1:], rtol=1e-12)
    sim.floor_ = floor
    got = sim.simulate_many(curricula, starts)
    assert all((g > 0).all() for g in got)
    sim.save(tmp_path / "log.npz")
    loaded = load_simulator(tmp_path / "log.npz")
    for a, b in zip(loaded.simulate_many(curricula, starts), got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_log_hybrid_wraps_the_hybrid_and_pins_its_choices_for_calibration() -> None:
    """log-hybrid's inner fit is the hybrid on log losses; calibration's refits keep the
    inner fit's ridge and memory kernel."""
    runs, _ = generate(_SMALL)
    sim = LogHybridSimulator(memory="none").fit(runs)
    assert isinstance(sim.inner, HybridSimulator)
    params = sim._calibration_params()
    assert params["l2"] == sim.inner.l2_ and params["memory"] == "none"
    assert params["unseen"] == "prior"
    assert set(params) == {"l2", "memory", "unseen"}


def test_zero_losses_are_floored_and_no_positive_loss_is_refused() -> None:
    """A recorded zero is raised to the floor before the log; a run set without a positive
    loss has no log to take."""
    runs, _ = generate(_SMALL)
    zeroed = [replace(r, losses=np.where(r.losses < np.median(r.losses), 0.0, r.losses))
              for r in runs.runs]  # fmt: skip
    some = RunSet(runs.train_ids, runs.test_ids, zeroed)
    sim = LogLinearSimulator(l2=1.0, memory="none").fit(some)
    assert np.isfinite(sim.inner.A_).all() and sim.log_floor_ > 0
    none = RunSet(
        runs.train_ids, runs.test_ids, [replace(r, losses=0 * r.losses) for r in runs.runs]
    )
    with pytest.raises(SimfluenceError, match="no positive loss"):
        LogLinearSimulator(l2=1.0).fit(none)
