"""How mutation testing (``make mutate``, mutmut) runs the test suite; inert otherwise.

mutmut sets ``MUTANT_UNDER_TEST``: ``"stats"`` in its statistics run (one full run that records
which tests reach which function), a mutant's name (``...__mutmut_N``) in the process it forks
for that mutant. These hooks, imported by ``conftest.py``:

* preload torch (one thread) in the process mutants are forked from;
* in the statistics run, time each test's set-up + call + teardown
  (``mutmut-test-seconds.json`` in mutmut's working copy; mutmut's own record counts the call
  only, and `validate`'s function-scoped fixtures spend seconds in set-up);
* for a mutant, order its tests cheapest first, one file at a time, and keep at most
  ``SIMFLUENCE_MUTANT_SECONDS`` of them (``make mutate`` sets it from ``MUTATE_SECONDS``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SECONDS_FILE = Path("mutmut-test-seconds.json")  # relative: mutmut runs tests in its copy
BUDGET_VARIABLE = "SIMFLUENCE_MUTANT_SECONDS"
_measured: dict[str, float] = {}
_recorded: dict[str, float] | None = None


def _phase() -> str:
    """What mutmut is doing in this process: "stats", a mutant's name, or "" (not mutmut)."""
    return os.environ.get("MUTANT_UNDER_TEST", "")


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
    """In mutmut's statistics run, add up each test's set-up, call and teardown seconds."""
    if _phase() == "stats":
        _measured[report.nodeid] = _measured.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the seconds measured above (merged into earlier ones: mutmut may re-run only
    the tests that changed), through a temporary file."""
    if _phase() != "stats" or not _measured:
        return
    try:
        known = json.loads(SECONDS_FILE.read_text())
    except (OSError, ValueError):
        known = {}
    known.update(_measured)
    partial = SECONDS_FILE.with_suffix(".tmp")
    partial.write_text(json.dumps(known, indent=0, sort_keys=True))
    partial.replace(SECONDS_FILE)


def _read_seconds() -> dict[str, float]:
    """The seconds written above, else mutmut's call-only record, else {}."""
    try:
        return json.loads(SECONDS_FILE.read_text())
    except (OSError, ValueError):
        pass
    try:
        return json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return {}


def _recorded_seconds() -> dict[str, float]:
    """`_read_seconds`, read once: the forked mutant processes inherit it."""
    global _recorded
    if not _recorded:
        _recorded = _read_seconds()
    return _recorded


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


def _within_budget(costs: list[float], budget: float) -> int:
    """How many of `costs` (in order) fit in `budget`: the first always, then while they fit."""
    spent, keep = 0.0, 0
    while keep < len(costs) and (keep == 0 or spent + costs[keep] <= budget):
        spent += costs[keep]
        keep += 1
    return keep


def _file(item: pytest.Item) -> str:
    """The test file of `item`, as its node id names it."""
    return item.nodeid.split("::")[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For a mutant, run its tests cheapest first, one test file at a time, and at most
    ``SIMFLUENCE_MUTANT_SECONDS`` of them (by their recorded time).

    mutmut passes a mutant's tests in set order and stops at the first failure: most mutants
    are killed by some quick test, so trying quick tests first ends most runs early, and
    keeping each file's tests together sets up its module fixtures once. The budget bounds what
    a surviving mutant costs: a core function is reached by a hundred tests (20 s), most of
    them end-to-end checks of something else; a mutant that the cheapest few seconds of them
    do not notice counts as a survivor (the score can only be lower for it, never higher)."""
    if "__mutmut_" not in _phase():
        return
    seconds = _recorded_seconds()
    if not seconds:
        return
    cost = {item.nodeid: seconds.get(item.nodeid, 1.0) for item in items}
    per_file: dict[str, float] = {}
    for item in items:
        per_file[_file(item)] = per_file.get(_file(item), 0.0) + cost[item.nodeid]
    items.sort(key=lambda item: (per_file[_file(item)], _file(item), cost[item.nodeid]))
    budget = _test_budget()
    keep = _within_budget([cost[item.nodeid] for item in items], budget) if budget else len(items)
    if keep < len(items):
        config.hook.pytest_deselected(items=items[keep:])
        del items[keep:]
