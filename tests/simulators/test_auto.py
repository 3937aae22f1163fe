"""The ``auto`` method (`simulators.auto`) on tiny synthetic run sets: its parameters, what it
passes to the candidates, what it reports, and calibration through the chosen simulator.

The run sets are a few runs of a few steps (each fit well under 0.1 s), so that every test
here is cheap enough to run for each mutant of `simulators.auto`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import Run, RunSet
from simfluence.simulators import load_simulator
from simfluence.simulators.auto import AUTO_CANDIDATES, AutoSimulator
from simfluence.simulators.baselines import MeanTrajectorySimulator
from simfluence.synth import SynthConfig, generate

#: two runs of two steps that Simfluence-Linear predicts better than the mean trajectory, and
#: `hybrid` better than `linear`
_TINY = SynthConfig(pool=4, tests=1, runs=2, per_run=4, batch=2, epochs=1, noise=0.0)
#: three short runs
_FLAT = SynthConfig(pool=6, tests=2, runs=3, per_run=6, batch=2, epochs=1, noise=0.0)


def _runs(config: SynthConfig, features: bool = False) -> RunSet:
    """A fresh synthetic run set (with or without example features): tests never share one."""
    runs, _ = generate(config)
    if not features:
        runs = RunSet(runs.train_ids, runs.test_ids, runs.runs, runs.metadata)
    return runs


def test_defaults_and_parameters_are_kept() -> None:
    """The documented defaults, and every constructor argument stored as given."""
    assert AutoSimulator().get_params() == {
        "candidates": list(AUTO_CANDIDATES),
        "cv_folds": 5,
        "memory": "auto",
        "unseen": "error",
        "cv_tests": None,
        "stack": True,
    }
    assert AUTO_CANDIDATES == (
        "linear",
        "additive",
        "mean",
        "hybrid",
        "log-linear",
        "log-hybrid",
        "featurized",
    )
    auto = AutoSimulator(
        ("mean", "linear"), cv_folds=3, memory=0.5, unseen="prior", cv_tests=7, stack=False
    )
    assert auto.get_params() == {
        "candidates": ["mean", "linear"],
        "cv_folds": 3,
        "memory": 0.5,
        "unseen": "prior",
        "cv_tests": 7,
        "stack": False,
    }


def test_two_runs_and_two_folds_are_enough() -> None:
    """The smallest cross-validation (2 runs, 2 folds) works; fewer runs or folds are refused."""
    runs = _runs(_FLAT)
    two = RunSet(runs.train_ids, runs.test_ids, runs.runs[:2])
    auto = AutoSimulator(["mean"], cv_folds=2).fit(two)
    assert auto.chosen_ == "mean" and np.isfinite(auto.cv_scores_["mean"])
    one = RunSet(runs.train_ids, runs.test_ids, runs.runs[:1])
    with pytest.raises(SimfluenceError, match="at least 2 training runs and 2 folds"):
        AutoSimulator(["mean"], cv_folds=5).fit(one)
    with pytest.raises(SimfluenceError, match="at least 2 training runs and 2 folds"):
        AutoSimulator(["mean"], cv_folds=1).fit(runs)


def test_mean_choice_and_description() -> None:
    """Hybrid is skipped without features (the candidates after it are still tried); the mean
    wins on runs that all have the same losses; `choice` and `describe` say exactly that,
    scores sorted from best to worst, and no memory or l2 for a method without them."""
    runs = _runs(_TINY)
    same = np.array([[1.0], [0.8], [0.9]])  # every run: the curriculum changes nothing
    flat = RunSet(
        runs.train_ids, runs.test_ids, [Run(r.run_id, r.curriculum, same) for r in runs.runs]
    )
    auto = AutoSimulator(["hybrid", "linear", "mean"], cv_folds=2, memory="none", stack=False)
    auto.fit(flat)
    scores = auto.cv_scores_
    assert auto.chosen_ == "mean" and list(scores) == ["linear", "mean"]
    assert scores["mean"] == 0.0 < scores["linear"]
    assert auto.skipped_ == {"hybrid": "no example features"}
    description = (
        f"auto picked mean: 2-fold run-wise CV all-steps MSE mean {scores['mean']:.4g}, "
        f"linear {scores['linear']:.4g}; hybrid skipped: no example features"
    )
    assert auto.describe() == description
    assert auto.choice() == {
        "method": "mean",
        "memory": None,
        "l2": None,
        "members": None,
        "cv_folds": 2,
        "cv_all_steps_mse": scores,
        "skipped": {"hybrid": "no example features"},
        "description": description,
    }


def test_linear_choice_and_description() -> None:
    """A chosen ridge simulator's memory kernel and l2 are in `choice` and `describe`; it was
    built with auto's ``memory``, ``unseen`` and ``cv_tests``."""
    auto = AutoSimulator(
        ["mean", "linear"], cv_folds=2, memory=0.5, unseen="prior", cv_tests=1, stack=False
    )
    auto.fit(_runs(_TINY))
    scores = auto.cv_scores_
    assert auto.chosen_ == "linear" and scores["linear"] < scores["mean"]
    l2 = auto.chosen_simulator.l2_
    description = (
        f"auto picked linear (memory 0.5, l2 {l2:g}): 2-fold run-wise CV all-steps MSE "
        f"linear {scores['linear']:.4g}, mean {scores['mean']:.4g}"
    )
    assert auto.describe() == description
    choice = auto.choice()
    assert (choice["method"], choice["memory"], choice["l2"]) == ("linear", "0.5", l2)
    assert choice["cv_folds"] == 2 and choice["skipped"] == {}
    params = auto.chosen_params_
    assert (params["memory"], params["unseen"], params["cv_tests"]) == (0.5, "prior", 1)


def test_unknown_or_no_candidates_are_refused() -> None:
    """Candidates must be among the core methods, and there must be one."""
    runs = _runs(_FLAT)
    for candidates in (["mean", "tracin-cp"], []):
        with pytest.raises(SimfluenceError, match="candidates must be among"):
            AutoSimulator(candidates, cv_folds=2).fit(runs)


def test_save_and_load_rebuild_the_chosen_simulator(tmp_path: Path) -> None:
    """A saved auto loads with its choice and simulates exactly like the chosen simulator."""
    runs = _runs(_FLAT)
    auto = AutoSimulator(["mean"], cv_folds=2).fit(runs)
    auto.save(tmp_path / "auto.npz")
    loaded = load_simulator(tmp_path / "auto.npz")
    assert loaded.describe() == auto.describe()
    curricula = [r.curriculum for r in runs.runs]
    starts = np.stack([r.initial_loss for r in runs.runs])
    expected = MeanTrajectorySimulator().fit(runs).simulate_many(curricula, starts)
    for a, b in zip(loaded.simulate_many(curricula, starts), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_failing_candidates_are_reported_and_the_others_still_tried() -> None:
    """A candidate whose fit fails is skipped with its error, and said so after the scores;
    the later ones are still fitted; when none can be fitted, that is an error."""
    from simfluence.simulators.linear import LinearSimulator

    runs = _runs(_FLAT)
    with pytest.raises(SimfluenceError, match=r"^auto: no candidate could be fitted"):
        AutoSimulator(["linear"], cv_tests=0).fit(runs)
    with pytest.raises(SimfluenceError) as direct:
        LinearSimulator(cv_tests=0).fit(runs)
    auto = AutoSimulator(["hybrid", "linear", "mean"], cv_folds=2, cv_tests=0).fit(runs)
    assert auto.chosen_ == "mean" and list(auto.cv_scores_) == ["mean"]
    why = str(direct.value)
    assert auto.skipped_ == {"hybrid": "no example features", "linear": why}
    assert auto.describe().endswith(
        f"mean {auto.cv_scores_['mean']:.4g}; hybrid skipped: no example features; "
        f"linear skipped: {why}"
    )


def test_hybrid_chooses_between_no_memory_and_the_kernel_linear_chose() -> None:
    """With ``memory="auto"`` hybrid (fitted after linear) is given ``none`` or linear's kernel
    (no momentum in the synthetic process: linear chose none)."""
    auto = AutoSimulator(["linear", "hybrid"], cv_folds=2, stack=False)
    auto.fit(_runs(_TINY, features=True))
    assert auto.chosen_ == "hybrid" and auto.chosen_params_["memory"] == "none,none"


def test_hybrid_takes_a_fixed_memory_as_given() -> None:
    """A memory other than ``"auto"`` reaches hybrid as is, even after linear was fitted."""
    auto = AutoSimulator(["linear", "hybrid"], cv_folds=2, memory="none", stack=False)
    auto.fit(_runs(_TINY, features=True))
    assert auto.chosen_ == "hybrid" and auto.chosen_params_["memory"] == "none"


def test_calibrate_fits_first_and_uses_the_chosen_simulator() -> None:
    """An unfitted auto is fitted, then calibrated like its chosen simulator (default 5 folds;
    a fitted one keeps its fit); the intervals are the chosen simulator's."""
    config = SynthConfig(pool=6, tests=2, runs=6, per_run=6, batch=2, epochs=1, noise=0.0)
    runs = _runs(config)
    auto = AutoSimulator(["mean"], cv_folds=2).calibrate(runs)
    reference = MeanTrajectorySimulator().fit(runs).calibrate(runs)
    np.testing.assert_array_equal(auto.calibration_residuals_, reference.calibration_residuals_)
    np.testing.assert_array_equal(auto.calibration_scale_, reference.calibration_scale_)
    two = MeanTrajectorySimulator().fit(runs).calibrate(runs, 2)
    auto.calibrate(runs, 2)
    np.testing.assert_array_equal(auto.calibration_residuals_, two.calibration_residuals_)
    # fitted on the first three runs, calibrated on all six: the fit is not redone
    first = RunSet(runs.train_ids, runs.test_ids, runs.runs[:3])
    kept = AutoSimulator(["mean"], cv_folds=2).fit(first)
    change = kept.chosen_simulator.mean_change_.copy()
    kept.calibrate(runs, 2)
    np.testing.assert_array_equal(kept.chosen_simulator.mean_change_, change)
    np.testing.assert_array_equal(kept.calibration_residuals_, two.calibration_residuals_)
