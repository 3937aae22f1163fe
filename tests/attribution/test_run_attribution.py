"""Attribution for a recorded run: replay, metagradients (`unrolled`), DVEmb, both removal
definitions, leave-one-out validation against retraining, and `attribute --method`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from conftest import require_module  # noqa: E402

from simfluence.attribution.replay import ReplayError, load_recorded_run  # noqa: E402
from simfluence.attribution.unrolled import (  # noqa: E402
    UnrolledSimulator,
    run_metagradients,
    unrolled_metagradients,
)
from simfluence.cli.main import main  # noqa: E402
from simfluence.counterfactual.attribution import removal_effects  # noqa: E402
from simfluence.curricula import remove  # noqa: E402
from simfluence.errors import SimfluenceError  # noqa: E402
from simfluence.recording.loo import validate_loo  # noqa: E402
from simfluence.recording.loop import final_test_losses, train_on_curriculum  # noqa: E402
from simfluence.recording.protocol import RecordingProtocol  # noqa: E402
from simfluence.recording.record import record_runs  # noqa: E402
from simfluence.recording.workloads import get_workload  # noqa: E402
from simfluence.recording.workloads.digits_mlp import DigitsMLPTask  # noqa: E402
from simfluence.runlog import load_runset  # noqa: E402
from simfluence.runlog.layout import checkpoint_path  # noqa: E402
from simfluence.simulators import LinearSimulator, configure_simulator  # noqa: E402

TINY = dict(runs=6, pool=40, per_run=16, tests=8, batch=4, epochs=2, lr=0.1, seed=0)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("digits-run") / "runs"
    protocol = RecordingProtocol(checkpoints=[0, 4, 8], **TINY)
    record_runs(get_workload("digits-mlp"), directory, protocol, progress=False)
    return directory


def _retrain(rec, weights=None, curriculum=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    return final_test_losses(
        rec.task,
        rec.model,
        rec.pool,
        rec.tests,
        curriculum or rec.run.curriculum,
        rec.lrs[0],
        rec.run.seed,
        weights=weights,
    )


# -- the runner's per-example weights -----------------------------------------------------------
def test_unit_weights_are_bit_identical_and_zero_weight_differs_from_removal(
    recorded: Path,
) -> None:
    runs = load_runset(recorded)
    rec = load_recorded_run(runs, "run-0005")
    ones = [[1.0] * len(b) for b in rec.run.curriculum]
    assert np.array_equal(_retrain(rec), rec.run.losses[-1])
    assert np.array_equal(_retrain(rec, ones), rec.run.losses[-1])
    first = rec.run.curriculum[0][0]
    zero = [[0.0 if i == first else 1.0 for i in b] for b in rec.run.curriculum]
    weight0 = _retrain(rec, zero)
    dropped = _retrain(rec, curriculum=remove(rec.run.curriculum, [first]))
    assert not np.allclose(weight0, rec.run.losses[-1])
    assert not np.allclose(weight0, dropped)  # the two definitions of "remove" differ
    full = train_on_curriculum(
        rec.task,
        rec.model,
        rec.pool,
        rec.tests,
        rec.run.curriculum,
        0.1,
        rec.run.seed,
        weights=zero,
    )
    assert np.array_equal(full.losses[-1], weight0)
    with pytest.raises(SimfluenceError, match="step 1: 3 weights for a batch of 4"):
        _retrain(rec, [[1.0, 1.0, 1.0], *ones[1:]])


# -- replay and metagradients ----------------------------------------------------------------
def test_replay_is_checked_against_the_recording(recorded: Path, tmp_path: Path) -> None:
    runs = load_runset(recorded)
    mg = run_metagradients(runs, "run-0002")
    assert mg.replay_error == 0.0  # bit for bit on the machine that recorded it
    assert mg.grads.shape == (8, 8 * 4) and np.isfinite(mg.grads).all()
    tampered = tmp_path / "runs"
    shutil.copytree(recorded, tampered)
    path = checkpoint_path(tampered, "run-0002", 4)
    state = torch.load(path, weights_only=True)
    state["out.bias"] = state["out.bias"] + 1e-3
    torch.save(state, path)
    with pytest.raises(ReplayError, match=r"'out\.bias' after step 4"):
        run_metagradients(load_runset(tampered), "run-0002")


def test_metagradients_match_finite_differences_of_retraining(recorded: Path) -> None:
    runs = load_runset(recorded)
    rec = load_recorded_run(runs, "run-0001")
    mg = run_metagradients(runs, "run-0001")
    ones = [[1.0] * len(b) for b in rec.run.curriculum]
    eps = 1e-4
    for step, slot in [(1, 0), (3, 2), (8, 3)]:  # first step, middle, last
        column = 4 * (step - 1) + slot
        plus = [list(b) for b in ones]
        minus = [list(b) for b in ones]
        plus[step - 1][slot] += eps
        minus[step - 1][slot] -= eps
        numeric = (_retrain(rec, plus) - _retrain(rec, minus)) / (2 * eps)
        np.testing.assert_allclose(mg.grads[:, column], numeric, rtol=1e-5, atol=1e-9)
    # a renormalized group removal is the weight change k/(b-k) on the batch mates
    # two from one batch (k = 2), one from another batch (k = 1)
    group = [rec.run.curriculum[2][0], rec.run.curriculum[2][3], rec.run.curriculum[5][1]]
    s = 1e-4
    direction = []
    for batch in rec.run.curriculum:
        k = sum(i in group for i in batch)
        direction.append([-1.0 if i in group else k / (len(batch) - k) for i in batch])
    moved = [[1.0 + s * d for d in row] for row in direction]
    numeric = (_retrain(rec) - _retrain(rec, moved)) / -s  # effect per unit of removal
    predicted = mg.removal_effects([group], "renormalize")[:, 0]
    np.testing.assert_allclose(predicted, -numeric, rtol=1e-3, atol=1e-8)


def test_segments_give_the_same_metagradients(recorded: Path) -> None:
    runs = load_runset(recorded)
    rec = load_recorded_run(runs, "run-0003")
    args = (rec.task, rec.model, rec.checkpoint, rec.pool, rec.tests, rec.run.curriculum, rec.lrs)
    whole = unrolled_metagradients(*args)
    for segment in (1, 3):
        parts = unrolled_metagradients(*args, segment=segment, test_chunk=3)
        np.testing.assert_allclose(parts.grads, whole.grads, rtol=1e-10, atol=1e-14)


class RMSpropDigits(DigitsMLPTask):
    def make_optimizer(self, model, lr):  # type: ignore[no-untyped-def]
        return torch.optim.RMSprop(model.parameters(), lr=lr)


def test_another_optimizer_is_refused_by_name(recorded: Path) -> None:
    runs = load_runset(recorded)
    rec = load_recorded_run(runs, "run-0000")
    with pytest.raises(ReplayError, match="trains with RMSprop"):
        unrolled_metagradients(
            RMSpropDigits(),
            rec.model,
            rec.checkpoint,
            rec.pool,
            rec.tests,
            rec.run.curriculum,
            rec.lrs,
        )


def test_first_order_effects_rank_actual_leave_one_out(recorded: Path) -> None:
    from scipy import stats

    runs = load_runset(recorded)
    rec = load_recorded_run(runs, "run-0004")
    mg = run_metagradients(runs, "run-0004")
    ids, predicted = mg.effects("zero-weight")
    full = _retrain(rec)
    actual = np.stack(
        [
            full - _retrain(rec, [[0.0 if j == i else 1.0 for j in b] for b in rec.run.curriculum])
            for i in ids
        ],
        axis=1,
    )
    rho = np.mean([stats.spearmanr(a, p).statistic for a, p in zip(actual, predicted, strict=True)])
    assert rho > 0.9


# -- simulators under both removals ----------------------------------------------------------
def test_simulated_zero_weight_removal_makes_the_consumptions_neutral(recorded: Path) -> None:
    runs = load_runset(recorded)
    sim = LinearSimulator(l2=1.0).fit(runs)
    run = runs.runs[0]
    target = run.curriculum[1][2]
    columns = np.arange(len(runs.test_ids))
    effect = removal_effects(
        sim, run.curriculum, run.initial_loss, columns, [[target]], "zero-weight"
    )
    neutral = LinearSimulator(l2=1.0).fit(runs)
    k = runs.train_ids.index(target)
    neutral.A_ = sim.A_.copy()
    neutral.B_ = sim.B_.copy()
    neutral.A_[:, k] = 1.0 / sim.batch_size_
    neutral.B_[:, k] = 0.0
    with_it = sim.simulate(run.curriculum, run.initial_loss)[-1]
    without = neutral.simulate(run.curriculum, run.initial_loss)[-1]
    np.testing.assert_allclose(effect[0], with_it - without, atol=1e-12)
    renorm = removal_effects(sim, run.curriculum, run.initial_loss, columns, [[target]])
    dropped = sim.simulate(remove(run.curriculum, [target]), run.initial_loss)[-1]
    np.testing.assert_allclose(renorm[0], with_it - dropped, atol=1e-12)
    with pytest.raises(SimfluenceError, match="zero-weight removal needs"):
        removal_effects(
            configure_simulator("mean").fit(runs),
            run.curriculum,
            run.initial_loss,
            columns,
            [[target]],
            "zero-weight",
        )


def test_unrolled_simulator_averages_consumption_effects(recorded: Path) -> None:
    runs = load_runset(recorded)
    index = runs.train_index
    total = np.zeros((len(runs.test_ids), len(runs.train_ids)))
    count = np.zeros(len(runs.train_ids))
    probed_total, probed_count = total.copy(), count.copy()
    for run in runs.runs[:2]:
        mg = run_metagradients(runs, run.run_id, probe_unconsumed=True)
        per = np.zeros_like(total)
        times = np.zeros(len(runs.train_ids))
        for c, train_id in enumerate(mg.train_ids):
            per[:, index[train_id]] += mg.grads[:, c]
            times[index[train_id]] += 1
        consumed = times > 0
        total[:, consumed] += per[:, consumed] / times[consumed]
        count[consumed] += 1
        for c, train_id in enumerate(mg.probe_ids):
            per[:, index[train_id]] += mg.probe_grads[:, c]
            times[index[train_id]] += 1
        assert (times > 0).all()  # every example: consumed or probed
        probed_total += per / times
        probed_count += 1
    plain = UnrolledSimulator(max_runs=2, probe_unconsumed=False).fit(runs)
    seen = count > 0
    np.testing.assert_allclose(plain.B_[:, seen], total[:, seen] / count[seen])
    assert (plain.B_[:, ~seen] == 0).all() and (plain.seen_ == seen).all()
    assert not seen.all()  # two runs of 16 of 40 examples: some never consumed
    sim = UnrolledSimulator(max_runs=2).fit(runs)
    np.testing.assert_allclose(sim.B_, probed_total / probed_count)
    assert sim.seen_.all()


def test_probes_leave_the_run_as_it_was(recorded: Path) -> None:
    """Zero-weight probes change neither the replay nor the consumptions' metagradients, to
    the last bit; the simulator's this-run answers reuse the probed metagradients."""
    runs = load_runset(recorded)
    plain = run_metagradients(runs, "run-0002")
    probed = run_metagradients(runs, "run-0002", probe_unconsumed=True)
    assert np.array_equal(plain.grads, probed.grads)
    assert np.array_equal(plain.final_loss, probed.final_loss)
    assert probed.replay_error == plain.replay_error == 0.0
    assert plain.probe_ids == [] and len(probed.probe_ids) == 24 * 2  # 24 absent, 2 spans
    assert not set(probed.probe_ids) & set(probed.train_ids)
    one_step = run_metagradients(runs, "run-0002", probe_unconsumed=True, segment=1)
    np.testing.assert_allclose(one_step.probe_grads, probed.probe_grads, rtol=1e-9, atol=1e-14)
    sim = UnrolledSimulator(max_runs=3).fit(runs)
    assert sim.metagradients(runs, "run-0002").probe_ids == probed.probe_ids


def test_a_probe_is_the_derivative_of_adding_its_example(recorded: Path) -> None:
    """A probe's metagradient is ``d L_T / d w`` of its example added to its batch at weight
    ``w`` over the real batch size: central differences of actual training (the batch's real
    examples weighted ``(n + 1) / n``, the added one ``w (n + 1) / n``, so the trainer's mean
    over ``n + 1`` is the probe's loss)."""
    runs = load_runset(recorded)
    rec = load_recorded_run(runs, "run-0003")
    mg = run_metagradients(runs, "run-0003", probe_unconsumed=True)
    for c in (0, len(mg.probe_ids) - 1):  # the first and the last probe
        step, example = int(mg.probe_steps[c]), mg.probe_ids[c]
        batches = [list(b) for b in rec.run.curriculum]
        n = len(batches[step - 1])
        batches[step - 1].append(example)

        def final(w: float, batches=batches, step=step, n=n) -> np.ndarray:  # type: ignore[no-untyped-def]
            weights = [[1.0] * len(b) for b in batches]
            weights[step - 1] = [(n + 1) / n] * n + [w * (n + 1) / n]
            return _retrain(rec, weights, batches)

        eps = 1e-4
        numeric = (final(eps) - final(-eps)) / (2 * eps)
        np.testing.assert_allclose(mg.probe_grads[:, c], numeric, rtol=1e-5, atol=1e-9)


# -- DVEmb through dattri ----------------------------------------------------------------------
def test_dvemb_matches_grad_dot_and_unrolled_on_a_one_step_run(tmp_path: Path) -> None:
    # CI installs the [dattri] extra (make setup): there a missing dattri fails the test
    require_module("dattri", 'pip install -e ".[dattri]"')
    from simfluence.attribution.dvemb import run_dvemb
    from simfluence.attribution.tracin import grad_dot_scores

    directory = tmp_path / "one-step"
    options = {**TINY, "per_run": 4, "epochs": 1, "runs": 2, "lr": 1e-6}
    protocol = RecordingProtocol(checkpoints=[0, 1], **options)
    record_runs(get_workload("digits-mlp"), directory, protocol, progress=False)
    runs = load_runset(directory)
    result = run_dvemb(runs, "run-0000")
    rec = load_recorded_run(runs, "run-0000")
    rows = [rec.pool.ids.index(i) for i in result.train_ids]
    grad_dot = grad_dot_scores(
        rec.task, rec.model, rec.checkpoint, 1e-6, rec.pool.subset(rows), rec.tests, 4
    )
    # sign and scale: effect = -(lr / b) g_z . g_i, negative = helpful
    np.testing.assert_allclose(result.effects, grad_dot, rtol=1e-4, atol=1e-16)
    ids, unrolled = run_metagradients(runs, "run-0000").effects("zero-weight")
    assert ids == result.train_ids
    np.testing.assert_allclose(result.effects, unrolled, rtol=1e-9, atol=1e-18)


# -- validation against actual leave-one-out -------------------------------------------------
def test_validate_loo_contract_and_unrolled_wins(recorded: Path) -> None:
    runs = load_runset(recorded)
    simulators = {
        "linear": LinearSimulator(unseen="prior"),
        "unrolled": UnrolledSimulator(unseen="prior"),
    }
    result = validate_loo(
        get_workload("digits-mlp"), runs, simulators, ["loo", "loo-weight0"], 1, 0, 10, 6
    )
    for kind, removal in (("loo", "renormalize"), ("loo-weight0", "zero-weight")):
        block = result[kind]
        assert block["removal"] == removal and block["runs"] == ["run-0005"]
        assert block["examples"] == 10 and block["retrains"] == 10 + 6 + 1
        for scores in block["methods"].values():
            assert set(scores) >= {
                "loo_spearman",
                "loo_pearson",
                "top10_sign_agreement",
                "lds",
                "effect_size_ratio",
            }
        assert block["methods"]["unrolled"]["loo_spearman"] > 0.9
        assert (
            block["methods"]["unrolled"]["loo_spearman"]
            > block["methods"]["linear"]["loo_spearman"]
        )
    with pytest.raises(SimfluenceError, match="--curricula 6"):
        validate_loo(get_workload("digits-mlp"), runs, simulators, ["loo"], 6)


def test_validate_loo_smoothness_is_the_direct_measurement(recorded: Path) -> None:
    """The smoothness retrains go through the backend with the removals: same numbers as
    `run_smoothness` retraining one direction after another here."""
    from simfluence.attribution.smoothness import run_smoothness
    from simfluence.recording.tasks import prepare_for_runset

    runs, task = load_runset(recorded), get_workload("digits-mlp")
    sims = {"unrolled": UnrolledSimulator(unseen="prior")}
    result = validate_loo(task, runs, sims, ["loo"], 1, 5, 3, 2, smoothness_directions=2)
    ((run_id, got),) = result["loo"]["smoothness"].items()
    pool, tests = prepare_for_runset(task, runs)
    config = runs.metadata["config"]
    direct = run_smoothness(
        task, task.make_model(config["seed"]), pool, tests, runs.run(run_id), config, 2, seed=5,
        metagradients=sims["unrolled"].metagradients(runs, run_id).grads,
    )  # fmt: skip
    expected = direct.to_json()
    assert got.keys() == expected.keys()
    for key in ("nonlinearity", "first_order_error", "change"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, atol=1e-15)


# -- the command line --------------------------------------------------------------------------
def test_attribute_defaults_to_the_run_itself(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = load_runset(recorded)
    test_id = runs.test_ids[0]
    out = tmp_path / "a.json"
    main(
        [
            "attribute",
            "--test",
            test_id,
            "--runs",
            str(recorded),
            "--run",
            "run-0001",
            "--json",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    assert payload["method"] == "unrolled" and payload["leave_one_out"]["removal"] == "renormalize"
    mg = run_metagradients(runs, "run-0001")
    ids, effects = mg.effects("renormalize")
    got = {e["train_id"]: e["effect"] for e in payload["leave_one_out"]["effects"]}
    assert got == pytest.approx(dict(zip(ids, effects[0], strict=True)))
    assert "method: unrolled" in capsys.readouterr().out
    model = tmp_path / "linear.npz"
    main(["fit", str(recorded), "--method", "linear", "--l2", "1", "-o", str(model)])
    main(
        [
            "attribute",
            str(model),
            "--test",
            test_id,
            "--runs",
            str(recorded),
            "--run",
            "run-0001",
            "--method",
            "simulator",
            "--removal",
            "zero-weight",
            "--json",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    assert payload["method"] == "linear" and payload["leave_one_out"]["removal"] == "zero-weight"
    for bad, message in [
        (["--method", "dvemb"], "zero-weight removal only"),
        (["--method", "combined"], "needs MODEL"),
    ]:
        code = main(
            ["attribute", "--test", test_id, "--runs", str(recorded), "--run", "run-0001", *bad]
        )
        assert code == 2
        assert message in capsys.readouterr().err


def test_combined_is_unrolled_for_single_examples(recorded: Path) -> None:
    import inspect

    from simfluence.attribution.combined import CombinedSimulator

    linear_params = set(inspect.signature(LinearSimulator.__init__).parameters)
    assert linear_params <= set(inspect.signature(CombinedSimulator.__init__).parameters)
    runs = load_runset(recorded)
    train, held = runs.split(1)
    combined = CombinedSimulator(l2=1.0, unseen="prior").fit(train)
    run_id = held.run_ids[0]
    first = held.runs[0].curriculum[0]
    groups = [[first[0]], [first[1]], [first[0], first[1]]]
    got = combined.run_removal_effects(runs, run_id, groups, "zero-weight")
    unrolled = run_metagradients(runs, run_id).removal_effects(groups, "zero-weight")
    np.testing.assert_allclose(got[:, :2], unrolled[:, :2], atol=1e-12)
    assert not np.allclose(got[:, 2], unrolled[:, 2])  # the simulator's interaction is added


# -- a user's own task, found through the run set's manifest -----------------------------------
EXACT = dict(runs=3, pool=10, per_run=8, tests=4, batch=4, epochs=2, lr=0.3, seed=0)


@pytest.fixture(scope="module")
def user_task_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs of `LinearLossTask` (tests/exact_tasks.py, not a built-in workload)."""
    from exact_tasks import LinearLossTask

    directory = tmp_path_factory.mktemp("user-task") / "runs"
    task_file = Path(__file__).parents[1] / "exact_tasks.py"
    record_runs(
        LinearLossTask(),
        directory,
        RecordingProtocol(checkpoints=[0], **EXACT),
        progress=False,
        task_ref=f"{task_file}:LinearLossTask",
    )
    return directory


def test_unrolled_on_a_user_task_is_exact(user_task_runs: Path) -> None:
    """For ``loss = theta . x_z + c_z`` under SGD on the (weighted) batch mean, the final loss
    is linear in every consumption weight: ``d L_T(z) / d w_c = -(lr / b) x_i . x_z`` for the
    consumption ``c`` of ``i``, and first-order removal effects equal actual retraining under
    both removal definitions. The task is rebuilt from the manifest's reference."""
    from exact_tasks import LinearLossTask, features

    from simfluence.recording.loo import actual_removal_effects

    runs = load_runset(user_task_runs)
    run = runs.runs[0]
    mg = UnrolledSimulator().metagradients(runs, run.run_id)
    task = LinearLossTask()
    pool, tests = task.prepare(EXACT["pool"], EXACT["tests"], EXACT["seed"])
    x_pool, x_test = features(pool), features(tests)
    row = {i: k for k, i in enumerate(pool.ids)}
    expected = -(EXACT["lr"] / EXACT["batch"]) * x_test @ x_pool[[row[i] for i in mg.train_ids]].T
    np.testing.assert_allclose(mg.grads, expected, rtol=1e-10, atol=1e-12)
    ids = mg.distinct_ids()
    groups = [[i] for i in ids] + [ids[:3]]
    for removal in ("zero-weight", "renormalize"):
        _, actual = actual_removal_effects(
            task, task.make_model(EXACT["seed"]), pool, tests, run, EXACT["lr"], groups, removal
        )
        np.testing.assert_allclose(
            mg.removal_effects(groups, removal), actual, rtol=1e-9, atol=1e-12
        )


def test_validate_loo_on_a_user_task(user_task_runs: Path, tmp_path: Path) -> None:
    """The command line finds the user's task in the manifest; wall-clock seconds go under
    ``"timing"``, the last key, and the leave-one-out blocks hold none."""
    out = tmp_path / "loo.json"
    args = ["validate", str(user_task_runs), "--kinds", "loo,loo-weight0", "--curricula", "1"]
    assert main([*args, "--methods", "unrolled,linear", "--groups", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result)[-1] == "timing"
    for kind in ("loo", "loo-weight0"):
        block = result["kinds"][kind]
        assert "truth_seconds" not in block
        unrolled = block["methods"]["unrolled"]
        assert "seconds" not in unrolled and "fit_seconds" not in unrolled
        assert unrolled["loo_pearson"] == pytest.approx(1.0)
        assert unrolled["effect_size_ratio"] == pytest.approx(1.0)
        assert set(result["timing"][kind]["methods"]) == {"unrolled", "linear"}


def test_validate_refuses_one_curriculum_for_curriculum_kinds_before_retraining(
    user_task_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exact_tasks import LinearLossTask

    import simfluence.recording.validation as validation

    def no_retraining(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("leave-one-out retraining started")

    monkeypatch.setattr(validation, "validate_loo", no_retraining)
    runs = load_runset(user_task_runs)
    with pytest.raises(SimfluenceError, match="at least 2"):
        validation.validate(
            LinearLossTask(), runs, {"linear": LinearSimulator()}, ["loo", "random"], 1
        )


def _exact_effects(test_ids, train_ids) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``-(lr / b) x_z . x_i`` of `LinearLossTask`: every consumption's exact effect."""
    from exact_tasks import LinearLossTask, features

    pool, tests = LinearLossTask().prepare(EXACT["pool"], EXACT["tests"], EXACT["seed"])
    x_pool = features(pool)[[pool.ids.index(i) for i in train_ids]]
    x_test = features(tests)[[tests.ids.index(t) for t in test_ids]]
    return -(EXACT["lr"] / EXACT["batch"]) * x_test @ x_pool.T


def test_unrolled_as_a_simulator_counts_its_runs_and_fits_its_scale(user_task_runs: Path) -> None:
    """B of the ids the first run consumed is their exact effect per consumption (the others
    are unseen, 0), A is None (additive); ``scaled=True`` multiplies B by the least-squares
    slope of every run's observed change on the rollout's change (below 1 here: the unseen
    ids' effects are missing from the other runs' rollouts); max_runs None or 0 uses every
    run. Without probes (`probe_unconsumed=False`), as here, for exact expectations."""
    from simfluence.simulators.dynamics import rollout
    from simfluence.simulators.encoding import encode_runs

    runs = load_runset(user_task_runs)
    raw = UnrolledSimulator(max_runs=1, probe_unconsumed=False).fit(runs)
    assert raw.runs_used_ == 1 and raw.A_ is None and raw.scale_ == 1.0
    seen = sorted({i for b in runs.runs[0].curriculum for i in b})
    columns = [runs.train_ids.index(i) for i in seen]
    np.testing.assert_allclose(
        raw.B_[:, columns], _exact_effects(runs.test_ids, seen), rtol=1e-10, atol=1e-14
    )
    assert len(seen) < len(runs.train_ids) and np.all(np.delete(raw.B_, columns, 1) == 0)

    scaled = UnrolledSimulator(max_runs=1, scaled=True, probe_unconsumed=False).fit(runs)
    zeros = np.zeros((len(runs.runs), len(runs.test_ids)))
    change = rollout(encode_runs(runs, raw.batch_size_, "mean"), None, raw.B_, zeros)
    observed = [r.losses - r.losses[0] for r in runs.runs]
    slope = sum(float((c * o).sum()) for c, o in zip(change, observed, strict=True)) / sum(
        float((c * c).sum()) for c in change
    )
    assert 0.0 < slope < 0.999
    assert scaled.runs_used_ == 1 and scaled.A_ is None
    assert scaled.scale_ == pytest.approx(slope, rel=1e-9)
    np.testing.assert_allclose(scaled.B_, raw.B_ * slope, rtol=1e-12)

    every = UnrolledSimulator(max_runs=None).fit(runs)
    unlimited = UnrolledSimulator(max_runs=0).fit(runs)
    assert every.runs_used_ == unlimited.runs_used_ == EXACT["runs"]
    np.testing.assert_array_equal(unlimited.B_, every.B_)


def test_run_answers_for_some_test_examples_are_those_rows(user_task_runs: Path) -> None:
    """Metagradients asked for some test examples (in the order asked) are those examples'
    rows, whether or not the whole answer was computed before."""
    runs = load_runset(user_task_runs)
    sim = UnrolledSimulator()
    wanted = [runs.test_ids[2], runs.test_ids[0]]
    some = sim.metagradients(runs, "run-0001", test_ids=wanted)
    full = sim.metagradients(runs, "run-0001")
    again = sim.metagradients(runs, "run-0001", test_ids=wanted)
    assert some.test_ids == again.test_ids == wanted and full.test_ids == runs.test_ids
    exact = _exact_effects(runs.test_ids, full.train_ids)
    np.testing.assert_allclose(full.grads, exact, rtol=1e-10, atol=1e-14)
    for answer in (some, again):
        np.testing.assert_allclose(answer.grads, exact[[2, 0]], rtol=1e-10, atol=1e-14)


def test_run_answer_cache_is_bounded_and_keyed_on_the_task(
    user_task_runs: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The run-answer cache holds at most `RUN_CACHE_SIZE` answers, dropping the oldest; an
    answer computed with the manifest's task is not served to a simulator told to use another
    task of that name (which replays the run itself, and finds it is not that task's run)."""
    import simfluence.attribution.run_effects as gradient_simulators
    from simfluence.attribution.replay import ReplayError

    runs = load_runset(user_task_runs)
    monkeypatch.setattr(gradient_simulators, "_RUN_ANSWERS", {})
    monkeypatch.setattr(gradient_simulators, "RUN_CACHE_SIZE", 1)
    sim = UnrolledSimulator()
    for run in runs.runs[:2]:
        mg = sim.metagradients(runs, run.run_id)
        exact = _exact_effects(runs.test_ids, mg.train_ids)
        np.testing.assert_allclose(mg.grads, exact, rtol=1e-10, atol=1e-14)
    assert [key[1] for key in gradient_simulators._RUN_ANSWERS] == [runs.runs[1].run_id]
    (tmp_path / "twice.py").write_text(
        "from exact_tasks import LinearLossTask\n\n\n"
        "class TwiceTheLoss(LinearLossTask):\n"
        "    def example_losses(self, model, inputs):\n"
        "        return 2 * super().example_losses(model, inputs)\n"
    )
    other = UnrolledSimulator(task=f"{tmp_path / 'twice.py'}:TwiceTheLoss")
    with pytest.raises(ReplayError):
        other.metagradients(runs, runs.runs[1].run_id)
