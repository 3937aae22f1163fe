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
import signal
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

SECONDS_FILE = Path("mutmut-test-seconds.json")  # relative: mutmut runs tests in its copy
STATS_FILE = Path("mutmut-stats.json")
HISTORY_FILE = Path("tools/mutation_history.json")  # copied in by pyproject's `also_copy`
KILLS_FILE = Path("mutmut-test-kills.jsonl")
BUDGET_VARIABLE = "SIMFLUENCE_MUTANT_SECONDS"
DEFAULT_SECONDS = 1.0  # a test the statistics run did not time
PRIOR_CHANCE = 0.3  # a test's chance of killing a mutant it reaches, before it has a record
PRIOR_WEIGHT = 2.0  # runs' worth of weight the prior carries against a test's record
# a mutant whose chosen tests are still running after max(2.5 s, 2.5 x budget) of wall clock is
# stopped and counted as a survivor (see `_cap_wall_clock`)
WALL_CAP_FACTOR = 2.5
WALL_CAP_MIN_SECONDS = 2.5
_measured: dict[str, list[float]] = {}  # test -> [own set-up, call + teardown] seconds
_shared_fixtures: dict[str, list[str]] = {}  # test -> the wider-scoped fixtures it uses
_fixture_seconds: dict[str, float] = {}  # wider-scoped fixture -> its set-up seconds
_current_test: list[str] = []
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


# imported lazily by the library (progress bars, run-log datasets, bundled data sets): the first
# mutant whose tests need one would pay 0.3 s importing it, and every later one again
LAZY_IMPORTS = (
    "pyarrow.dataset",
    "pyarrow.compute",
    "rich.progress",
    "sklearn.datasets",
    "sklearn.preprocessing",
    "sklearn.feature_extraction",
    "scipy.io",
)


def _preload_lazy_imports() -> None:
    """Import `LAZY_IMPORTS` once in the process mutants are forked from (absent ones skipped)."""
    import importlib

    for name in LAZY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            continue


if "MUTANT_UNDER_TEST" in os.environ:  # set by mutmut in the process it forks workers from
    _preload_torch()
    _preload_lazy_imports()


def _shared_key(fixturedef: pytest.FixtureDef) -> str | None:
    """A fixture set up once for many tests (module, class, package or session scope), named
    by where it is defined; None for a function-scoped one."""
    if fixturedef.scope == "function":
        return None
    return f"{fixturedef.baseid}::{fixturedef.argname}"


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    """Statistics run: time each set-up of a fixture shared by many tests, and take it out of
    the set-up seconds of the test that happened to set it up."""
    key = _shared_key(fixturedef) if _phase() == "stats" else None
    if key is None:
        return (yield)
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        seconds = time.perf_counter() - start
        _fixture_seconds[key] = _fixture_seconds.get(key, 0.0) + seconds
        if _current_test:
            test = _measured.setdefault(_current_test[0], [0.0, 0.0])
            test[0] -= seconds  # the test's set-up report adds the whole set-up back


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    """Statistics run: the test whose set-up is running (shared fixtures are set up in it)."""
    if _phase() == "stats":
        _current_test[:] = [nodeid]


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


def _note_shared_fixtures(items: Sequence[pytest.Item]) -> None:
    """Statistics run: which shared fixtures each test uses (pytest's own fixture closure)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        definitions = getattr(info, "name2fixturedefs", {}) or {}
        keys = [_shared_key(defs[-1]) for defs in definitions.values() if defs]
        _shared_fixtures[item.nodeid] = sorted(k for k in keys if k)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write what the hook above saw: the seconds (merged into earlier ones, through a
    temporary file) or one line of the kills log (a single append: mutants run concurrently)."""
    if _phase() == "stats" and _measured:
        _write_seconds()
    elif _in_mutant() and (_ran or _killer):
        _log_mutant()


def _log_mutant(**extra: object) -> None:
    """One line of the kills log for this mutant: the tests that passed, the one that failed."""
    entry = {"mutant": _phase(), "ran": _ran, "killer": next(iter(_killer), None), **extra}
    descriptor = os.open(KILLS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(descriptor)


def wall_cap(budget: float) -> float:
    """Wall-clock seconds a mutant's tests may run (0: no cap, when the budget is unlimited)."""
    return max(WALL_CAP_MIN_SECONDS, WALL_CAP_FACTOR * budget) if budget else 0.0


def _cap_wall_clock(seconds: float) -> None:
    """Stop this mutant's process after `seconds`, exiting 0: mutmut counts it *survived*.

    A few mutants make a search loop run 20-30 s instead of under one (mutmut's own limit is
    minutes); their tests then fail only through a guard far along. Counting them survivors
    (never detected: the score can only be lower for it) bounds what one mutant costs."""
    if not seconds:
        return

    def stop(signum: int, frame: object) -> None:
        _log_mutant(capped=seconds)
        os._exit(0)

    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _write_seconds() -> None:
    """``mutmut-test-seconds.json``: per test ``[own set-up, call + teardown, shared fixtures]``
    and per shared fixture its set-up seconds, merged into an earlier record (mutmut may
    re-run only some tests), through a temporary file."""
    known = _read_json(SECONDS_FILE)
    if not (isinstance(known, dict) and "tests" in known and "fixtures" in known):
        known = {"tests": {}, "fixtures": {}}
    for test, (setup, rest) in _measured.items():
        known["tests"][test] = [max(setup, 0.0), rest, _shared_fixtures.get(test, [])]
    known["fixtures"].update(_fixture_seconds)
    partial = SECONDS_FILE.with_suffix(".tmp")
    partial.write_text(json.dumps(known, indent=0))
    partial.replace(SECONDS_FILE)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Costs:
    """What running a mutant's tests costs, from the statistics run.

    A test costs its own set-up, call and teardown seconds, plus the set-up of each shared
    fixture it uses (module, class, package or session scope) that no earlier test of the
    same mutant has set up."""

    def __init__(
        self,
        tests: Mapping[str, Sequence[Any]],
        fixtures: Mapping[str, float] | None = None,
    ) -> None:
        self.test = {test: float(entry[0]) + float(entry[1]) for test, entry in tests.items()}
        self.needs = {
            test: list(entry[2]) if len(entry) > 2 else [] for test, entry in tests.items()
        }
        self.fixture = dict(fixtures or {})

    def __bool__(self) -> bool:
        return bool(self.test)

    def of(self, test: str, ready: Collection[str]) -> float:
        """Seconds to run `test` once the shared fixtures in `ready` are set up."""
        extra = sum(self.fixture.get(f, 0.0) for f in self.needs.get(test, []) if f not in ready)
        return self.test.get(test, DEFAULT_SECONDS) + extra


def _file(test: str) -> str:
    """The test file of a node id."""
    return test.split("::")[0]


def _read_costs() -> Costs:
    """`Costs` from the seconds written above; from mutmut's call-only record (no set-up
    known) when they are missing; empty when neither is."""
    known = _read_json(SECONDS_FILE)
    if isinstance(known, dict) and known.get("tests"):
        return Costs(known["tests"], known.get("fixtures", {}))
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
    its cost counting the set-up of the shared fixtures it needs that are not set up yet; the
    first test always, then while the recorded seconds stay within `budget` (0: no limit).
    For tests that fail independently and cost what they cost alone, ``cost / chance``
    ascending is the order with the least expected seconds to the first failure. The chosen
    tests then run grouped by file, files in the order first chosen, so each module fixture
    is set up once (pytest tears a module's fixtures down when it moves to another file).
    Unknown tests cost ``DEFAULT_SECONDS`` and have chance ``PRIOR_CHANCE``."""
    left = list(dict.fromkeys(tests))
    chosen: list[str] = []
    ready: set[str] = set()
    spent = 0.0
    while left:
        best = min(left, key=lambda t: (costs.of(t, ready) / chance.get(t, PRIOR_CHANCE), t))
        cost = costs.of(best, ready)
        if budget and chosen and spent + cost > budget:
            break
        chosen.append(best)
        left.remove(best)
        ready.update(costs.needs.get(best, []))
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
    _cap_wall_clock(wall_cap(_test_budget()))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For a mutant, run the collected tests in planned order (pytest collects the node ids
    `pytest_configure` kept file by file, which can interleave). In the statistics run, note
    each test's shared fixtures."""
    if _phase() == "stats":
        _note_shared_fixtures(items)
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
