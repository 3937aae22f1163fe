"""Whether simfluence may import the task code a run set's manifest names.

A run set's manifest stores the reference of the task that recorded it (``task_spec.ref``:
``path/to/file.py:Class`` or ``package.module:Class``) so later commands can rebuild the task.
Importing that reference runs its code, and a run set is data that may come from anyone. The
rules, decided here and only here (`check_task_trusted`):

* imported without asking: a built-in workload, an installed plugin (an entry point in the
  group ``simfluence.tasks``, by name or by its ``module:Class``), a reference into simfluence
  itself, a module already imported in this process (importing it again runs nothing), and a
  reference the user names on this command line (``--task``);
* a reference that comes from a manifest otherwise needs the user's consent: ``--trust-task``
  (`trusting_tasks` around a library call, or ``trust=True``), the environment variable
  ``SIMFLUENCE_TRUST_TASK=1``, or an entry in the user's allow-list
  (``$SIMFLUENCE_CONFIG_DIR/trusted.json``, else ``$XDG_CONFIG_HOME/simfluence/trusted.json``,
  else ``~/.config/simfluence/trusted.json``);
* `simfluence record` adds the task it records from a file or module to the allow-list with
  the sha256 of the file's content (`remember_trusted`): the user's own run sets need nothing
  more, and a file changed since asks again.

The allow-list is JSON: ``{"version": 1, "tasks": [{"ref": REF, "sha256": HEX, "file":
PATH}]}``; an entry without ``sha256`` (written by hand) trusts the reference whatever its file
holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from simfluence._resolve import file_module_name, is_file_reference, split_reference
from simfluence.errors import SimfluenceError

#: environment variable: set to 1 to trust every task reference a manifest names
TRUST_ENV = "SIMFLUENCE_TRUST_TASK"
#: environment variable: the folder of the user's configuration (tests point it elsewhere)
CONFIG_DIR_ENV = "SIMFLUENCE_CONFIG_DIR"
#: the allow-list's file name in the configuration folder
ALLOW_LIST = "trusted.json"
#: the entry-point group of installed task plugins (as `simfluence.recording.tasks`)
ENTRY_POINT_GROUP = "simfluence.tasks"
#: the command-line option that trusts a run set's task code
TRUST_OPTION = "--trust-task"

_TRUSTED: ContextVar[bool] = ContextVar("simfluence_trust_task", default=False)

Source = Literal["manifest", "command-line"]


@contextlib.contextmanager
def trusting_tasks(enabled: bool = True) -> Iterator[None]:
    """Within the block, task references from manifests are trusted (``--trust-task``) when
    `enabled`; the command line wraps each command in it."""
    token = _TRUSTED.set(bool(enabled) or _TRUSTED.get())
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def config_dir() -> Path:
    """The user's simfluence configuration folder (`CONFIG_DIR_ENV`, XDG, ``~/.config``)."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "simfluence"


def allow_list_path() -> Path:
    """The allow-list of trusted task references (``trusted.json`` in `config_dir`)."""
    return config_dir() / ALLOW_LIST


def _env_trusts() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# -- what a reference is ----------------------------------------------------------------------
def needs_consent(ref: str) -> bool:
    """Whether importing `ref` (from a manifest) can run code the user has not vouched for:
    False for built-in workloads, installed plugins, references into simfluence and modules
    already imported in this process (importing them again runs nothing)."""
    ref = str(ref).strip()
    if _installed(ref):
        return False
    where, _ = split_reference(ref) or (ref, "")
    if is_file_reference(where):
        path = Path(where).expanduser()  # no such file: nothing to run (resolving fails)
        return path.is_file() and file_module_name(path) not in sys.modules
    return where not in sys.modules


def _installed(ref: str) -> bool:
    """A built-in workload, a plugin's name or ``module:Class``, or a reference into
    simfluence: code installed on this machine, never in a run set."""
    from simfluence.recording.workloads import WORKLOADS

    parts = split_reference(ref)
    if ref in WORKLOADS or parts is None:  # a built-in, or a plugin's name (entry point)
        return True
    where, _ = parts
    if is_file_reference(where):
        return False
    return where == "simfluence" or where.startswith("simfluence.") or ref in _plugin_values()


def _plugin_values() -> set[str]:
    return {str(ep.value).replace(" ", "") for ep in entry_points(group=ENTRY_POINT_GROUP)}


def reference_file(ref: str) -> Path | None:
    """The file whose code `ref` runs: the ``.py`` file, or the file that defines the module,
    found without importing anything; None when there is none (no such file or module)."""
    parts = split_reference(str(ref).strip())
    if parts is None:
        return None
    where, _ = parts
    if is_file_reference(where):
        path = Path(where).expanduser()
        return path.resolve() if path.is_file() else None
    return _module_file(where)


def _module_file(name: str) -> Path | None:
    """The origin of module `name`, found by the import system's finders (nothing executed)."""
    search: list[str] | None = None
    spec = None
    parts = name.split(".")
    for i in range(len(parts)):
        fullname = ".".join(parts[: i + 1])
        loaded = sys.modules.get(fullname)
        if loaded is not None:
            spec = getattr(loaded, "__spec__", None)
        else:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                try:
                    spec = find(fullname, search)
                except Exception:  # a finder that cannot answer for this name
                    spec = None
                if spec is not None:
                    break
        if spec is None:
            return None
        if i < len(parts) - 1:
            locations = spec.submodule_search_locations
            if locations is None:
                return None
            search = list(locations)
    origin = getattr(spec, "origin", None)
    if not origin or origin in ("built-in", "frozen") or not os.path.isfile(origin):
        return None
    return Path(origin).resolve()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalize(ref: str) -> str:
    """A file reference with an absolute path (as manifests store it); others unchanged."""
    ref = str(ref).strip()
    parts = split_reference(ref)
    if parts is not None and is_file_reference(parts[0]):
        return f"{Path(parts[0]).expanduser().resolve()}:{parts[1]}"
    return ref


# -- the allow-list ---------------------------------------------------------------------------
def _read_allow_list(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SimfluenceError(f"allow-list {path}: not readable JSON ({exc})") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list) or not all(
        isinstance(t, dict) and isinstance(t.get("ref"), str) for t in tasks
    ):
        raise SimfluenceError(
            f'allow-list {path}: expected {{"version": 1, "tasks": [{{"ref": ..., "sha256": '
            "...}, ...]}"
        )
    return tasks


def _allowed(ref: str) -> tuple[bool, bool]:
    """(trusted by the allow-list, listed but its file changed since)."""
    entries = [e for e in _read_allow_list(allow_list_path()) if _normalize(e["ref"]) == ref]
    if not entries:
        return False, False
    if any(e.get("sha256") is None for e in entries):
        return True, False
    file = reference_file(ref)
    if file is None:
        return False, True
    digest = file_sha256(file)
    return any(e.get("sha256") == digest for e in entries), True


def remember_trusted(ref: str) -> bool:
    """Add `ref` with its file's sha256 to the user's allow-list (what `simfluence record`
    does for a task it records from a file or module). Nothing to do (False) for references
    that need no consent or have no file; False too when the allow-list cannot be written (a
    read-only home): later commands then ask for ``--trust-task``."""
    ref = _normalize(ref)
    if _installed(ref):
        return False
    file = reference_file(ref)
    if file is None:
        return False
    path = allow_list_path()
    try:
        entries = _read_allow_list(path)
    except SimfluenceError:
        return False  # a malformed allow-list the user wrote is left alone
    digest = file_sha256(file)
    kept = [e for e in entries if _normalize(e["ref"]) != ref or e.get("sha256") is None]
    if any(_normalize(e["ref"]) == ref for e in kept):
        return True  # the user trusts it whatever the content
    kept.append({"ref": ref, "sha256": digest, "file": str(file)})
    from simfluence._atomic import write_json_atomic

    try:
        write_json_atomic(path, {"version": 1, "tasks": kept})
    except OSError:
        return False
    return True


# -- the decision -----------------------------------------------------------------------------
def check_task_trusted(
    ref: str, source: Source = "manifest", trust: bool = False, where: str | None = None
) -> None:
    """Return when simfluence may import the task reference `ref`; raise otherwise.

    `source`: where the reference comes from: ``"command-line"`` (the user named it: always
    allowed) or ``"manifest"`` (a run set's: see the module docstring). `trust`: the caller's
    explicit consent (``--trust-task``). `where` names the run set in the error.

    Raises `SimfluenceError`, one line: the reference, why it is not trusted, and how to opt in.
    """
    if source == "command-line" or trust or _TRUSTED.get() or _env_trusts():
        return
    ref = str(ref).strip()
    if not needs_consent(ref):
        return
    normalized = _normalize(ref)
    allowed, changed = _allowed(normalized)
    if allowed:
        return
    why = (
        "changed since it was trusted on this machine"
        if changed
        else "was not recorded or trusted on this machine"
    )
    kind = "file" if is_file_reference((split_reference(ref) or ("", ""))[0]) else "module"
    prefix = f"{where}: " if where else ""
    raise SimfluenceError(
        f"{prefix}its manifest names task code {ref!r} (a {kind}), which {why}; importing it "
        f"would run that code. If you trust this run set, pass {TRUST_OPTION} (or set "
        f"{TRUST_ENV}=1, or add the reference to {allow_list_path()}); or pass --task REF to "
        "name the task yourself (see docs/security.md)"
    )
