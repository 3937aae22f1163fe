"""Shared test helpers.

`missing_component` is how a test that needs something CI installs (Chromium, an optional
package of the dev/record/workloads extras) reacts when it is absent: on a developer's machine it
skips with the install command as the reason; in CI (``CI=true``, which CI runners set) it
*fails*, so a broken install step cannot turn into a silently skipped test.
"""

from __future__ import annotations

import os

import pytest

# mutation testing's hooks (test order, budget, timing), found here by name: their own module
from mutation_plugin import (
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_fixture_setup,
    pytest_runtest_logreport,
    pytest_runtest_logstart,
    pytest_sessionfinish,
)


@pytest.fixture(autouse=True)
def _private_config_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Tests never read or write the user's configuration (the task allow-list,
    `simfluence.trust`): each test gets an empty one."""
    monkeypatch.setenv("SIMFLUENCE_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
    monkeypatch.delenv("SIMFLUENCE_TRUST_TASK", raising=False)


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
