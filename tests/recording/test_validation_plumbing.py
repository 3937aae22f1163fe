"""`validate`'s plumbing on stubbed retraining (milliseconds, no model trained): the numbers it
reports equal the library's metrics applied to the same curricula and retrained losses, and
every curriculum is retrained with the recorded protocol (learning rate, optimizer, schedule,
seed ``seed + k``, device), its losses returned in order.

The "actual" losses come from a known additive model: each training example lowers every test
example's loss by its own fixed amount, and the loss decays by 3% per step."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import require_module

torch = require_module("torch", "pip install -c constraints.txt torch")

from simfluence import evaluation, metrics  # noqa: E402
from simfluence.backends import SerialBackend  # noqa: E402
from simfluence.counterfactual.search import assess_curriculum, optimize_curriculum  # noqa: E402
from simfluence.recording import validation  # noqa: E402
from simfluence.recording.optim import Schedule  # noqa: E402
from simfluence.recording.validation import make_curricula, validate  # noqa: E402
from simfluence.simulators import AdditiveSimulator, PersistenceSimulator  # noqa: E402
from simfluence.synth import SynthConfig, generate  # noqa: E402

COUNT, SEED, EVALUATIONS = 4, 3, 30


def _effects(runs) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    return {i: rng.normal(0.02, 0.03, len(runs.test_ids)) for i in runs.train_ids}


def _true_losses(curriculum, initial: np.ndarray, effects) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows = [np.asarray(initial, dtype=float)]
    for batch in curriculum:
        rows.append(0.97 * rows[-1] - sum(effects[i] for i in batch))
    return np.stack(rows)


@pytest.fixture
def stubbed(monkeypatch):  # type: ignore[no-untyped-def]
    """A small synthetic run set, `validate`'s retraining replaced by the additive model (the
    call's arguments recorded), and its task preparation by placeholders."""
    runs, _ = generate(SynthConfig(pool=12, tests=3, runs=8, per_run=8, batch=2, epochs=1, seed=2))
    runs.metadata["config"] |= {"lr": 0.1}
    effects = _effects(runs)
    initial = np.mean([r.initial_loss for r in runs.runs], axis=0)
    calls: list[dict] = []

    def retrain(task, pool, tests, config, seed, curricula, device, backend, wrap):  # type: ignore[no-untyped-def]
        total = sum(len(b) for b in curricula.values())
        calls.append(
            dict(task=task, pool=pool, tests=tests, config=config, seed=seed, device=device,
                 backend=backend, wrapped=list(wrap(iter(range(total)), total)))
        )  # fmt: skip
        return {k: [_true_losses(c, initial, effects) for c in b] for k, b in curricula.items()}

    monkeypatch.setattr(validation, "_retrain", retrain)
    prepared: list[tuple] = []

    def prepare(task, runs_):  # type: ignore[no-untyped-def]
        prepared.append((task, runs_))
        return "POOL", "TESTS"

    monkeypatch.setattr(validation, "prepare_for_runset", prepare)
    return SimpleNamespace(
        runs=runs, effects=effects, initial=initial, calls=calls, prepared=prepared
    )


def _simulators() -> dict:
    return {"additive": AdditiveSimulator(unseen="prior"), "persistence": PersistenceSimulator()}


def test_validate_reports_the_metrics_of_the_retrained_curricula(stubbed) -> None:  # type: ignore[no-untyped-def]
    runs, initial = stubbed.runs, stubbed.initial
    sims = _simulators()
    progress_totals: list[int] = []

    def progress(items, total):  # type: ignore[no-untyped-def]
        progress_totals.append(total)
        return items

    kinds = ["random", "leave-out", "reorder", "repeat"]
    result = validate(
        "TASK", runs, sims, kinds, count=COUNT, seed=SEED, progress=progress,
        search_evaluations=EVALUATIONS, device="cpu", backend="serial",
    )  # fmt: skip
    assert result["curricula_per_kind"] == COUNT and result["seed"] == SEED
    assert result["search_evaluations"] == EVALUATIONS
    assert result["warnings"] == {"additive": [], "persistence": []}
    assert "optimized" not in result
    assert stubbed.prepared == [("TASK", runs)]
    (call,) = stubbed.calls
    assert (call["task"], call["pool"], call["tests"]) == ("TASK", "POOL", "TESTS")
    assert call["config"] is runs.metadata["config"] and call["seed"] == SEED
    assert (call["device"], call["backend"]) == ("cpu", "serial")
    assert call["wrapped"] == list(range(4 * COUNT)) and progress_totals == [4 * COUNT]
    assert list(result["kinds"]) == kinds
    for kind in kinds:
        curricula = make_curricula(kind, COUNT, runs, SEED)
        true = [_true_losses(c, initial, stubbed.effects) for c in curricula]
        block = result["kinds"][kind]
        assert block["curricula"] == COUNT
        assert list(block["methods"]) == ["additive", "persistence"]
        for name, sim in sims.items():
            pred = sim.simulate_many(curricula, initial)
            scores = block["methods"][name]
            assert scores["all_steps_mse"] == metrics.all_steps_mse(true, pred).mean
            assert scores["final_step_spearman"] == metrics.final_step_spearman(true, pred).mean
            finals = np.stack([t[-1] for t in true]), np.stack([p[-1] for p in pred])
            assert scores["lds"] == metrics.linear_datamodeling_score(*finals)
            _check_interval_scores(sim, true, pred, scores)


def _check_interval_scores(sim, true, pred, scores) -> None:  # type: ignore[no-untyped-def]
    """The interval block of a calibrated simulator, by hand from `evaluation.interval_scores`
    and `Simulator.objective_interval`; none for one that is not calibrated."""
    if not sim.is_calibrated:
        assert "coverage_90" not in scores
        return
    bands, expected = evaluation.interval_scores(sim, true, pred)
    for key, value in expected.items():
        assert scores[key] == value, key
    inside = [
        (t[-1] >= b.lower[-1]) & (t[-1] <= b.upper[-1]) for t, b in zip(true, bands, strict=True)
    ]
    assert scores["final_coverage_90"] == float(np.mean(np.concatenate(inside)))
    columns = np.arange(true[0].shape[1])
    in_interval = []
    for t, p in zip(true, pred, strict=True):
        low, high = sim.objective_interval(p, columns)
        in_interval.append(bool(low <= t[-1].mean() <= high))
    assert scores["mean_final_in_interval"] == in_interval


def test_validate_scores_the_optimized_curricula_against_the_random_ones(stubbed) -> None:  # type: ignore[no-untyped-def]
    runs, initial = stubbed.runs, stubbed.initial
    sims = _simulators()
    evaluations = 6  # short searches: each seed ends on a different curriculum
    result = validate(
        "TASK", runs, sims, ["random", "optimized"], count=COUNT, seed=SEED,
        search_evaluations=evaluations,
    )  # fmt: skip
    searcher = sims["additive"]
    optimized = make_curricula("optimized", COUNT, runs, SEED, searcher, evaluations)
    by_hand = [
        optimize_curriculum(
            searcher, 8, 2, 1, seed=SEED * 1000 + k, max_evaluations=evaluations, recorded=runs
        ).curriculum
        for k in range(COUNT)
    ]
    assert optimized == by_hand
    random_ = make_curricula("random", COUNT, runs, SEED)
    actual = [float(_true_losses(c, initial, stubbed.effects)[-1].mean()) for c in optimized]
    randoms = [float(_true_losses(c, initial, stubbed.effects)[-1].mean()) for c in random_]
    block = result["optimized"]
    assert block["actual_mean_test_loss"] == actual[0]
    assert block["actual_mean_test_losses_per_search"] == actual
    assert block["random_mean_test_losses"] == randoms
    assert block["fraction_of_random_beaten"] == float(np.mean([actual[0] < r for r in randoms]))
    predicted = searcher.simulate_many(optimized, initial)
    assert block["predicted_mean_test_loss"] == float(predicted[0][-1].mean())
    value, interval = assess_curriculum(searcher, optimized[0], recorded=runs)[:2]
    assert block["predicted_mean_test_loss_in_trust_region"] == value
    if interval is not None:
        assert block["predicted_interval_90"] == list(interval)
        assert block["actual_in_interval"] == bool(interval[0] <= actual[0] <= interval[1])
    assert result["kinds"]["optimized"]["curricula"] == COUNT


def test_validate_refuses_bad_requests_before_any_work(stubbed) -> None:  # type: ignore[no-untyped-def]
    from simfluence.errors import SimfluenceError

    runs = stubbed.runs
    sims = _simulators()
    with pytest.raises(SimfluenceError, match="unknown kind 'nope'"):
        validate("TASK", runs, sims, ["random", "nope"])
    assert not any(hasattr(sim, "test_ids_") for sim in sims.values())  # refused before fitting
    with pytest.raises(SimfluenceError, match="'tpu'"):
        validate("TASK", runs, sims, ["random"], device="tpu")
    with pytest.raises(SimfluenceError, match="at least one method"):
        validate("TASK", runs, {}, ["random"])
    with pytest.raises(SimfluenceError, match="at least 2"):
        validate("TASK", runs, _simulators(), ["random"], count=1)
    assert stubbed.calls == []
    result = validate("TASK", runs, _simulators(), ["random"], count=2)
    assert result["kinds"]["random"]["curricula"] == 2


# -- the retraining itself, training stubbed ------------------------------------------------
class _Reversed(SerialBackend):
    """In this process, last unit first: results arrive out of order."""

    def map_unordered(self, work, items):  # type: ignore[no-untyped-def]
        for position in reversed(range(len(items))):
            yield position, work(items[position])


def test_retraining_follows_the_recorded_protocol_and_keeps_the_order(monkeypatch) -> None:
    made: list[int] = []
    calls: list[dict] = []

    def make_model(seed: int) -> torch.nn.Module:
        made.append(seed)
        return torch.nn.Linear(2, 1)

    def train(task, initial, pool, tests, curriculum, lr, seed, **options):  # type: ignore[no-untyped-def]
        calls.append(dict(initial=initial, pool=pool, tests=tests, lr=lr, seed=seed, **options))
        return SimpleNamespace(losses=np.full((len(curriculum) + 1, 1), float(seed)))

    monkeypatch.setattr(validation, "train_on_curriculum", train)
    task = SimpleNamespace(make_model=make_model)
    config = {
        "seed": 5,
        "lr": 0.25,
        "optimizer": {"name": "adamw"},
        "schedule": {"name": "cosine", "warmup": 1},
    }
    curricula = {
        "random": [[["a"]], [["b"], ["c"]]],
        "repeat": [[["a"], ["a"], ["b"]]],
        "subsets": [[["c"], ["a"]]],
    }
    totals: list[int] = []

    def wrap(items, total):  # type: ignore[no-untyped-def]
        totals.append(total)
        return items

    out = validation._retrain(
        task, "POOL", "TESTS", config, 100, curricula, "cpu", _Reversed(), wrap
    )
    assert made == [5] and totals == [4]
    assert [c["seed"] for c in calls] == [100, 100, 101, 100]  # seed + k within each kind
    assert [c["run_id"] for c in calls] == ["subsets-0", "repeat-0", "random-1", "random-0"]
    # subsets are scored on their final losses only; every other kind after every step
    assert [c["scoring"] for c in calls] == [validation.FINAL_ONLY, None, None, None]
    assert validation.FINAL_ONLY.columns(1, 3).size == 0
    assert validation.FINAL_ONLY.columns(0, 3) is None
    for c in calls:
        assert (c["pool"], c["tests"], c["lr"], c["device"]) == ("POOL", "TESTS", 0.25, "cpu")
        assert c["optimizer"] == {"name": "adamw"}
        assert c["schedule"] == Schedule("cosine", 1)
        assert isinstance(c["initial"], torch.nn.Linear)
    assert [o.shape for o in out["random"]] == [(2, 1), (3, 1)]
    assert [o[0, 0] for o in out["random"]] == [100.0, 101.0]
    assert out["repeat"][0].shape == (4, 1) and out["repeat"][0][0, 0] == 100.0


class _Remote:
    """A backend that is not this process's serial one: units go out pickled, as to a worker
    process, and come back out of order; it is closed only by whoever made it."""

    name = "remote"
    threads = 2
    closed = 0

    def map_unordered(self, work, items):  # type: ignore[no-untyped-def]
        import pickle

        copy = pickle.loads(pickle.dumps(work))
        for position in reversed(range(len(items))):
            yield position, copy(items[position])

    def close(self) -> None:
        self.closed += 1


def test_retraining_on_worker_processes_rebuilds_the_task_there(monkeypatch) -> None:
    references: list[tuple] = []
    threads: list[int] = []
    calls: list[dict] = []

    def reference(task, spec, where):  # type: ignore[no-untyped-def]
        references.append((task, spec, where))
        return {"ref": "tasks:Stub"}

    def prepared(task_ref, config, device):  # type: ignore[no-untyped-def]
        assert task_ref == {"ref": "tasks:Stub"} and device == "cpu"
        assert config == {"seed": 5, "lr": 0.1}
        return SimpleNamespace(task="REBUILT", pool="P", tests="T", initial="MODEL")

    def train(task, initial, pool, tests, curriculum, lr, seed, **options):  # type: ignore[no-untyped-def]
        calls.append(dict(task=task, initial=initial, seed=seed, run_id=options["run_id"]))
        return SimpleNamespace(losses=np.full((len(curriculum) + 1, 1), float(seed)))

    monkeypatch.setattr(validation, "worker_task_reference", reference)
    monkeypatch.setattr(validation, "prepared_in_worker", prepared)
    monkeypatch.setattr(validation, "train_on_curriculum", train)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    remote, totals = _Remote(), []

    def wrap(items, total):  # type: ignore[no-untyped-def]
        totals.append(total)
        return items

    curricula = {"random": [[["a"]], [["b"], ["c"]]]}
    config = {"seed": 5, "lr": 0.1}
    out = validation._retrain("TASK", "POOL", "TESTS", config, 7, curricula, "cpu", remote, wrap)
    assert references == [("TASK", None, "remote")] and totals == [2]
    assert threads == [2, 2]  # each unit sets the backend's threads in its worker
    assert [c["task"] for c in calls] == ["REBUILT"] * 2 and calls[0]["initial"] == "MODEL"
    assert [c["run_id"] for c in calls] == ["random-1", "random-0"]
    assert [o[0, 0] for o in out["random"]] == [7.0, 8.0]
    assert remote.closed == 0  # the caller's backend stays open
    monkeypatch.setattr(validation, "make_backend", lambda backend: remote)
    validation._retrain("TASK", "POOL", "TESTS", config, 7, curricula, "cpu", "remote", wrap)
    assert remote.closed == 1  # one it made from a name is closed


def test_serial_retraining_runs_on_the_backends_threads(monkeypatch) -> None:
    """`torch_threads(initial, runner.threads)`: the serial backend's thread count holds while
    the curricula train."""
    seen: list[int] = []

    def train(task, initial, pool, tests, curriculum, lr, seed, **options):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return SimpleNamespace(losses=np.zeros((len(curriculum) + 1, 1)))

    monkeypatch.setattr(validation, "train_on_curriculum", train)
    task = SimpleNamespace(make_model=lambda seed: torch.nn.Linear(2, 1))
    before = torch.get_num_threads()
    validation._retrain(
        task, "P", "T", {"seed": 0, "lr": 0.1}, 0, {"random": [[["a"]]]}, None,
        SerialBackend(threads=3), lambda items, total: items,
    )  # fmt: skip
    assert seen == [3] and torch.get_num_threads() == before


def test_interval_scores_count_the_end_points_as_inside(stubbed) -> None:  # type: ignore[no-untyped-def]
    """True final losses put exactly on, just outside and inside the 90% bounds: on a bound
    counts as inside, per (curriculum, test example) and for the mean final loss."""
    runs = stubbed.runs
    sim = AdditiveSimulator(unseen="prior").fit(runs).calibrate(runs)
    curricula = make_curricula("random", 4, runs, SEED)
    pred = sim.simulate_many(curricula, stubbed.initial)
    bands = [sim.interval_of(p, 0.9) for p in pred]
    true = [p.copy() for p in pred]
    true[0][-1] = bands[0].lower[-1]  # on the lower bounds: inside
    true[1][-1] = bands[1].upper[-1]  # on the upper bounds: inside
    true[2][-1] = bands[2].upper[-1] + 1.0  # above: outside
    true[2][-2] = bands[2].lower[-1]  # one step earlier does not count
    scores = validation.interval_scores(sim, true, pred)
    assert scores["final_coverage_90"] == pytest.approx(9 / 12)
    one = validation.interval_scores(sim, [true[3]], [pred[3]])  # one curriculum, exact
    assert one["final_coverage_90"] == 1.0 and one["mean_final_in_interval"] == [True]
    columns = np.arange(3)
    low, high = sim.objective_interval(pred[3], columns)
    for value, inside in [(low, True), (high, True), (high + 1e-9, False), (low - 1e-9, False)]:
        true[3][-1] = value  # every test example at `value`: the mean is `value`
        true[3][-2] = (low + high) / 2
        assert validation.interval_scores(sim, true, pred)["mean_final_in_interval"][3] is inside
    with pytest.raises(ValueError):
        validation.interval_scores(sim, true[:3], pred)


def test_validate_defaults_and_one_recorded_run(stubbed) -> None:  # type: ignore[no-untyped-def]
    """20 curricula per kind and seed 0 by default; a single recorded run cannot be calibrated
    (no intervals reported), which does not stop the validation."""
    runs = stubbed.runs
    result = validate("TASK", runs, _simulators(), ["random"])
    assert result["curricula_per_kind"] == 20 and result["seed"] == 0
    assert result["kinds"]["random"]["curricula"] == 20
    one = runs.subset(runs.run_ids[:1])
    result = validate(
        "TASK", one, {"additive": AdditiveSimulator(unseen="prior", l2=1.0)}, ["random"]
    )
    assert "coverage_90" not in result["kinds"]["random"]["methods"]["additive"]


class _Warned(AdditiveSimulator):
    def _fit_parameters(self, runs) -> None:  # type: ignore[no-untyped-def]
        super()._fit_parameters(runs)
        self.warnings_ = ["recorded with Adam"]


def test_validate_passes_on_each_methods_warnings(stubbed) -> None:  # type: ignore[no-untyped-def]
    sims = {"warned": _Warned(unseen="prior"), "plain": PersistenceSimulator()}
    result = validate("TASK", stubbed.runs, sims, ["random"], count=2)
    assert result["warnings"] == {"warned": ["recorded with Adam"], "plain": []}


def test_leave_one_out_kinds_go_to_their_own_validation(stubbed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple] = []

    def loo(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert kwargs == {"device": None, "backend": None}
        seen.append(args[:9])  # the tenth: smoothness directions (0 by default, checked below)
        assert args[9:] == (0,)
        return {"loo": {"methods": {}, "truth_seconds": 1.5}}

    monkeypatch.setattr(validation, "validate_loo", loo)
    sims, runs = _simulators(), stubbed.runs

    def progress(items, total):  # type: ignore[no-untyped-def]
        return items

    result = validate("TASK", runs, sims, ["loo"], count=3, seed=4, progress=progress)
    assert seen == [("TASK", runs, sims, ["loo"], 3, 4, None, 20, progress)]
    assert (
        result["timing"] == {"loo": {"truth_seconds": 1.5, "methods": {}}} and stubbed.calls == []
    )
    validate("TASK", runs, sims, ["loo"], max_examples=7, groups=5)
    assert seen[-1][6:8] == (7, 5)


def test_score_kind_without_simulators_reports_the_metrics_only(stubbed) -> None:  # type: ignore[no-untyped-def]
    runs = stubbed.runs
    curricula = make_curricula("random", 3, runs, SEED)
    true = [_true_losses(c, stubbed.initial, stubbed.effects) for c in curricula]
    pred = PersistenceSimulator().fit(runs).simulate_many(curricula, stubbed.initial)
    scores = validation._score_kind(true, {"p": pred})
    assert sorted(scores["p"]) == ["all_steps_mse", "final_step_spearman", "lds"]
    sim = AdditiveSimulator(unseen="prior").fit(runs)  # fitted, not calibrated
    assert sorted(validation._score_kind(true, {"a": pred}, {"a": sim})["a"]) == sorted(scores["p"])


def test_a_pickled_work_unit_leaves_its_live_objects_behind() -> None:
    import pickle

    work = validation.RetrainWork({"ref": "tasks:Stub"}, {"lr": 0.1}, 3)
    work.bind("TASK", "POOL", "TESTS", "MODEL")
    copy = pickle.loads(pickle.dumps(work))
    assert copy._live is None and work._live == ("TASK", "POOL", "TESTS", "MODEL")
    assert (copy.task_ref, copy.config, copy.seed) == (work.task_ref, work.config, 3)


def test_the_optimized_block_reports_the_first_search_against_strictly_worse_randoms(
    stubbed, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The first search's curriculum is the one reported (its actual and its predicted mean
    final loss); a random curriculum counts as beaten only when its loss is strictly higher (a
    tie is not); the search budget (rollouts and seconds) reaches every kind's curricula."""
    runs, initial = stubbed.runs, stubbed.initial
    recorded = [r.curriculum for r in runs.runs]
    asked: list[tuple] = []

    def curricula(kind, count, runs_, seed, searcher, evaluations, seconds):  # type: ignore[no-untyped-def]
        asked.append((kind, count, runs_ is runs, seed, evaluations, seconds))
        return recorded[:count] if kind == "optimized" else recorded[-count:]

    finals = {"optimized": [0.5, 0.125, 0.875, 0.25], "random": [0.5, 0.625, 0.375, 0.75]}

    def retrain(task, pool, tests, config, seed, made, device, backend, wrap):  # type: ignore[no-untyped-def]
        width = len(runs.test_ids)
        return {
            kind: [np.full((len(c) + 1, width), v) for c, v in zip(b, finals[kind], strict=True)]
            for kind, b in made.items()
        }

    monkeypatch.setattr(validation, "make_curricula", curricula)
    monkeypatch.setattr(validation, "_retrain", retrain)
    sims = _simulators()
    result = validate(
        "TASK", runs, sims, ["random", "optimized"], count=4, seed=SEED,
        search_evaluations=7, search_seconds=2.5,
    )  # fmt: skip
    assert asked == [("random", 4, True, SEED, 7, 2.5), ("optimized", 4, True, SEED, 7, 2.5)]
    block = result["optimized"]
    assert block["actual_mean_test_loss"] == 0.5
    assert block["actual_mean_test_losses_per_search"] == finals["optimized"]
    assert block["fraction_of_random_beaten"] == 0.5  # 0.625, 0.75; not the tie, nor 0.375
    predicted = [float(p[-1].mean()) for p in sims["additive"].simulate_many(recorded[:4], initial)]
    assert len(set(predicted)) == 4  # so reading another search's prediction would show
    assert block["predicted_mean_test_loss"] == predicted[0]


def test_subsets_are_scored_on_their_mean_over_seeds(stubbed) -> None:  # type: ignore[no-untyped-def]
    """``subsets``: `count` halves of the pool (from `seed`), each trained `subset_seeds`
    times; the losses and the predictions are averaged over a subset's seeds before scoring.
    The retraining's cost is its wall-clock seconds (within the call's) and trainings."""
    import time

    from simfluence.recording.subsets import mean_over_seeds, subset_curricula

    runs, initial = stubbed.runs, stubbed.initial
    started = time.perf_counter()
    result = validate(
        "TASK", runs, {"a": AdditiveSimulator(unseen="prior")}, ["subsets"], count=3, seed=SEED,
        subset_seeds=2,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    curricula = subset_curricula(runs, 3, 2, SEED)
    assert result["kinds"]["subsets"]["curricula"] == 6
    true = mean_over_seeds([_true_losses(c, initial, stubbed.effects) for c in curricula], 2)
    sim = AdditiveSimulator(unseen="prior").fit(runs).calibrate(runs)
    pred = mean_over_seeds(sim.simulate_many(curricula, initial), 2)
    expected = validation._score_kind(true, {"a": pred}, {"a": sim}, "subsets")["a"]
    got = result["kinds"]["subsets"]["methods"]["a"]
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
    retrain = result["timing"]["retrain"]
    assert retrain["trainings"] == 6 and 0.0 <= retrain["seconds"] <= elapsed
    one_seed = validate("TASK", runs, {"p": PersistenceSimulator()}, ["subsets"], count=2)
    assert one_seed["kinds"]["subsets"]["curricula"] == 2  # one seed per subset by default


def test_leave_one_out_kinds_get_the_device_and_backend(stubbed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The leave-one-out validation retrains on the `device` and `backend` asked for."""
    seen: list[dict] = []

    def loo(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs)
        return {"loo": {"methods": {}, "truth_seconds": 0.5}}

    monkeypatch.setattr(validation, "validate_loo", loo)
    validate("TASK", stubbed.runs, _simulators(), ["loo"], device="cpu", backend="serial")
    assert seen == [{"device": "cpu", "backend": "serial"}]


def test_a_simulator_that_cannot_be_calibrated_is_still_scored(stubbed) -> None:  # type: ignore[no-untyped-def]
    """One recorded run: calibration fails (it needs two), the method is scored without
    intervals."""
    one = stubbed.runs.subset(stubbed.runs.run_ids[:1])
    sims = {"a": AdditiveSimulator(unseen="prior", l2=1.0)}
    result = validate("TASK", one, sims, ["random"], count=2)
    assert not sims["a"].is_calibrated
    assert sorted(result["kinds"]["random"]["methods"]["a"]) == [
        "all_steps_mse", "final_step_spearman", "lds",
    ]  # fmt: skip


def test_retraining_clips_gradients_as_recorded_and_keeps_the_workers_threads(
    monkeypatch,
) -> None:  # type: ignore[no-untyped-def]
    """The recorded ``max_grad_norm`` goes to every retraining; a worker backend without a
    thread count leaves the worker's torch threads as they are."""
    threads: list[int] = []
    norms: list[float | None] = []

    def train(task, initial, pool, tests, curriculum, lr, seed, **options):  # type: ignore[no-untyped-def]
        norms.append(options["max_grad_norm"])
        return SimpleNamespace(losses=np.zeros((len(curriculum) + 1, 1)))

    monkeypatch.setattr(validation, "worker_task_reference", lambda *a: {"ref": "tasks:Stub"})
    monkeypatch.setattr(
        validation,
        "prepared_in_worker",
        lambda *a: SimpleNamespace(task="T", pool="P", tests="T", initial="M"),
    )
    monkeypatch.setattr(validation, "train_on_curriculum", train)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    remote = _Remote()
    remote.threads = None  # type: ignore[assignment]
    config = {"seed": 5, "lr": 0.1, "max_grad_norm": 1.5}
    curricula = {"random": [[["a"]], [["b"]]]}
    validation._retrain("TASK", "P", "T", config, 7, curricula, "cpu", remote, lambda i, t: i)
    assert norms == [1.5, 1.5] and threads == []


def test_guided_units_shrink_cover_every_retrain_and_never_span_two_jobs() -> None:
    from simfluence.recording.loo import guided_units

    runs, _ = generate(SynthConfig(pool=12, tests=3, runs=3, per_run=8, batch=2, epochs=1))
    jobs = [(run, "renormalize", [[f"g{j}-{k}"] for k in range(n)]) for j, (run, n) in
            enumerate(zip(runs.runs, [40, 3, 25], strict=True))]  # fmt: skip
    items, owner = guided_units(jobs, parallelism=2)
    sizes = [len(item[3]) for item in items]
    assert sum(sizes) == 41 + 4 + 26 and min(sizes) >= 1
    assert sizes[0] == 18  # ceil(71 / (2 * 2)) retrains left, at most, per unit
    assert sizes[-1] == 1 and max(sizes[-3:]) <= 2  # small units last
    for j, (run, _, groups) in enumerate(jobs):
        mine = [items[k] for k in range(len(items)) if owner[k] == j]
        assert all(item[0] is run.curriculum and item[1] == run.seed for item in mine)
        assert [g for item in mine for g in item[3]] == [None, *groups]  # in order, full first
