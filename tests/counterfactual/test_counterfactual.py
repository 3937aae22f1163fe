"""Counterfactual edits, attribution views (against brute force), curriculum search, and the
attribute / optimize / simulate-with-edits commands."""

from __future__ import annotations

import json
import re
from itertools import combinations, pairwise
from pathlib import Path

import numpy as np
import pytest

from simfluence.cli.main import main
from simfluence.counterfactual import (
    final_objective,
    leave_one_out,
    optimize_curriculum,
    pair_interactions,
    step_contributions,
)
from simfluence.counterfactual.attribution import SIMULATED_CHANGE
from simfluence.counterfactual.search.evaluator import _Evaluator
from simfluence.counterfactual.search.starts import _random_layouts
from simfluence.curricula import (
    add,
    apply_edits,
    remove,
    reorder,
    repeat,
    sort_by,
    truncate,
)
from simfluence.errors import CurriculumError, SimfluenceError
from simfluence.runlog import save_runset
from simfluence.simulators import AdditiveSimulator, LinearSimulator
from simfluence.synth import SynthConfig, generate

CURRICULUM = [["a", "b"], ["c", "a"], ["d"]]


def _flat(curriculum: list[list[str]]) -> list[str]:
    return [i for batch in curriculum for i in batch]


# -- edits ------------------------------------------------------------------------------------
def test_remove_drops_every_occurrence_and_empty_batches() -> None:
    assert remove(CURRICULUM, ["a"]) == [["b"], ["c"], ["d"]]
    assert remove(CURRICULUM, "d") == [["a", "b"], ["c", "a"]]
    assert CURRICULUM == [["a", "b"], ["c", "a"], ["d"]]  # pure
    with pytest.raises(CurriculumError, match=r"'z'.*never occur"):
        remove(CURRICULUM, ["z"])
    with pytest.raises(CurriculumError, match="empty curriculum"):
        remove(CURRICULUM, ["a", "b", "c", "d"])
    with pytest.raises(CurriculumError, match="no training ids"):
        remove(CURRICULUM, [])


def test_add_inserts_new_batches() -> None:
    assert add(CURRICULUM, ["x", "y", "z"], 2) == [*CURRICULUM, ["x", "y"], ["z"]]
    assert add(CURRICULUM, ["x"], 2, position=1) == [["a", "b"], ["x"], ["c", "a"], ["d"]]
    assert add(CURRICULUM, ["x"], 2, position="start")[0] == ["x"]
    with pytest.raises(CurriculumError, match="position"):
        add(CURRICULUM, ["x"], 2, position=4)
    with pytest.raises(CurriculumError, match="unknown training id 'x'"):
        add(CURRICULUM, ["x"], 2, pool={"a", "b"})


def test_repeat_reorder_sort_truncate() -> None:
    assert repeat(CURRICULUM, ["a"], 2) == [["a", "a", "b"], ["c", "a", "a"], ["d"]]
    with pytest.raises(CurriculumError, match="never occur"):
        repeat(CURRICULUM, ["q"], 2)
    with pytest.raises(CurriculumError, match="at least 1"):
        repeat(CURRICULUM, ["a"], 0)
    shuffled = reorder(CURRICULUM, 3)
    assert [len(b) for b in shuffled] == [2, 2, 1]
    assert sorted(_flat(shuffled)) == sorted(_flat(CURRICULUM))
    assert reorder(CURRICULUM, np.random.default_rng(3)) == shuffled
    scores = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.0}
    assert sort_by(CURRICULUM, scores) == [["d", "b"], ["c", "a"], ["a"]]
    assert sort_by(CURRICULUM, scores, descending=True) == [["a", "a"], ["c", "b"], ["d"]]
    with pytest.raises(CurriculumError, match="no score for training id 'd'"):
        sort_by(CURRICULUM, {"a": 1, "b": 1, "c": 1})
    assert truncate(CURRICULUM, 2) == CURRICULUM[:2]
    with pytest.raises(CurriculumError, match="between 1 and"):
        truncate(CURRICULUM, 4)
    with pytest.raises(CurriculumError, match="non-empty"):
        truncate([], 1)


def test_apply_edits_in_order() -> None:
    spec = [
        {"op": "remove", "ids": ["d"]},
        {"op": "repeat", "ids": ["b"], "times": 3},
        {"op": "add", "ids": ["e"], "batch_size": 1, "position": 0},
        {"op": "truncate", "steps": 2},
    ]
    assert apply_edits(CURRICULUM, spec) == [["e"], ["a", "b", "b", "b"]]
    with pytest.raises(CurriculumError, match="operation #1"):
        apply_edits(CURRICULUM, [{"op": "explode"}])
    with pytest.raises(CurriculumError, match="operation #1 \\(truncate\\)"):
        apply_edits(CURRICULUM, [{"op": "truncate"}])


# -- attribution against brute force ----------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic() -> tuple:
    config = SynthConfig(pool=40, tests=6, runs=8, per_run=24, batch=4, epochs=2, seed=3)
    runs, _ = generate(config)
    return runs, LinearSimulator(l2=1.0).fit(runs), AdditiveSimulator(l2=1.0).fit(runs)


def _brute_final(sim, curriculum, initial, cols) -> float:
    if not curriculum:
        return float(initial[cols].mean())
    return float(sim.simulate(curriculum, initial)[-1, cols].mean())


@pytest.mark.parametrize("which", [1, 2])
def test_leave_one_out_equals_brute_force(synthetic: tuple, which: int) -> None:
    runs, *sims = synthetic
    sim = sims[which - 1]
    run = runs.runs[0]
    tests = ["test-1", "test-4"]
    cols = np.array([1, 4])
    loo = leave_one_out(sim, run.curriculum, run.initial_loss, tests)
    full = _brute_final(sim, run.curriculum, run.initial_loss, cols)
    assert loo.final_loss == pytest.approx(full, abs=1e-10)
    assert np.all(np.diff(loo.effects) >= 0)  # most helpful first
    flat = _flat(run.curriculum)
    for train_id, count, effect in loo.rows():
        without = remove(run.curriculum, [train_id])
        expected = full - _brute_final(sim, without, run.initial_loss, cols)
        assert effect == pytest.approx(expected, abs=1e-10)
        assert count == flat.count(train_id)
    assert {i for i, _, _ in loo.helpful(100)} | {i for i, _, _ in loo.harmful(100)} <= set(flat)


def test_leave_one_out_of_the_only_example_ends_at_the_start(synthetic: tuple) -> None:
    _, sim, _ = synthetic
    loo = leave_one_out(sim, [["train-0"]] * 3, None, "test-0")
    full = _brute_final(sim, [["train-0"]] * 3, sim.initial_loss_, np.array([0]))
    assert loo.effects[0] == pytest.approx(full - sim.initial_loss_[0], abs=1e-12)
    assert final_objective(sim, [[]], sim.initial_loss_, np.array([0, 1]))[0] == pytest.approx(
        sim.initial_loss_[:2].mean()
    )


@pytest.mark.parametrize("weighting", ["mean", "sum"])
@pytest.mark.parametrize("cls", [LinearSimulator, AdditiveSimulator])
def test_step_contributions_sum_exactly_to_the_rollout(synthetic, cls, weighting) -> None:
    runs = synthetic[0]
    sim = cls(l2=1.0, batch_weighting=weighting).fit(runs)
    curriculum = repeat(runs.runs[1].curriculum, ["train-3"], 2)  # uneven batch sizes, repeats
    curriculum = remove(curriculum, [curriculum[0][0]])
    result = step_contributions(sim, curriculum, None, ["test-0", "test-2"])
    traj = sim.simulate(curriculum, sim.initial_loss_)[:, [0, 2]].mean(axis=1)
    np.testing.assert_allclose(result.trajectory, traj, atol=1e-12)
    np.testing.assert_allclose(result.change, np.diff(traj), atol=1e-12)
    sums = np.array([sum(step.values()) for step in result.contributions])
    np.testing.assert_allclose(sums, result.change, atol=1e-12)
    for step, batch in zip(result.contributions, curriculum, strict=True):
        assert set(step) - {"(floor)"} == set(batch)
    top = result.top_steps(3)
    assert abs(result.change[top[0] - 1]) == pytest.approx(np.abs(result.change).max())
    # the two largest contributions of that step, by magnitude, with their values
    ranked = sorted(result.contributions[top[0] - 1].items(), key=lambda kv: -abs(kv[1]))
    assert len(ranked) >= 2 and abs(ranked[0][1]) > 0
    assert result.top_examples(top[0], 2) == ranked[:2]


def test_pair_interactions_equal_brute_force(synthetic: tuple) -> None:
    runs, sim, _ = synthetic
    run = runs.runs[2]
    result = pair_interactions(sim, run.curriculum, run.initial_loss, "test-3", top=4)
    cols = np.array([3])
    full = _brute_final(sim, run.curriculum, run.initial_loss, cols)
    assert len(result.pairs) == 6 == len(list(combinations(range(4), 2)))
    single = dict(zip(result.train_ids, result.singles, strict=True))
    for i, j, joint, additive, inter in result.pairs:
        both = full - _brute_final(sim, remove(run.curriculum, [i, j]), run.initial_loss, cols)
        assert joint == pytest.approx(both, abs=1e-10)
        assert additive == pytest.approx(single[i] + single[j], abs=1e-12)
        assert inter == pytest.approx(both - single[i] - single[j], abs=1e-10)
    # an additive simulator has no interactions
    additive_sim = synthetic[2]
    flat = pair_interactions(additive_sim, run.curriculum, run.initial_loss, "test-3", top=4)
    assert max(abs(p[4]) for p in flat.pairs) < 1e-12


def test_unknown_test_id_is_a_clear_error(synthetic: tuple) -> None:
    runs, sim, _ = synthetic
    with pytest.raises(SimfluenceError, match="unknown test id 'nope'"):
        leave_one_out(sim, runs.runs[0].curriculum, None, ["nope"])


# -- search -----------------------------------------------------------------------------------
def test_search_evaluator_matches_simulate(synthetic: tuple) -> None:
    _, sim, additive_sim = synthetic
    for s in (sim, additive_sim):
        cols = np.array([0, 5])
        evaluate = _Evaluator(s, cols, s.initial_loss_, 3)
        layouts = _random_layouts(np.arange(40), 10, 2, 4, np.random.default_rng(0))
        values = evaluate(layouts)
        for layout, value in zip(layouts, values, strict=True):
            c = evaluate.curriculum(layout)
            assert len(c) == 8 and len(c[3]) == 1
            assert value == pytest.approx(_brute_final(s, c, s.initial_loss_, cols), abs=1e-10)


def _known_optimum(runs, seed: int) -> tuple[LinearSimulator, set[str]]:
    """Neutral A = 1/b, distinct B: the final loss is L_0 + E * sum of B over the subset, so
    the best K-subset is the K most negative B (any order)."""
    sim = LinearSimulator(l2=1.0).fit(runs)
    b = sim.batch_size_
    rng = np.random.default_rng(seed)
    sim.A_ = np.full_like(sim.A_, 1.0 / b)
    effect = rng.normal(0.0, 0.05, sim.B_.shape[1])
    sim.B_ = np.broadcast_to(effect * rng.uniform(0.5, 1.5, (sim.B_.shape[0], 1)), sim.B_.shape)
    sim.B_ = np.ascontiguousarray(sim.B_)
    sim.seen_ = np.ones_like(sim.seen_)
    best = set(np.array(sim.train_ids_)[np.argsort(effect)[:8]])
    return sim, best


@pytest.mark.parametrize("greedy", [True, False])
def test_search_finds_the_known_optimum(synthetic: tuple, greedy: bool) -> None:
    sim, best = _known_optimum(synthetic[0], seed=7)
    result = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=1, greedy=greedy, n_random=16, trust_region=False
    )
    chosen = set(_flat(result.curriculum))
    assert chosen == best
    assert len(result.curriculum) == 4 and all(len(b) == 4 for b in result.curriculum)
    assert result.objective < result.random_objectives.min()
    sim_final = _brute_final(sim, result.curriculum, sim.initial_loss_, np.arange(6))
    assert result.objective == pytest.approx(sim_final, abs=1e-10)
    assert result.history and result.history[-1]["objective"] == result.objective


def test_search_beats_random_on_a_realistic_set(synthetic: tuple) -> None:
    _, sim, _ = synthetic
    result = optimize_curriculum(
        sim, 16, 4, epochs=2, objective=["test-2"], seed=0, trust_region=False
    )
    assert result.objective < result.random_objectives.min()
    assert len(set(_flat(result.curriculum))) == 16
    with pytest.raises(SimfluenceError, match="size 99"):
        optimize_curriculum(sim, 99, 4)


# -- command line -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_files(synthetic: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs, sim, _ = synthetic
    root = tmp_path_factory.mktemp("cf")
    save_runset(runs, root / "runs")
    sim.save(root / "linear.npz")
    (root / "c.json").write_text(json.dumps(runs.runs[0].curriculum))
    (root / "empty.json").write_text("[]")
    (root / "list.json").write_text("[1, 2]")
    (root / "object.json").write_text('{"test-0": 1.0}')
    return {"root": root, "model": root / "linear.npz", "runs": root / "runs", "c": root / "c.json"}


def test_attribute_command(model_files: dict, capsys: pytest.CaptureFixture[str]) -> None:
    f = model_files
    out, png = f["root"] / "attr.json", f["root"] / "attr.png"
    args = [
        "attribute",
        str(f["model"]),
        "--test",
        "test-1",
        "--test",
        "test-2",
        "--curriculum",
        str(f["c"]),
        "--top",
        "5",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "most helpful" in text and "negative = consuming it lowered" in text
    payload = json.loads(out.read_text())
    assert payload["leave_one_out"]["test_ids"] == ["test-1", "test-2"]
    assert len(payload["pairs"]["pairs"]) == 15
    assert png.stat().st_size > 1000
    assert (
        main(
            [
                "attribute",
                str(f["model"]),
                "--test",
                "test-0",
                "--runs",
                str(f["runs"]),
                "--run",
                "run-0003",
            ]
        )
        == 0
    )


def test_simulate_with_edits(model_files: dict, capsys: pytest.CaptureFixture[str]) -> None:
    f = model_files
    curriculum = json.loads(f["c"].read_text())
    first, second = curriculum[0][0], curriculum[1][0]
    out = f["root"] / "pred.json"
    args = [
        "simulate",
        str(f["model"]),
        "--runs",
        str(f["runs"]),
        "--run",
        "run-0000",
        "-o",
        str(out),
        "--remove",
        first,
        "--repeat",
        f"{second}:2",
        "--reorder",
        "1",
        "--truncate",
        "5",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "predicted mean final loss: original (12 steps)" in text and "edited (5 steps)" in text
    assert np.array(json.loads(out.read_text())["loss"]).shape == (6, 6)


def test_optimize_command(model_files: dict, capsys: pytest.CaptureFixture[str]) -> None:
    f = model_files
    out = f["root"] / "best.json"
    args = [
        "optimize",
        str(f["model"]),
        "--size",
        "8",
        "--epochs",
        "2",
        "--test",
        "test-1",
        "--max-seconds",
        "10",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    assert "random curricula of the same size" in capsys.readouterr().out
    best = json.loads(out.read_text())
    assert len(best) == 4
    assert (
        main(
            ["simulate", str(f["model"]), "--curriculum", str(out), "-o", str(f["root"] / "p.json")]
        )
        == 0
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["attribute", "--test", "nope", "--curriculum", "c.json"], "unknown test id 'nope'"),
        (["simulate", "--curriculum", "c.json", "-o", "x.json", "--remove", "zzz"], "'zzz'"),
        (["attribute", "--test", "test-0", "--curriculum", "empty.json"], "no steps"),
        (["attribute", "--test", "test-0"], "either --curriculum"),
        (["simulate", "--curriculum", "c.json", "-o", "x.json", "--add", "zzz"], "unknown"),
        (["optimize", "--size", "999", "-o", "x.json"], "size 999"),
        (
            ["simulate", "--curriculum", "c.json", "--initial-loss", "list.json", "-o", "x.json"],
            "initial loss .*list.json: expected an object",
        ),
        (
            ["simulate", "--curriculum", "c.json", "--initial-loss", "object.json", "-o", "x.json"],
            "no loss for test example 'test-1'",
        ),
        (
            ["simulate", "--curriculum", "c.json", "--edits", "object.json", "-o", "x.json"],
            "edit spec .*object.json: expected a list of operations",
        ),
        (
            ["simulate", "--curriculum", "c.json", "--repeat", "train-1", "-o", "x.json"],
            "--repeat 'train-1': expected ID:TIMES",
        ),
        (
            [
                "simulate",
                "--curriculum",
                "c.json",
                "--add",
                "train-1",
                "--add-at",
                "soon",
                "-o",
                "x.json",
            ],
            "--add-at 'soon': expected start, end or a step number",
        ),
        (["attribute", "--test", "test-0", "--run", "run-0001"], "--run needs --runs DIR"),
        (
            ["simulate", "--curriculum", "nope.json", "-o", "x.json"],
            "curriculum .*nope.json: no such",
        ),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(
    model_files: dict, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    f = model_files
    args = [extra[0], str(f["model"])] + [
        str(f["root"] / a) if a.endswith(".json") else a for a in extra[1:]
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and len(err.splitlines()) == 1, err


def test_search_bookkeeping_follows_its_contract(synthetic: tuple) -> None:
    """Defaults and history: 64 random starts and a greedy one; rounds numbered from 1 with
    growing evaluation counts and a non-increasing objective; the search stops after
    `patience` (3) rounds without an accepted move."""
    sim, _ = _known_optimum(synthetic[0], seed=3)
    result = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=5, max_seconds=None, greedy=False, trust_region=False
    )
    assert any(h["accepted"] for h in result.history)  # it climbed, then idled 3 rounds
    assert result.random_objectives.shape == (64,)
    with_greedy = optimize_curriculum(sim, 8, 4, epochs=2, seed=5, trust_region=False)
    assert with_greedy.greedy_objective is not None
    history = result.history
    assert [h["round"] for h in history] == list(range(1, len(history) + 1))
    evaluations = [h["evaluations"] for h in history]
    assert evaluations == sorted(set(evaluations)) and result.evaluations == evaluations[-1]
    objectives = [h["objective"] for h in history]
    assert all(b <= a for a, b in pairwise(objectives))
    assert objectives[-1] == result.objective
    assert [h["accepted"] for h in history[-3:]] == [0, 0, 0]
    assert len(history) == 3 or history[-4]["accepted"] > 0
    assert result.objective <= result.random_objectives.min()
    assert 0 < result.seconds < 60


def test_search_limits_and_candidates(synthetic: tuple) -> None:
    sim, best = _known_optimum(synthetic[0], seed=3)
    # no time: the best start, no round
    timed_out = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=5, max_seconds=0.0, trust_region=False
    )
    assert timed_out.history == []
    assert timed_out.objective == min(timed_out.greedy_objective, timed_out.random_objectives.min())
    # an evaluation budget stops the rounds once spent
    capped = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=5, greedy=False, max_evaluations=70, trust_region=False
    )
    assert capped.greedy_objective is None and len(capped.history) == 1
    assert capped.evaluations >= 70
    # one move per round at most
    single = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=5, max_accept=1, n_random=4, greedy=False, trust_region=False
    )
    assert max(h["accepted"] for h in single.history) == 1
    assert len(single.random_objectives) == 4
    # candidates: only those, even when better ones exist outside
    allowed = sorted(set(sim.train_ids_) - best)[:12]
    limited = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=5, candidates=allowed, trust_region=False
    )
    assert set(_flat(limited.curriculum)) <= set(allowed)
    with pytest.raises(SimfluenceError, match="unknown training id 'zz'"):
        optimize_curriculum(sim, 8, 4, candidates=["zz"], trust_region=False)
    # unseen examples are not candidates unless asked for
    sim.seen_ = np.array([t not in best for t in sim.train_ids_])
    sim.unseen = "prior"  # unseen ids may be simulated (as having no effect)
    unseen_out = optimize_curriculum(sim, 8, 4, epochs=2, seed=5, trust_region=False)
    assert not set(_flat(unseen_out.curriculum)) & best
    unseen_in = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=5, include_unseen=True, trust_region=False
    )
    assert set(_flat(unseen_in.curriculum)) == best


def test_attribution_views_and_their_json_agree(synthetic: tuple) -> None:
    """The JSON (what `simfluence attribute --json` writes) carries the views' own numbers;
    helpful/harmful split the effects by sign, most extreme first; pairs are the top examples
    by |effect|, sorted by |interaction|."""
    from simfluence.counterfactual.attribution import attribution_views

    runs, sim, _ = synthetic
    run = runs.runs[1]
    loo, steps, pairs, payload = attribution_views(
        sim, run.curriculum, run.initial_loss, ["test-0", "test-3"], top=4, pairs=5
    )
    rows = loo.rows()
    negative = sorted((r for r in rows if r[2] < 0), key=lambda r: r[2])
    positive = sorted((r for r in rows if r[2] > 0), key=lambda r: -r[2])
    assert loo.helpful(3) == negative[:3] and loo.harmful(3) == positive[:3]
    assert loo.helpful(100) == negative and loo.harmful(100) == positive
    assert payload["method"] == "linear" and payload["leave_one_out"] == loo.to_json()
    assert [e["effect"] for e in payload["leave_one_out"]["effects"]] == [r[2] for r in rows]
    by_size = sorted(rows, key=lambda r: -abs(r[2]))[:5]
    assert sorted(pairs.train_ids) == sorted(r[0] for r in by_size)
    np.testing.assert_allclose(
        np.sort(np.abs(pairs.singles)), np.sort([abs(r[2]) for r in by_size])
    )
    interactions = [abs(p[4]) for p in pairs.pairs]
    assert interactions == sorted(interactions, reverse=True) and len(pairs.pairs) == 10
    assert payload["pairs"]["pairs"][0]["interaction"] == pairs.pairs[0][4]
    assert payload["pairs"]["singles"] == dict(
        zip(pairs.train_ids, pairs.singles.tolist(), strict=True)
    )
    top = payload["steps"]["top_steps"]
    assert [s["step"] for s in top] == steps.top_steps(4) and len(top) == 4
    for entry in top:
        assert entry["change"] == steps.change[entry["step"] - 1]
        assert [(e["train_id"], e["contribution"]) for e in entry["top_examples"]] == (
            steps.top_examples(entry["step"], 5)
        )
    assert payload["steps"]["trajectory"] == steps.trajectory.tolist()
    assert attribution_views(sim, run.curriculum, None, "test-0", pairs=1)[2] is None
    # the documented JSON layout (docs/counterfactuals.md), key by key
    assert set(payload) == {"method", "sign_convention", "leave_one_out", "steps", "pairs"}
    assert payload["sign_convention"].startswith("effect = L_T(with) - L_T(without)")
    assert set(payload["leave_one_out"]) >= {"sign_convention", "test_ids", "final_loss", "effects"}
    assert set(payload["leave_one_out"]["effects"][0]) >= {"train_id", "count", "effect"}
    assert set(payload["steps"]) == {"test_ids", "trajectory", "change", "top_steps", "unit"}
    assert payload["steps"]["unit"] == SIMULATED_CHANGE
    assert set(top[0]) == {"step", "change", "top_examples"}
    assert set(top[0]["top_examples"][0]) == {"train_id", "contribution"}
    assert set(payload["pairs"]) == {"sign_convention", "test_ids", "singles", "pairs"}
    assert set(payload["pairs"]["pairs"][0]) == {"i", "j", "joint", "additive", "interaction"}
    assert payload["pairs"]["sign_convention"].endswith(
        "interaction = joint - (effect_i + effect_j)"
    )


def test_attribution_of_a_simulator_without_parameters(synthetic: tuple) -> None:
    """Any simulator works: the curriculum-blind mean has no per-example decomposition, and
    removing an example changes only the length of its rollout."""
    from simfluence.simulators import MeanTrajectorySimulator

    runs = synthetic[0]
    mean = MeanTrajectorySimulator().fit(runs)
    run = runs.runs[0]
    steps = step_contributions(mean, run.curriculum, run.initial_loss, "test-1")
    expected = mean.simulate(run.curriculum, run.initial_loss)[:, 1]
    np.testing.assert_allclose(steps.trajectory, expected, atol=1e-12)
    assert steps.contributions is None and steps.top_examples(1, 3) == []
    loo = leave_one_out(mean, run.curriculum, run.initial_loss, "test-1")
    assert np.all(loo.effects == 0.0)  # no batch empties: the rollout keeps its length
    assert loo.helpful(5) == [] and loo.harmful(5) == []  # zero effects are neither


def test_search_starts_and_layouts(synthetic: tuple) -> None:
    """The greedy start is the optimum when effects add up; random starts follow the recording
    protocol (the same K distinct examples every epoch); one round can take several moves; a
    single batch per epoch makes every swap-in proposable, so one idle round ends the search."""
    sim, best = _known_optimum(synthetic[0], seed=11)
    greedy_only = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=2, max_seconds=0.0, n_random=1, trust_region=False
    )
    assert set(_flat(greedy_only.curriculum)) == best
    assert greedy_only.objective == greedy_only.greedy_objective
    random_only = optimize_curriculum(
        sim, 10, 4, epochs=3, seed=2, max_seconds=0.0, greedy=False, trust_region=False
    )
    batches = random_only.curriculum
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    epochs = [sorted(_flat(batches[3 * e : 3 * e + 3])) for e in range(3)]
    assert len(set(epochs[0])) == 10 and epochs[0] == epochs[1] == epochs[2]
    assert random_only.objective == random_only.random_objectives.min()
    climbing = optimize_curriculum(
        sim, 8, 4, epochs=2, seed=2, greedy=False, n_random=1, trust_region=False
    )
    assert climbing.history[0]["accepted"] > 1 and set(_flat(climbing.curriculum)) == best
    one_batch = optimize_curriculum(
        sim, 4, 4, epochs=2, seed=2, greedy=False, n_random=1, trust_region=False
    )
    assert one_batch.history[-1]["accepted"] == 0
    assert len(one_batch.history) == 1 or one_batch.history[-2]["accepted"] > 0
    with pytest.raises(SimfluenceError, match="at least 1"):
        optimize_curriculum(sim, 4, 0, trust_region=False)


def test_search_with_sum_weighting_and_without_parameters(synthetic: tuple) -> None:
    """The search's own rollout equals `simulate` for raw-sum batch weighting too; a simulator
    without parameters (the curriculum-blind mean) is searched through `simulate_many`."""
    from simfluence.simulators import MeanTrajectorySimulator

    runs = synthetic[0]
    summed = LinearSimulator(l2=1.0, batch_weighting="sum").fit(runs)
    cols = np.array([1, 2])
    evaluate = _Evaluator(summed, cols, summed.initial_loss_, 3)
    layouts = _random_layouts(np.arange(40), 10, 2, 3, np.random.default_rng(1))
    for layout, value in zip(layouts, evaluate(layouts), strict=True):
        c = evaluate.curriculum(layout)
        assert value == pytest.approx(
            _brute_final(summed, c, summed.initial_loss_, cols), abs=1e-10
        )
    mean = MeanTrajectorySimulator().fit(runs)
    result = optimize_curriculum(
        mean, 8, 4, epochs=2, objective="test-3", seed=0, n_random=4, trust_region=False
    )
    expected = mean.initial_loss_[3] + mean.mean_change_[4, 3]
    assert result.objective == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(result.random_objectives, expected, atol=1e-12)


def test_attribution_inputs_are_checked(synthetic: tuple) -> None:
    runs, sim, _ = synthetic
    run = runs.runs[0]
    with pytest.raises(
        SimfluenceError,
        match=r"6 test examples \('test-0', 'test-1', 'test-2', 'test-3', 'test-4', \.\.\.",
    ):
        leave_one_out(sim, run.curriculum, None, ["test-9"])
    with pytest.raises(SimfluenceError, match="no test ids given"):
        leave_one_out(sim, run.curriculum, None, [])
    with pytest.raises(CurriculumError, match=r"initial loss has shape \(2,\), expected \(6,\)"):
        leave_one_out(sim, run.curriculum, np.zeros(2), "test-0")
    none = pair_interactions(sim, run.curriculum, None, "test-0", top=0)
    assert none.pairs == [] and none.train_ids == [] and none.test_ids == ["test-0"]
    steps = step_contributions(sim, run.curriculum, None, "test-0")
    assert steps.top_steps(2) == [
        int(t) + 1 for t in np.argsort(-np.abs(steps.change), kind="stable")[:2]
    ]
    assert len(steps.to_json(top=3, per_step=2)["top_steps"]) == 3
    assert all(len(s["top_examples"]) == 2 for s in steps.to_json(top=3, per_step=2)["top_steps"])
    assert steps.test_ids == ["test-0"] and steps.trajectory[0] == sim.initial_loss_[0]


def test_search_is_deterministic_and_uses_its_arguments(synthetic: tuple) -> None:
    """Same seed, same answer (seed 0 and one epoch by default); the initial loss given is the
    one searched from; at least one random start even when none is asked for."""
    sim, _ = _known_optimum(synthetic[0], seed=3)
    first = optimize_curriculum(sim, 6, 4, n_random=8, greedy=False, trust_region=False)
    again = optimize_curriculum(
        sim, 6, 4, n_random=8, greedy=False, seed=0, epochs=1, trust_region=False
    )
    assert first.curriculum == again.curriculum and first.objective == again.objective
    assert [len(b) for b in first.curriculum] == [4, 2]  # one epoch of 6 in batches of 4
    shifted = optimize_curriculum(
        sim,
        6,
        4,
        n_random=8,
        greedy=False,
        initial_loss=sim.initial_loss_ + 1.0,
        trust_region=False,
    )
    assert shifted.objective == pytest.approx(first.objective + 1.0, abs=1e-9)
    assert optimize_curriculum(
        sim, 6, 4, n_random=0, max_seconds=0.0, trust_region=False
    ).random_objectives.shape == (1,)


def test_views_use_the_initial_loss_given_and_their_defaults(synthetic: tuple) -> None:
    runs, sim, _ = synthetic
    run = runs.runs[0]
    lifted = run.initial_loss + 1.0
    steps = step_contributions(sim, run.curriculum, lifted, "test-0")
    assert steps.trajectory[0] == lifted[0]
    pairs = pair_interactions(sim, run.curriculum, lifted, "test-0", top=3)
    loo = leave_one_out(sim, run.curriculum, lifted, "test-0")
    by_size = sorted(loo.effects, key=abs, reverse=True)[:3]
    np.testing.assert_allclose(sorted(pairs.singles, key=abs, reverse=True), by_size)
    assert len(pair_interactions(sim, run.curriculum, None, "test-0").pairs) == 45  # top 10
    wide = [sorted({i for b in run.curriculum for i in b})[k : k + 8] for k in (0, 8)] * 7
    payload = step_contributions(sim, wide, None, "test-0").to_json()
    assert len(payload["top_steps"]) == 10  # default top
    assert all(len(s["top_examples"]) == 5 for s in payload["top_steps"])  # default per_step


def test_attribution_views_pass_the_initial_loss_and_pair_count_on(synthetic: tuple) -> None:
    from simfluence.counterfactual.attribution import attribution_views

    runs, sim, _ = synthetic
    run = runs.runs[2]
    lifted = run.initial_loss + 0.5
    loo, steps, pairs, _ = attribution_views(sim, run.curriculum, lifted, "test-1", pairs=2)
    assert loo.final_loss == leave_one_out(sim, run.curriculum, lifted, "test-1").final_loss
    assert steps.trajectory[0] == lifted[1]
    assert pairs is not None and len(pairs.pairs) == 1  # two examples: one pair
    direct = pair_interactions(sim, run.curriculum, lifted, "test-1", top=2)
    assert pairs.pairs == direct.pairs
    default = attribution_views(sim, run.curriculum, None, "test-1")
    assert len(default[2].pairs) == 45 and len(default[3]["steps"]["top_steps"]) == 10


def test_zero_weight_leave_one_out_uses_zero_weight_in_its_folds_too(synthetic: tuple) -> None:
    """``removal="zero-weight"`` is what the result says (and its JSON), and the interval of
    every effect comes from the calibration refits' effects under the same removal, averaged
    over the test examples asked for."""
    import copy

    from simfluence.counterfactual.attribution.loo import effect_intervals
    from simfluence.counterfactual.attribution.removal import removal_effects

    runs, _, additive = synthetic
    sim = copy.deepcopy(additive).calibrate(runs.subset(runs.run_ids[:4]), n_folds=2)
    run = runs.runs[0]
    cols = np.array([1, 4])
    loo = leave_one_out(sim, run.curriculum, run.initial_loss, ["test-1", "test-4"], 0.8,
                        removal="zero-weight")  # fmt: skip
    assert loo.removal == "zero-weight" and loo.to_json()["removal"] == "zero-weight"
    groups = [[i] for i in sorted(set(_flat(run.curriculum)))]
    per_fold = np.stack([
        removal_effects(f, run.curriculum, run.initial_loss, cols, groups, "zero-weight").mean(1)
        for f in sim.fold_simulators()
    ])  # fmt: skip
    effects = removal_effects(
        sim, run.curriculum, run.initial_loss, cols, groups, "zero-weight"
    ).mean(1)
    lower, upper = effect_intervals(effects, per_fold, 0.8)
    order = [[g[0] for g in groups].index(i) for i in loo.train_ids]
    np.testing.assert_allclose(loo.lower, lower[order], rtol=1e-12)
    np.testing.assert_allclose(loo.upper, upper[order], rtol=1e-12)


def test_leave_one_out_lists_equal_effects_in_id_order() -> None:
    """Examples of the same effect (here 29 without any, and a helpful one sorting last by
    id) keep their id order after the helpful one."""
    import copy

    from simfluence.runlog import Run, RunSet

    pool = [f"e{k:02d}" for k in range(30)]
    losses = np.linspace(2.0, 1.0, 31)[:, None]
    runs = RunSet(pool, ["t"], [Run("r", [[p] for p in pool], losses)])
    sim = copy.deepcopy(AdditiveSimulator(l2=1.0).fit(runs))
    sim.B_ = np.zeros_like(sim.B_)
    sim.B_[0, -1] = -0.1
    loo = leave_one_out(sim, [[p] for p in pool], np.array([2.0]), "t", None)
    assert loo.train_ids == [pool[-1], *pool[:-1]]
    assert loo.effects[0] == pytest.approx(-0.1) and not loo.effects[1:].any()


def test_attribution_rollouts_are_floored_from_the_first_step(synthetic: tuple) -> None:
    """A one-step curriculum from losses near 0 that its step drives below the floor: the
    attribution's final loss is the floored one that `simulate` reports."""
    runs, _, additive = synthetic
    cols = np.arange(6)
    helpful = min(runs.train_ids, key=lambda i: additive.B_[:, runs.train_index[i]].sum())
    initial = np.full(6, 1e-3)
    reported = additive.simulate([[helpful]], initial)
    assert (reported[1] < additive.floor_ + additive.floor_width_).any()  # the floor binds
    got = final_objective(additive, [[[helpful]]], initial, cols)[0]
    assert got == pytest.approx(reported[-1].mean(), abs=1e-15)
