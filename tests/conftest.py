"""Shared test helpers.

`missing_component` is how a test that needs something CI installs (Chromium, an optional
package of the dev/record/workloads extras) reacts when it is absent: on a developer's machine it
skips with the install command as the reason; in CI (``CI=true``, which CI runners set) it
*fails*, so a broken install step cannot turn into a silently skipped test.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """True when the environment says it is a CI run (``CI`` set to true/1/yes)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_component(reason: str) -> None:
    """Skip the calling test (fail it under CI) because a component it needs is missing."""
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, install: str) -> object:
    """Import `name`, or skip (fail under CI) naming the `install` command; usable at module
    level."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        reason = f"{name} is not installed ({install})"
        if in_ci():
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def _preload_torch_optimizers() -> None:
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
    _preload_torch_optimizers()


_TEST_SECONDS: dict[str, float] | None = None
_SECONDS_FILE = "mutmut-test-seconds.json"  # in mutmut's working copy (its cwd)
_MEASURED: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In mutmut's statistics run, add up each test's set-up, call and teardown seconds.

    mutmut's own record counts the call only; a test whose function-scoped fixture runs
    `validate` spends seconds in set-up, which the budget and the order below must see."""
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        _MEASURED[report.nodeid] = _MEASURED.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the seconds measured above (merged into earlier ones: mutmut may re-run only
    the tests that changed), through a temporary file."""
    if os.environ.get("MUTANT_UNDER_TEST") != "stats" or not _MEASURED:
        return
    import json
    from pathlib import Path

    path = Path(_SECONDS_FILE)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known.update(_MEASURED)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(known, indent=0, sort_keys=True))
    partial.replace(path)


def _recorded_test_seconds() -> dict[str, float]:
    """Each test's seconds as measured in mutmut's statistics run: set-up included when
    `pytest_runtest_logreport` could measure it, else mutmut's call-only record; {} if none."""
    global _TEST_SECONDS
    if _TEST_SECONDS is None:
        import json
        from pathlib import Path

        try:
            _TEST_SECONDS = json.loads(Path(_SECONDS_FILE).read_text())
        except (OSError, ValueError):
            try:
                stats = json.loads(Path("mutmut-stats.json").read_text())
                _TEST_SECONDS = stats["duration_by_test"]
            except (OSError, ValueError, KeyError):
                return {}
    return _TEST_SECONDS


def _test_budget() -> float:
    """``SIMFLUENCE_MUTANT_SECONDS``: the recorded test time one mutant may use (0: no limit)."""
    try:
        return max(float(os.environ.get("SIMFLUENCE_MUTANT_SECONDS", "0")), 0.0)
    except ValueError:
        return 0.0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut, run a mutant's tests cheapest first, one test file at a time, and at most
    ``SIMFLUENCE_MUTANT_SECONDS`` of them (by their recorded time; ``make mutate`` sets it).

    mutmut passes a mutant's tests in set order and stops at the first failure: most mutants
    are killed by some quick test, so trying quick tests first ends most runs early, and
    keeping each file's tests together sets up its module fixtures once. The budget bounds what
    a surviving mutant costs: a core function is reached by a hundred tests (20 s), most of
    them end-to-end checks of something else; a mutant that the cheapest few seconds of them
    do not notice counts as a survivor (the score can only be lower for it, never higher)."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    seconds = _recorded_test_seconds()
    if not seconds:
        return
    cost = {item.nodeid: seconds.get(item.nodeid, 1.0) for item in items}
    per_file: dict[str, float] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        per_file[path] = per_file.get(path, 0.0) + cost[item.nodeid]

    def order(item: pytest.Item) -> tuple[float, str, float]:
        path = item.nodeid.split("::")[0]
        return per_file[path], path, cost[item.nodeid]

    items.sort(key=order)
    budget = _test_budget()
    if budget:
        spent, keep = 0.0, 0
        while keep < len(items) and (keep == 0 or spent + cost[items[keep].nodeid] <= budget):
            spent += cost[items[keep].nodeid]
            keep += 1
        if keep < len(items):
            config.hook.pytest_deselected(items=items[keep:])
            del items[keep:]
