"""The mutation-testing tools order and record tests correctly (tests/mutation_plugin.py,
tools/mutation_history.py). A wrong order does not change which mutants count as killed
without a budget, but under ``make mutate``'s budget it decides which tests a mutant gets."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import mutation_plugin as plugin
import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _history_tool():
    spec = importlib.util.spec_from_file_location("mutation_history", TOOLS / "mutation_history.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected_seconds(order: list[str], cost: dict[str, float], chance: dict[str, float]) -> float:
    """Expected seconds until the first failing test, tests failing independently."""
    total, alive = 0.0, 1.0
    for test in order:
        total += alive * cost[test]
        alive *= 1.0 - chance[test]
    return total


def _costs(seconds: dict[str, tuple[float, float]]) -> plugin.Costs:
    """Costs of tests that use no shared fixture: ``{test: (set-up, call + teardown)}``."""
    return plugin.Costs(seconds)


def test_without_fixtures_the_plan_minimizes_expected_seconds_to_the_first_kill() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        tests = [f"tests/test_{i}.py::t" for i in range(5)]  # one per file: no grouping
        cost = dict(zip(tests, rng.uniform(0.01, 2.0, 5), strict=True))
        chance = dict(zip(tests, rng.uniform(0.01, 0.9, 5), strict=True))
        planned = plugin.plan(tests, _costs({t: (0.0, c) for t, c in cost.items()}), chance)
        best = min(_expected_seconds(list(p), cost, chance) for p in itertools.permutations(tests))
        assert sorted(planned) == sorted(tests)
        assert _expected_seconds(planned, cost, chance) == pytest.approx(best)


def test_a_shared_fixture_is_paid_once_and_files_stay_together() -> None:
    # a.py's first and second tests use a 2 s module fixture; third does not
    tests = {
        "a.py::first": (0.1, 0.1, ["a.py::data"]),
        "a.py::second": (0.1, 0.1, ["a.py::data"]),
        "a.py::third": (0.1, 0.1, []),
        "b.py::one": (0.0, 0.5, []),
        "b.py::two": (0.0, 0.05, []),
    }
    costs = plugin.Costs(tests, {"a.py::data": 2.0})
    assert costs.of("a.py::second", ready=set()) == pytest.approx(2.2)
    assert costs.of("a.py::second", ready={"a.py::data"}) == pytest.approx(0.2)
    assert costs.of("a.py::third", ready=set()) == pytest.approx(0.2)
    chance = {"a.py::first": 0.5, "a.py::second": 0.5, "a.py::third": 0.01, "b.py::one": 0.5}
    chance["b.py::two"] = 0.02
    # by cost / chance: b.py::one 1.0; b.py::two 2.5; a.py::first 4.4 (with the fixture);
    # then a.py::second 0.4 (fixture ready); a.py::third 20
    order = plugin.plan(list(tests), costs, chance)
    assert order == ["b.py::one", "b.py::two", "a.py::first", "a.py::second", "a.py::third"]
    # within 2.9 s: b.py's two (0.55 s), a.py's first (2.2 s); its second (0.2 s) would overflow
    assert plugin.plan(list(tests), costs, chance, budget=2.9) == [
        "b.py::one",
        "b.py::two",
        "a.py::first",
    ]


def test_the_budget_keeps_the_first_test_even_if_it_overflows() -> None:
    costs = _costs({"a.py::big": (0.0, 5.0), "a.py::small": (0.0, 0.1)})
    chance = {"a.py::big": 0.9, "a.py::small": 0.001}  # big: 5.6 s per kill, small: 100
    assert plugin.plan(["a.py::small", "a.py::big"], costs, chance, budget=1.0) == ["a.py::big"]


def test_chosen_tests_run_grouped_by_file_in_the_order_files_were_first_chosen() -> None:
    costs = _costs({"a.py::x": (0.0, 0.1), "b.py::y": (0.0, 0.2), "a.py::z": (0.0, 0.3)})
    chance = {"a.py::x": 0.5, "b.py::y": 0.5, "a.py::z": 0.5}
    # chosen x (0.2), y (0.4), z (0.6); run a.py's two together
    assert plugin.plan(list(chance), costs, chance) == ["a.py::x", "a.py::z", "b.py::y"]


def test_unknown_tests_cost_the_default_and_have_the_prior_chance() -> None:
    costs = _costs({"y.py::known": (0.0, 1.5)})
    # x.py::new: 1.0 s / PRIOR_CHANCE beats 1.5 s / PRIOR_CHANCE, and loses to a record of 0.9
    assert plugin.plan(["x.py::new", "y.py::known"], costs, {}) == ["x.py::new", "y.py::known"]
    chance = {"y.py::known": 0.9}
    assert plugin.plan(["x.py::new", "y.py::known"], costs, chance) == ["y.py::known", "x.py::new"]


def test_costs_fall_back_to_mutmuts_call_seconds(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": {"a.py::t": 0.3}}))
    assert plugin._read_costs().test == {"a.py::t": pytest.approx(0.3)}
    recorded = {"tests": {"a.py::t": [0.5, 0.25, ["a.py::f"]]}, "fixtures": {"a.py::f": 1.0}}
    (tmp_path / "mutmut-test-seconds.json").write_text(json.dumps(recorded))
    costs = plugin._read_costs()
    assert costs.test == {"a.py::t": pytest.approx(0.75)}
    assert costs.of("a.py::t", ready=set()) == pytest.approx(1.75)


def test_kill_chance_starts_at_the_prior_and_moves_to_the_record() -> None:
    prior = plugin.PRIOR_CHANCE
    chances = plugin.kill_chances({"often": (98.0, 49.0), "never": (1000.0, 0.0), "new": (0, 0)})
    assert chances["often"] == pytest.approx((49 + 2 * prior) / 100)
    assert chances["new"] == pytest.approx(prior)
    # (0 + 2 * 0.3) / 1002 = 6e-4, kept at 1e-3: off 0, so cost / chance stays finite
    assert chances["never"] == pytest.approx(1e-3)


def test_a_mutant_run_logs_what_ran_and_the_first_failure(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MUTANT_UNDER_TEST", "pkg.mod.x_f__mutmut_3")
    monkeypatch.setattr(plugin, "_ran", [])
    monkeypatch.setattr(plugin, "_killer", [])

    def report(nodeid: str, when: str, outcome: str) -> pytest.TestReport:
        return pytest.TestReport(nodeid, ("f.py", 0, nodeid), {}, outcome, None, when)

    for when in ("setup", "call", "teardown"):
        plugin.pytest_runtest_logreport(report("t.py::ok", when, "passed"))
    plugin.pytest_runtest_logreport(report("t.py::bad", "call", "failed"))
    plugin.pytest_runtest_logreport(report("t.py::bad", "teardown", "failed"))
    plugin.pytest_sessionfinish(None)
    lines = (tmp_path / "mutmut-test-kills.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"mutant": "pkg.mod.x_f__mutmut_3", "ran": ["t.py::ok"], "killer": "t.py::bad"}
    ]


def test_history_counts_runs_and_kills_and_decays_the_old_record() -> None:
    tool = _history_tool()
    log = [
        json.dumps({"mutant": "m1", "ran": ["a", "b"], "killer": "c"}),
        "",
        json.dumps({"mutant": "m2", "ran": ["a"], "killer": None}),
    ]
    counts = tool.run_counts(log)
    assert counts == {"a": [2.0, 0.0], "b": [1.0, 0.0], "c": [1.0, 1.0]}
    old = {"a": [4.0, 2.0], "gone": [9.0, 9.0]}
    assert tool.merged(old, counts, {"a", "b", "c"}) == {
        "a": [4.0, 1.0],
        "b": [1.0, 0.0],
        "c": [1.0, 1.0],
    }


def test_history_names_the_bad_line(tmp_path) -> None:
    tool = _history_tool()
    with pytest.raises(ValueError, match="line 2"):
        tool.run_counts(['{"mutant": "m", "ran": [], "killer": null}', '{"mutant": "m"}'])
    kills = tmp_path / "kills.jsonl"
    kills.write_text('{"mutant": "m", "ran": ["a"], "killer": "b"}\n')
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"duration_by_test": {"a": 0.1, "b": 0.2}}))
    history = tmp_path / "history.json"
    args = ["--kills", str(kills), "--stats", str(stats), "--history", str(history)]
    assert tool.main(args) == 0
    assert json.loads(history.read_text())["tests"] == {"a": [1.0, 0.0], "b": [1.0, 1.0]}
    assert tool.main([*args[:4], "--history", str(history)]) == 0
    assert json.loads(history.read_text())["tests"] == {"a": [1.5, 0.0], "b": [1.5, 1.5]}


def test_the_wall_clock_cap_grows_with_the_budget_and_is_off_without_one() -> None:
    assert plugin.wall_cap(0.0) == 0.0
    assert plugin.wall_cap(0.4) == pytest.approx(2.5)
    assert plugin.wall_cap(1.0) == pytest.approx(2.5)
    assert plugin.wall_cap(2.0) == pytest.approx(5.0)


def test_a_mutant_past_its_wall_clock_cap_exits_as_a_survivor_and_says_so(tmp_path) -> None:
    """The capped process exits 0 (mutmut: survived) long before its tests would end, and its
    kills-log line names the tests that passed, no killer, and the cap."""
    pid = os.fork()
    if pid == 0:  # a mutant's process: one test passed, the next one hangs
        try:
            os.chdir(tmp_path)
            os.environ["MUTANT_UNDER_TEST"] = "pkg.x_f__mutmut_1"
            plugin._ran[:], plugin._killer[:] = ["t::passed"], []
            plugin._cap_wall_clock(0.2)
            time.sleep(10)
        finally:
            os._exit(3)  # only if the cap did not fire
    start = time.perf_counter()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert time.perf_counter() - start < 5
    line = json.loads((tmp_path / plugin.KILLS_FILE).read_text())
    expected = {"mutant": "pkg.x_f__mutmut_1", "ran": ["t::passed"], "killer": None}
    assert line == {**expected, "capped": 0.2}


def test_preloading_skips_a_lazy_import_that_is_not_installed(monkeypatch) -> None:
    monkeypatch.setattr(plugin, "LAZY_IMPORTS", ("simfluence_no_such_module", "json.tool"))
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    plugin._preload_lazy_imports()
    assert "json.tool" in sys.modules and "simfluence_no_such_module" not in sys.modules


@pytest.mark.slow
def test_pytest_accepts_the_options_mutation_testing_runs_with() -> None:
    """A typo in pyproject's ``pytest_add_cli_args`` would stop ``make mutate`` at its first
    step; here pytest runs one test with exactly those options."""
    root = Path(__file__).resolve().parents[1]
    options = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    one_test = test_the_wall_clock_cap_grows_with_the_budget_and_is_off_without_one
    test = f"tests/test_mutation_tools.py::{one_test.__name__}"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *options["pytest_add_cli_args"], test],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
