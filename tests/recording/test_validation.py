"""`validate` against answers known in closed form.

`LinearLossTask` (tests/exact_tasks.py) is trained for real by `validate`, but its losses after
every SGD step follow from a few lines of numpy, and Simfluence-Linear with known parameters
predicts them exactly. So every number `validate` reports (all-steps MSE, final-step Spearman,
LDS per kind, and the optimized curriculum's actual loss against the random ones) is compared
with an independent computation from the curricula alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import require_module
from scipy import stats

torch = require_module("torch", "pip install -c constraints.txt torch")

from exact_tasks import LinearLossTask, exact_parameters, linear_loss_trajectory, weights

from simfluence.errors import SimfluenceError
from simfluence.recording.loop import train_on_curriculum
from simfluence.recording.protocol import RecordingProtocol
from simfluence.recording.record import record_runs
from simfluence.recording.task import Examples
from simfluence.recording.validation import _optimized_intervals, make_curricula, validate
from simfluence.runlog import Run, RunSet
from simfluence.simulators import PersistenceSimulator
from simfluence.simulators.truth import TruthSimulator

PROTOCOL = dict(runs=4, pool=12, per_run=8, tests=5, batch=4, epochs=2, lr=0.1, seed=0)
KINDS = ("random", "leave-out", "repeat", "optimized")
COUNT, SEED = 6, 3
WRONG_SEED = 0


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation, 0 when either side is constant (the library's rule)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


def _reference_scores(true: list[np.ndarray], pred: list[np.ndarray]) -> dict[str, float]:
    """METHOD.md's protocol and the LDS, written out independently of `simfluence.metrics`."""
    per_trajectory = [((p[1:] - t[1:]) ** 2).mean(axis=0) for t, p in zip(true, pred, strict=True)]
    true_final = np.array([t[-1] for t in true])  # (C, M)
    pred_final = np.array([p[-1] for p in pred])
    return {
        "all_steps_mse": float(np.concatenate(per_trajectory).mean()),
        "final_step_spearman": float(
            np.mean([_rho(t, p) for t, p in zip(true_final, pred_final, strict=True)])
        ),
        "lds": float(
            np.mean([_rho(t, p) for t, p in zip(true_final.T, pred_final.T, strict=True)])
        ),
    }


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunSet]:
    """The recorded runs and the exact parameters, written once."""
    task = LinearLossTask()
    root = tmp_path_factory.mktemp("exact")
    runs = record_runs(task, root / "runs", RecordingProtocol(**PROTOCOL), progress=False)
    pool, tests = task.prepare(PROTOCOL["pool"], PROTOCOL["tests"], PROTOCOL["seed"])
    A, B = exact_parameters(pool, tests, PROTOCOL["lr"], PROTOCOL["batch"])
    np.savez(root / "exact.npz", A=A, B=B)
    # a second, wrong model: every training example's effect rescaled by a known factor
    np.savez(root / "scaled.npz", A=A, B=B * _scale(len(pool)))
    return root, runs


def _scale(n: int) -> np.ndarray:
    """The wrong model's factor on each training example's effect."""
    return np.random.default_rng(5).uniform(0.0, 2.0, n)


@pytest.fixture()
def setting(recorded: tuple[Path, RunSet]) -> dict:
    """`validate` on the recorded runs, run again for every test that reads it (so mutation
    testing, which runs only the tests that call a function, sees each of them call it)."""
    root, runs = recorded
    task = LinearLossTask()
    pool, tests = task.prepare(PROTOCOL["pool"], PROTOCOL["tests"], PROTOCOL["seed"])
    _, B = exact_parameters(pool, tests, PROTOCOL["lr"], PROTOCOL["batch"])
    scale = _scale(len(pool))
    simulators = {
        "exact": TruthSimulator(str(root / "exact.npz")),
        "scaled": TruthSimulator(str(root / "scaled.npz")),
        "persistence": PersistenceSimulator(),
    }
    result = validate(task, runs, simulators, kinds=KINDS, count=COUNT, seed=SEED)
    theta0 = weights(task, PROTOCOL["seed"])

    def actual(curriculum: list[list[str]]) -> np.ndarray:
        return linear_loss_trajectory(pool, tests, theta0, curriculum, PROTOCOL["lr"])

    def predicted(name: str, curriculum: list[list[str]]) -> np.ndarray:
        truth = actual(curriculum)
        if name == "persistence":
            return np.repeat(truth[:1], len(truth), axis=0)
        if name == "exact":
            return truth
        factor = dict(zip(pool.ids, scale, strict=True))
        # the scaled model's rollout: each example's exact effect times its factor
        x_pool = dict(zip(pool.ids, pool.tensors["x"].numpy(), strict=True))
        x_test = tests.tensors["x"].numpy()
        out = [truth[0]]
        for batch in curriculum:
            step = np.mean([factor[i] * x_pool[i] for i in batch], axis=0)
            out.append(out[-1] - PROTOCOL["lr"] * x_test @ step)
        return np.array(out)

    return {
        "runs": runs,
        "result": result,
        "actual": actual,
        "predicted": predicted,
        "B": B,
        "root": root,
    }


def test_the_exact_task_is_exact(setting: dict) -> None:
    """The premise: the recorded runs are what the closed form says, step by step."""
    for run in setting["runs"].runs:
        np.testing.assert_allclose(run.losses, setting["actual"](run.curriculum), atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "leave-out", "repeat"])
def test_scores_per_kind_equal_the_closed_form(setting: dict, kind: str) -> None:
    curricula = make_curricula(kind, COUNT, setting["runs"], SEED)
    true = [setting["actual"](c) for c in curricula]
    block = setting["result"]["kinds"][kind]
    assert block["curricula"] == COUNT
    assert set(block["methods"]) == {"exact", "scaled", "persistence"}
    for name, scores in block["methods"].items():
        pred = [setting["predicted"](name, c) for c in curricula]
        expected = _reference_scores(true, pred)
        assert scores["all_steps_mse"] == pytest.approx(expected["all_steps_mse"], abs=1e-12)
        assert scores["final_step_spearman"] == pytest.approx(
            expected["final_step_spearman"], abs=1e-9
        )
        assert scores["lds"] == pytest.approx(expected["lds"], abs=1e-9)
    # the numbers those references give, so that a broken reference cannot hide a bug
    exact, scaled, persistence = (block["methods"][n] for n in ("exact", "scaled", "persistence"))
    assert exact["all_steps_mse"] < 1e-20
    assert exact["final_step_spearman"] == pytest.approx(1.0) and exact["lds"] == pytest.approx(1.0)
    assert persistence["lds"] == 0.0  # constant across curricula: ranks nothing
    assert 0.0 < scaled["all_steps_mse"] < persistence["all_steps_mse"]
    assert -1.0 < scaled["lds"] < 1.0


def _closed_form_optimized(setting: dict, path: Path) -> list[float]:
    """The actual mean final loss of each optimized curriculum, by hand: the curricula are
    the ones `make_curricula` searches with the simulator stored at `path`."""
    runs = setting["runs"]
    optimizer = TruthSimulator(str(path)).fit(runs)
    curricula = make_curricula("optimized", COUNT, runs, SEED, optimizer)
    return [float(setting["actual"](c)[-1].mean()) for c in curricula]


def test_optimized_curricula_are_scored_by_their_actual_loss(setting: dict) -> None:
    """The optimized curricula's actual losses equal the closed form of the curricula the
    search returns; the exact simulator predicts the first one exactly; the share of random
    curricula beaten counts those whose actual loss is higher."""
    runs, result = setting["runs"], setting["result"]
    optimized = result["optimized"]
    actual = _closed_form_optimized(setting, setting["root"] / "exact.npz")
    np.testing.assert_allclose(optimized["actual_mean_test_losses_per_search"], actual, atol=1e-12)
    assert optimized["actual_mean_test_loss"] == pytest.approx(actual[0], abs=1e-12)
    randoms = [setting["actual"](c)[-1].mean() for c in make_curricula("random", COUNT, runs, SEED)]
    np.testing.assert_allclose(optimized["random_mean_test_losses"], randoms, atol=1e-12)
    assert optimized["fraction_of_random_beaten"] == np.mean([actual[0] < r for r in randoms])
    assert optimized["fraction_of_random_beaten"] == 1.0  # the exact model's search wins
    assert result["kinds"]["optimized"]["methods"]["exact"]["all_steps_mse"] < 1e-20


def test_fraction_beaten_counts_only_worse_random_curricula(setting: dict, tmp_path: Path) -> None:
    """A search with a *wrong* additive model lands among the random curricula: the share
    beaten equals the share of random curricula whose actual loss is higher."""
    task = LinearLossTask()
    runs = setting["runs"]
    pool, tests = task.prepare(PROTOCOL["pool"], PROTOCOL["tests"], PROTOCOL["seed"])
    A, B = exact_parameters(pool, tests, PROTOCOL["lr"], PROTOCOL["batch"])
    wrong = np.random.default_rng(WRONG_SEED).permutation(B.T).T  # effects given to others
    np.savez(tmp_path / "wrong.npz", A=A, B=wrong)
    simulators = {"wrong": TruthSimulator(str(tmp_path / "wrong.npz"))}
    result = validate(task, runs, simulators, kinds=("random", "optimized"), count=COUNT, seed=SEED)
    actual = _closed_form_optimized(setting, tmp_path / "wrong.npz")
    optimized = result["optimized"]
    assert optimized["actual_mean_test_loss"] == pytest.approx(actual[0], abs=1e-12)
    randoms = np.array(optimized["random_mean_test_losses"])
    assert optimized["fraction_of_random_beaten"] == np.mean(actual[0] < randoms)


def test_validate_refuses_what_it_cannot_do(setting: dict) -> None:
    runs = setting["runs"]
    task = LinearLossTask()
    sims = {"persistence": PersistenceSimulator()}
    with pytest.raises(SimfluenceError, match="unknown kind 'sideways'"):
        validate(task, runs, sims, kinds=("sideways",), count=3)
    with pytest.raises(SimfluenceError, match="at least 2"):
        validate(task, runs, sims, kinds=("random",), count=1)
    with pytest.raises(SimfluenceError, match="unknown kind 'sideways'"):
        make_curricula("sideways", 3, runs, 0)
    with pytest.raises(SimfluenceError, match="need a fitted simulator"):
        make_curricula("optimized", 3, runs, 0)

    class OtherTests(LinearLossTask):
        def prepare(self, pool: int, tests: int, seed: int):  # type: ignore[no-untyped-def]
            train, test = super().prepare(pool, tests, seed)
            return train, Examples([f"other-{i}" for i in test.ids], test.tensors)

    with pytest.raises(SimfluenceError, match="rebuilt other pool/test ids than the run set's"):
        validate(OtherTests(), runs, sims, kinds=("random",), count=2)


def test_make_curricula_follows_the_protocol(setting: dict) -> None:
    """Each kind, as documented: random curricula in the recording protocol; edits of one base
    curriculum removing or repeating a tenth of its distinct examples (one id at least), or
    reordering its multiset into batches of the same sizes."""
    runs = setting["runs"]
    per_run, batch, epochs = PROTOCOL["per_run"], PROTOCOL["batch"], PROTOCOL["epochs"]
    randoms = make_curricula("random", 4, runs, SEED)
    assert len(randoms) == 4 and len({str(c) for c in randoms}) == 4
    for curriculum in randoms:
        assert [len(b) for b in curriculum] == [batch] * (epochs * per_run // batch)
        counts = {i: sum(b.count(i) for b in curriculum) for b in curriculum for i in b}
        assert len(counts) == per_run and set(counts.values()) == {epochs}
    assert make_curricula("random", 4, runs, SEED) == randoms  # deterministic in the seed
    assert make_curricula("random", 4, runs, SEED + 1) != randoms
    assert randoms[0] not in [r.curriculum for r in runs.runs]  # never recorded

    def flat(curriculum: list[list[str]]) -> list[str]:
        return sorted(i for b in curriculum for i in b)

    left_out = make_curricula("leave-out", 3, runs, SEED)
    base = sorted(set(flat(make_curricula("reorder", 1, runs, SEED)[0])))
    n_edit = max(1, round(0.1 * len(base)))  # 8 distinct ids: 1
    for curriculum in left_out:
        kept = set(flat(curriculum))
        assert kept < set(base) and len(set(base) - kept) == n_edit
        assert len(flat(curriculum)) == epochs * (per_run - n_edit)
    for curriculum in make_curricula("repeat", 3, runs, SEED):
        assert set(flat(curriculum)) == set(base)
        doubled = [i for i in base if flat(curriculum).count(i) == 2 * epochs]
        assert len(doubled) == n_edit and len(flat(curriculum)) == epochs * (per_run + n_edit)
    reordered = make_curricula("reorder", 3, runs, SEED)
    assert len({str(c) for c in reordered}) == 3
    for curriculum in reordered:
        assert flat(curriculum) == flat(reordered[0])
        assert [len(b) for b in curriculum] == [batch] * (epochs * per_run // batch)


class NoisyLossTask(LinearLossTask):
    """`LinearLossTask` whose *training* loss is scaled by seeded noise: runs depend on the seed."""

    name = "exact-noisy-loss"

    def example_losses(self, model, inputs):  # type: ignore[no-untyped-def]
        losses = super().example_losses(model, inputs)
        if model.training:
            losses = losses * (1 + 0.5 * torch.randn(losses.shape, dtype=losses.dtype))
        return losses


def test_validate_trains_each_curriculum_with_its_own_seed(setting: dict) -> None:
    """Curriculum k of a kind is trained from the recorded initial model with seed
    ``seed + k``; progress sees every kind's curricula; without both kinds there is no
    optimized summary."""
    task = NoisyLossTask()
    runs = setting["runs"]
    seen: list[int] = []

    def progress(items, total):  # type: ignore[no-untyped-def]
        seen.append(total)
        return items

    sims = {"persistence": PersistenceSimulator()}
    result = validate(task, runs, sims, kinds=("random",), count=3, seed=4, progress=progress)
    assert seen == [3] and "optimized" not in result
    assert result["curricula_per_kind"] == 3 and result["seed"] == 4
    pool, tests = task.prepare(PROTOCOL["pool"], PROTOCOL["tests"], PROTOCOL["seed"])
    model = task.make_model(PROTOCOL["seed"])
    true = [
        train_on_curriculum(task, model, pool, tests, c, PROTOCOL["lr"], 4 + k).losses
        for k, c in enumerate(make_curricula("random", 3, runs, 4))
    ]
    pred = [np.repeat(t[:1], len(t), axis=0) for t in true]
    expected = _reference_scores(true, pred)["all_steps_mse"]
    got = result["kinds"]["random"]["methods"]["persistence"]["all_steps_mse"]
    assert got == pytest.approx(expected, rel=1e-12)


def test_edit_kinds_edit_a_tenth_of_a_larger_base() -> None:
    """With 50 distinct examples per run a tenth is 5: exactly 5 distinct ids are left out or
    repeated per variant, none twice; random curricula never replay the edits' base."""
    ids = [f"ex-{k}" for k in range(80)]
    config = {"per_run": 50, "batch": 5, "epochs": 2}
    runs = RunSet(ids, ["t"], [Run("r", [ids[:5]], [[1.0], [0.5]])], {"config": config})
    flat = [sorted(i for b in c for i in b) for c in make_curricula("reorder", 1, runs, 1)]
    base = set(flat[0])
    for curriculum in make_curricula("leave-out", 20, runs, 1):
        kept = {i for b in curriculum for i in b}
        assert len(base - kept) == 5 and kept < base
    for curriculum in make_curricula("repeat", 20, runs, 1):
        counts = [sum(b.count(i) for b in curriculum) for i in sorted(base)]
        assert sorted(counts) == [2] * 45 + [4] * 5
    for curriculum in make_curricula("random", 5, runs, 1):
        assert sorted(i for b in curriculum for i in b) != flat[0]


def test_optimized_curricula_are_deterministic_and_in_the_protocol(recorded) -> None:  # type: ignore[no-untyped-def]
    root, runs = recorded
    optimizer = TruthSimulator(str(root / "exact.npz")).fit(runs)
    first = make_curricula("optimized", 2, runs, SEED, optimizer)
    assert make_curricula("optimized", 2, runs, SEED, optimizer) == first
    assert first[0] != first[1]  # each search its own seed: another order of the same set
    for curriculum in first:
        assert [len(b) for b in curriculum] == [PROTOCOL["batch"]] * 4  # 2 epochs x 8 / 4


def test_validate_defaults_and_checks_kinds_before_training(recorded) -> None:  # type: ignore[no-untyped-def]
    """20 curricula per kind and seed 0 by default; an unknown kind stops it before any
    training."""
    _, runs = recorded
    sims = {"persistence": PersistenceSimulator()}
    result = validate(LinearLossTask(), runs, sims, kinds=("reorder",))
    assert result["curricula_per_kind"] == 20 and result["seed"] == 0
    assert result["kinds"]["reorder"]["curricula"] == 20
    trained: list[int] = []

    def progress(items, total):  # type: ignore[no-untyped-def]
        trained.append(total)
        return items

    with pytest.raises(SimfluenceError, match="unknown kind 'sideways'"):
        validate(LinearLossTask(), runs, sims, kinds=("random", "sideways"), progress=progress)
    assert trained == []


def test_optimized_intervals_say_whether_each_actual_loss_fell_inside() -> None:
    """The first search's own prediction and 90% interval are reported; an actual loss on either
    end of an interval counts as inside (closed interval); a search without an interval is never
    inside; without an interval for the first search (an uncalibrated searcher) there is nothing
    to check. Values worked out by hand."""
    predictions = [
        (0.5, (0.4, 0.6)),  # actual 0.4: on the lower end, inside
        (0.7, (0.65, 0.8)),  # actual 0.8: on the upper end, inside
        (0.3, None),  # no interval: not inside
        (0.2, (0.1, 0.3)),  # actual 0.35: above
        (0.9, (0.8, 1.0)),  # actual 0.79: below
    ]
    out = _optimized_intervals(predictions, [0.4, 0.8, 0.3, 0.35, 0.79])
    assert out == {
        "predicted_mean_test_loss_in_trust_region": 0.5,
        "predicted_interval_90": [0.4, 0.6],
        "actual_in_interval": True,
        "actual_in_interval_per_search": [True, True, False, False, False],
    }
    upper = _optimized_intervals([(0.5, (0.4, 0.6)), (0.5, (0.4, 0.6))], [0.6, 0.61])
    assert upper["actual_in_interval"] is True
    assert upper["actual_in_interval_per_search"] == [True, False]
    outside = _optimized_intervals([(0.5, (0.4, 0.6))], [0.39])
    assert outside["actual_in_interval"] is False
    assert outside["actual_in_interval_per_search"] == [False]
    uncalibrated = _optimized_intervals([(0.3, None), (0.2, (0.1, 0.3))], [0.3, 0.2])
    assert uncalibrated == {"predicted_mean_test_loss_in_trust_region": 0.3}


def test_subsets_are_retrained_and_scored_on_their_final_losses(setting: dict) -> None:
    """``subsets`` retrains score the test examples at the last step only: the kind's
    all-steps MSE is the final-step MSE, and the LDS is that of the final losses."""
    from simfluence.recording.subsets import subset_curricula

    runs, root = setting["runs"], setting["root"]
    result = validate(
        LinearLossTask(), runs, {"scaled": TruthSimulator(str(root / "scaled.npz"))},
        kinds=["subsets"], count=3, seed=SEED,
    )  # fmt: skip
    curricula = subset_curricula(runs, 3, 1, SEED)
    true = np.stack([setting["actual"](c)[-1] for c in curricula])
    pred = np.stack([setting["predicted"]("scaled", c)[-1] for c in curricula])
    scores = result["kinds"]["subsets"]["methods"]["scaled"]
    assert scores["all_steps_mse"] == pytest.approx(np.mean((pred - true) ** 2), rel=1e-9)
    whole = [setting["actual"](c) for c in curricula]
    assert scores["all_steps_mse"] != pytest.approx(
        _reference_scores(whole, [setting["predicted"]("scaled", c) for c in curricula])[
            "all_steps_mse"
        ]
    )


def test_a_method_whose_fit_fails_is_reported_and_the_others_validated(setting: dict) -> None:
    """A method that cannot be fitted (here: a simulator file that does not exist; in the wild:
    dattri's EK-FAC on MiniLM's attention layers) is reported under ``failed`` and in the
    text, and the other methods are still validated; when none can be fitted, that is an
    error."""
    from simfluence.evaluation.text import format_validation

    runs, root = setting["runs"], setting["root"]
    simulators = {
        "broken": TruthSimulator(str(root / "missing.npz")),
        "exact": TruthSimulator(str(root / "exact.npz")),
    }
    result = validate(LinearLossTask(), runs, simulators, kinds=["random"], count=3, seed=SEED)
    assert list(result["kinds"]["random"]["methods"]) == ["exact"]
    assert set(result["failed"]) == {"broken"} and "missing.npz" in result["failed"]["broken"]
    assert "broken: not validated, its fit failed: " in format_validation(result)
    with pytest.raises(SimfluenceError, match="no method could be fitted"):
        validate(LinearLossTask(), runs, {"broken": simulators["broken"]}, ["random"], 3)


class _NeverSaw(TruthSimulator):
    """Fits, but refuses every curriculum (as a simulator does for an example no run it was
    fitted on consumed, with ``unseen="error"``)."""

    def _simulate_many(self, curricula, initial):  # type: ignore[no-untyped-def]
        from simfluence.errors import CurriculumError

        raise CurriculumError("curriculum #0: step 2: training id 'x' never appeared")


def test_a_method_that_cannot_answer_a_kind_is_reported_and_the_others_scored(
    setting: dict,
) -> None:
    """A 43-minute static table died at its last step on this: `unrolled` fitted from one
    run refused curricula with examples that run never consumed. Now the method is reported
    under ``unanswered`` (per kind) and in the text, and the other methods are scored."""
    from simfluence.evaluation.text import format_validation

    root = setting["root"]
    simulators = {
        "exact": TruthSimulator(str(root / "exact.npz")),
        "unseen": _NeverSaw(str(root / "exact.npz")),
    }
    result = validate(
        LinearLossTask(), setting["runs"], simulators, ["random", "reorder"], 3, seed=SEED
    )
    for kind in ("random", "reorder"):
        assert list(result["kinds"][kind]["methods"]) == ["exact"]
        assert "never appeared" in result["unanswered"]["unseen"][kind]
    assert result["failed"] == {}
    assert "unseen: no answer on the reorder curricula: curriculum #0" in format_validation(result)
