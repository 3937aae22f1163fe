"""The run-set directory of a recording: create its manifest, or resume the recording in it.

A recording's manifest (`simfluence.runlog.layout`) says it was made by `record_runs`
(``metadata["recorder"]``) and stores its config (the protocol and the optimizer), the task's
description and its reference (``metadata["task_spec"]``). Recording into a directory that
holds one resumes it: the config and the task must be the same (a mismatch is refused, naming
the first fields that differ), ``runs`` may grow, and the temporary files an interrupted
recording left behind are removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simfluence.errors import SimfluenceError
from simfluence.recording.protocol import config_difference
from simfluence.recording.tasks import SPEC_KEY
from simfluence.runlog import read_manifest, write_manifest
from simfluence.runlog.layout import LOCK_FILE, MANIFEST, manifest_path, stale_temporaries

#: ``metadata["recorder"]`` of the run sets `record_runs` makes (the name it had when it was
#: first written; kept so that older recordings resume)
RECORDER_NAME = "simfluence.recording.runner"


def recorded_metadata(directory: str | Path) -> dict[str, Any]:
    """The manifest metadata of the recording `record_runs` made in `directory`; {} when there is
    none (no manifest, an unreadable one, or a run set recorded otherwise)."""
    if not manifest_path(directory).is_file():
        return {}
    try:
        meta = read_manifest(directory).get("metadata") or {}
    except SimfluenceError:
        return {}
    return meta if meta.get("recorder") == RECORDER_NAME else {}


def recorded_config(directory: str | Path) -> dict[str, Any]:
    """The config (and ``runs``) `directory` was recorded with by `record_runs`; {} if none."""
    meta = recorded_metadata(directory)
    if not meta:
        return {}
    return {**(meta.get("config") or {}), "runs": meta.get("runs")}


def prepare_directory(
    directory: Path, train_ids: list[str], test_ids: list[str], metadata: dict[str, Any]
) -> None:
    """Create the manifest, or check that the existing one is this recording's."""
    if directory.exists() and not directory.is_dir():
        raise SimfluenceError(f"{directory}: exists and is not a directory")
    if not manifest_path(directory).is_file():
        if directory.is_dir() and any(p.name != LOCK_FILE for p in directory.iterdir()):
            raise SimfluenceError(
                f"{directory}: is not empty and has no {MANIFEST}; choose an empty or new directory"
            )
        write_manifest(directory, train_ids, test_ids, metadata)
        return
    manifest = read_manifest(directory)
    old = manifest.get("metadata", {})
    hint = "choose another directory, or rerun with the options it was recorded with"
    if old.get("recorder") != RECORDER_NAME:
        raise SimfluenceError(
            f"{directory}: holds a run set that was not recorded by `simfluence record`; {hint}"
        )
    old_config = old.get("config") or {}
    # recordings older than the optimizer key: compare what they recorded
    new_config = {
        k: v for k, v in metadata["config"].items() if k in old_config or k != "optimizer"
    }
    for key, before, now in (
        ("config", old_config, new_config),
        ("task", old.get("task"), metadata["task"]),
    ):
        if before != now:
            diffs = config_difference(before or {}, now)
            raise SimfluenceError(
                f"{directory}: holds a recording with a different {key} ({diffs}); {hint}"
            )
    if manifest["train_ids"] != train_ids or manifest["test_ids"] != test_ids:
        raise SimfluenceError(
            f"{directory}: its pool or test ids differ from this recording's; {hint}"
        )
    spec = _resumed_spec(directory, old.get(SPEC_KEY), metadata[SPEC_KEY], hint)
    if old.get("runs") != metadata["runs"] or old.get(SPEC_KEY) != spec:
        updated = {**old, "runs": metadata["runs"], SPEC_KEY: spec}
        write_manifest(directory, train_ids, test_ids, updated)
    remove_stale_temporaries(directory)


def _resumed_spec(
    directory: Path, old: dict[str, Any] | None, new: dict[str, Any], hint: str
) -> dict[str, Any]:
    """The task reference to keep when resuming: the newest one that works. The same class
    with other constructor arguments is another task; a changed reference (the file moved, a
    subclass) is judged by the task's name and description only."""
    same_class = old and old.get("ref") == new.get("ref") and new.get("kwargs") is not None
    if same_class and old.get("kwargs") != new["kwargs"]:
        raise SimfluenceError(
            f"{directory}: holds a recording of the task with other constructor arguments "
            f"({config_difference(old.get('kwargs') or {}, new['kwargs'])}); {hint}"
        )
    return new if new.get("ref") is not None or not old else old


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary files an interrupted (killed) recording left behind."""
    for tmp in stale_temporaries(directory):
        tmp.unlink(missing_ok=True)
