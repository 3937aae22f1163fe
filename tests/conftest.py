"""Shared test helpers.

`missing_component` is how a test that needs something CI installs (Chromium, an optional
package of the dev/record/workloads extras) reacts when it is absent: on a developer's machine it
skips with the install command as the reason; in CI (``CI=true``, which CI runners set) it
*fails*, so a broken install step cannot turn into a silently skipped test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

# mutation testing's hooks (test order, budget, timing), found here by name: their own module
from mutation_plugin import (
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_fixture_setup,
    pytest_runtest_logreport,
    pytest_runtest_logstart,
    pytest_sessionfinish,
)

# generated hostile input (tests/test_hostile_input.py): 200 examples per property in the
# normal suite; `make fuzz` (SIMFLUENCE_FUZZ=1, or --hypothesis-profile=fuzz) runs 10,000
settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile("fuzz", max_examples=10_000, deadline=None)
settings.load_profile("fuzz" if os.environ.get("SIMFLUENCE_FUZZ") else "default")


@pytest.fixture(scope="session", autouse=True)
def _private_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests (and the commands they run in subprocesses) never read or write the user's
    configuration, e.g. the task allow-list of `simfluence.trust`: the session gets its own
    (session-scoped so that module-scoped fixtures get it too)."""
    saved = {k: os.environ.get(k) for k in ("SIMFLUENCE_CONFIG_DIR", "SIMFLUENCE_TRUST_TASK")}
    os.environ["SIMFLUENCE_CONFIG_DIR"] = str(tmp_path_factory.mktemp("config"))
    os.environ.pop("SIMFLUENCE_TRUST_TASK", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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


__all__ = [
    "in_ci",
    "missing_component",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_fixture_setup",
    "pytest_runtest_logreport",
    "pytest_runtest_logstart",
    "pytest_sessionfinish",
    "require_module",
]
