"""How mutation testing (``make mutate``, mutmut) runs the test suite; inert otherwise.

mutmut sets ``MUTANT_UNDER_TEST``: ``"stats"`` in its statistics run (one full run that records
which tests reach which function), a mutant's name (``...__mutmut_N``) in the process it forks
for that mutant. These hooks, imported by ``conftest.py``:

* preload torch (one thread) in the process mutants are forked from;
* in the statistics run, time each test's set-up and its call + teardown
  (``mutmut-test-seconds.json`` in mutmut's working copy; mutmut's own record counts the call
  only, and fixtures can spend seconds in set-up);
* for a mutant, choose its tests by expected seconds per kill, at most
  ``SIMFLUENCE_MUTANT_SECONDS`` of them (``make mutate`` sets it from ``MUTATE_SECONDS``),
  and hand pytest only those (`plan`);
* for a mutant, log the tests that ran and the one that failed
  (``mutmut-test-kills.jsonl``), from which ``tools/mutation_history.py`` updates each test's
  kill rate (``tools/mutation_history.json``) for the next run's order.

Why that order: mutmut stops at a mutant's first failing test, so the tests that kill most
often per second should run first. For independent tests with kill chances ``p`` and costs
``c``, running them by ``c / p`` ascending minimizes the expected seconds to the first failure.
``p`` is a test's kill rate in earlier runs (``kills / runs``), shrunk towards one prior
chance for every test: without a record, the cheapest test goes first. (A prior that grew with
a test's *breadth*, the number of mutated functions it reaches, was tried and dropped: when run
first, tests reaching under 3 functions killed 82% of the mutants they saw, not the 1% that a
cheapest-first run had suggested; with it, counterfactual/attribution.py kept 132 survivors
against 39.)
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pytest

SECONDS_FILE = Path("mutmut-test-seconds.json")  # relative: mutmut runs tests in its copy
STATS_FILE = Path("mutmut-stats.json")
HISTORY_FILE = Path("tools/mutation_history.json")  # copied in by pyproject's `also_copy`
KILLS_FILE = Path("mutmut-test-kills.jsonl")
BUDGET_VARIABLE = "SIMFLUENCE_MUTANT_SECONDS"
DEFAULT_SECONDS = 1.0  # a test the statistics run did not time
PRIOR_CHANCE = 0.3  # a test's chance of killing a mutant it reaches, before it has a record
PRIOR_WEIGHT = 2.0  # runs' worth of weight the prior carries against a test's record
_measured: dict[str, list[float]] = {}  # test -> [set-up, call + teardown] seconds, run order
_ran: list[str] = []
_killer: list[str] = []
_plan: tuple[Costs, dict[str, float]] | None = None


def _phase() -> str:
    """What mutmut is doing in this process: "stats", a mutant's name, or "" (not mutmut)."""
    return os.environ.get("MUTANT_UNDER_TEST", "")


def _in_mutant() -> bool:
    return "__mutmut_" in _phase()


def _preload_torch() -> None:
    """Creating the first torch optimizer imports ``torch._dynamo``: seconds. Done once at
    collection, it is shared by every process forked from this one (mutation testing forks one
    per mutant), instead of being paid again in each.

    One thread per mutant, too: mutmut runs a mutant per core, and it stops a mutant's tests on
    *CPU* seconds, which a multi-threaded torch spends several per second of the tests' time."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


if "MUTANT_UNDER_TEST" in os.environ:  # set by mutmut in the process it forks workers from
    _preload_torch()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Statistics run: add up each test's set-up, call and teardown seconds. A mutant's run:
    note the tests that passed and the first that failed (at set-up or call)."""
    if _phase() == "stats":
        phases = _measured.setdefault(report.nodeid, [0.0, 0.0])
        phases[report.when != "setup"] += report.duration
    elif _in_mutant():
        if report.failed and not _killer:
            _killer.append(report.nodeid)
        elif report.when == "call" and report.passed:
            _ran.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write what the hook above saw: the seconds (merged into earlier ones, through a
    temporary file) or one line of the kills log (a single append: mutants run concurrently)."""
    if _phase() == "stats" and _measured:
        _write_seconds()
    elif _in_mutant() and (_ran or _killer):
        line = json.dumps({"mutant": _phase(), "ran": _ran, "killer": next(iter(_killer), None)})
        descriptor = os.open(KILLS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, (line + "\n").encode())
        finally:
            os.close(descriptor)


def _write_seconds() -> None:
    try:
        known = json.loads(SECONDS_FILE.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not all(isinstance(v, list) for v in known.values()):
        known = {}
    known.update(_measured)
    partial = SECONDS_FILE.with_suffix(".tmp")
    partial.write_text(json.dumps(known, indent=0))  # keeps run order: a file's first test
    partial.replace(SECONDS_FILE)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Costs:
    """What running a mutant's tests costs, from the statistics run's set-up and other seconds.

    A module-scoped fixture is set up once per file, inside the set-up of the file's first
    test (the statistics run goes file by file): that extra is the file's *overhead*, paid
    once by whichever of its tests a mutant runs first. A test's own cost is its call and
    teardown plus its set-up, counting the file's first test's set-up as the file's median."""

    def __init__(self, phases: Mapping[str, Sequence[float]]) -> None:
        by_file: dict[str, list[str]] = {}
        for test in phases:  # in run order
            by_file.setdefault(_file(test), []).append(test)
        self.test: dict[str, float] = {}
        self.overhead: dict[str, float] = {}
        for name, tests in by_file.items():
            median = statistics.median(phases[t][0] for t in tests)
            first_setup = phases[tests[0]][0]
            self.overhead[name] = max(first_setup - median, 0.0)
            for test in tests:
                setup = median if test == tests[0] else phases[test][0]
                self.test[test] = setup + phases[test][1]

    def __bool__(self) -> bool:
        return bool(self.test)

    def of(self, test: str, opened: Collection[str]) -> float:
        """Seconds to run `test` after the files in `opened` have had their first test."""
        own = self.test.get(test, DEFAULT_SECONDS)
        return own if _file(test) in opened else own + self.overhead.get(_file(test), 0.0)


def _file(test: str) -> str:
    """The test file of a node id."""
    return test.split("::")[0]


def _read_costs() -> Costs:
    """`Costs` from the seconds written above; from mutmut's call-only record (no set-up
    known) when they are missing; empty when neither is."""
    phases = _read_json(SECONDS_FILE)
    if isinstance(phases, dict) and phases:
        return Costs(phases)
    stats = _read_json(STATS_FILE)
    calls = stats.get("duration_by_test", {}) if isinstance(stats, dict) else {}
    return Costs({test: (0.0, seconds) for test, seconds in calls.items()})


def kill_chances(history: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``{test: estimated chance, in (0, 1), that it fails on a mutant of a function it reaches}``
    for the tests in `history` (``test -> (runs, kills)`` from earlier mutation runs):
    ``(kills + w * PRIOR_CHANCE) / (runs + w)`` with ``w = PRIOR_WEIGHT``. Tests without a
    record have ``PRIOR_CHANCE``."""
    chances: dict[str, float] = {}
    for test, (runs, kills) in history.items():
        chance = (kills + PRIOR_WEIGHT * PRIOR_CHANCE) / (runs + PRIOR_WEIGHT)
        chances[test] = min(max(chance, 1e-3), 1.0 - 1e-3)
    return chances


def plan(
    tests: Sequence[str], costs: Costs, chance: Mapping[str, float], budget: float = 0.0
) -> list[str]:
    """Which of `tests` to run for a mutant, in order.

    Greedy by expected seconds per kill: next is the test with the least ``cost / chance``,
    its cost counting its file's overhead while no test of that file has run; the first test
    always, then while the recorded seconds stay within `budget` (0: no limit). For tests that
    fail independently and cost what they cost alone, ``cost / chance`` ascending is the order
    with the least expected seconds to the first failure. The chosen tests then run grouped by
    file, files in the order first chosen, so each module fixture is set up once. Unknown tests
    cost ``DEFAULT_SECONDS`` and have chance ``PRIOR_CHANCE``."""
    left = list(dict.fromkeys(tests))
    chosen: list[str] = []
    opened: set[str] = set()
    spent = 0.0
    while left:
        best = min(left, key=lambda t: (costs.of(t, opened) / chance.get(t, PRIOR_CHANCE), t))
        cost = costs.of(best, opened)
        if budget and chosen and spent + cost > budget:
            break
        chosen.append(best)
        left.remove(best)
        opened.add(_file(best))
        spent += cost
    rank = {name: i for i, name in enumerate(dict.fromkeys(_file(t) for t in chosen))}
    return sorted(chosen, key=lambda t: rank[_file(t)])  # stable: within a file, as chosen


def _plan_inputs() -> tuple[Costs, dict[str, float]]:
    """(seconds, kill chance) per test, read once per process from mutmut's working copy."""
    global _plan
    if _plan is None:
        history = _read_json(HISTORY_FILE)
        history = history.get("tests", {}) if isinstance(history, dict) else {}
        chances = kill_chances(history)
        _plan = (_read_costs(), chances)
    return _plan


def _test_budget() -> float:
    """The recorded test seconds one mutant may use; 0 (unset) means no limit."""
    text = os.environ.get(BUDGET_VARIABLE, "0")
    try:
        budget = float(text)
    except ValueError:
        budget = -1.0
    if not budget >= 0:
        raise pytest.UsageError(f"{BUDGET_VARIABLE}={text!r}: must be a number of seconds >= 0")
    return budget


def _planned(tests: list[str]) -> list[str]:
    """`plan` for this mutant's `tests` with ``SIMFLUENCE_MUTANT_SECONDS``."""
    costs, chances = _plan_inputs()
    return plan(tests, costs, chances, _test_budget()) if costs else tests


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """For a mutant, hand pytest only the tests it will run, in their order.

    mutmut names every test that reaches the mutated function (a hundred, from a dozen files,
    for a core function); pytest spends about 0.5 s matching that many node ids at collection,
    more than most mutants' tests take. Cut to the planned tests first, collection takes
    about 0.1 s (measured on the 2-core machine, with 133 node ids from 13 files: 0.66 s).
    The budget bounds what a surviving mutant costs: a mutant that the first seconds of its
    tests do not notice counts as a survivor (the score can only be lower for it, never
    higher)."""
    if not _in_mutant() or not config.args:
        return
    if all("::" in arg for arg in config.args):  # node ids, not paths or directories
        config.args[:] = _planned(list(config.args))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For a mutant, run the collected tests in planned order (pytest collects the node ids
    `pytest_configure` kept file by file, which can interleave)."""
    if not _in_mutant():
        return
    planned = _planned([item.nodeid for item in items])
    position = {test: i for i, test in enumerate(planned)}
    dropped = [item for item in items if item.nodeid not in position]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = sorted(
        (item for item in items if item.nodeid in position), key=lambda i: position[i.nodeid]
    )
