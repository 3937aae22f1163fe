"""Task references: name a `Task` on the command line, store it in a run set, rebuild it later.

A **task reference** is one of, tried in this order:

1. a built-in workload name: ``digits-mlp``, ``newsgroups-minilm``, ``smollm2-polarity``;
2. ``package.module:ClassName`` (an importable module) or ``path/to/file.py:ClassName`` (a file,
   executed as a module under a private name, so ``if __name__ == "__main__":`` blocks do not
   run);
3. the name of an installed plugin: an entry point in the group ``simfluence.tasks`` (loaded only
   when named), declared in the plugin's ``pyproject.toml`` as::

       [project.entry-points."simfluence.tasks"]
       my-task = "my_package.tasks:MyTask"

A task's constructor arguments are read back scikit-learn style: every parameter of
``__init__`` must be stored unchanged as an attribute of the same name, and be JSON-able
(paths are stored as strings). `record_runs` stores ``{"ref", "kwargs"}``
(`task_reference`) in the run set's manifest (``metadata["task_spec"]``), so that
`task_for_runset` rebuilds the same task in any later process: `evaluate`, `validate`, `fit`
and the gradient methods find it without being told.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from simfluence._resolve import (
    FILE_MODULE_PREFIX,
    is_file_reference,
    load_reference,
    split_reference,
)
from simfluence.errors import SimfluenceError
from simfluence.recording.task import Examples, Task
from simfluence.recording.workloads import WORKLOADS
from simfluence.runlog.runs import RunSet
from simfluence.trust import check_task_trusted

#: the entry-point group through which installed packages offer tasks
ENTRY_POINT_GROUP = "simfluence.tasks"
#: the manifest key (under ``metadata``) that holds the task reference of a recording
SPEC_KEY = "task_spec"


def task_label(task: Task | type[Task]) -> str:
    """The task's command-line name (``task.name``), or its class name when it has none."""
    cls = task if isinstance(task, type) else type(task)
    return cls.name or cls.__name__


def resolve_task_class(ref: str) -> type[Task]:
    """The `Task` subclass that `ref` names (see the module docstring for the forms).

    Raises `SimfluenceError`, one line naming `ref`: unknown name, module or file not found
    (with what to install), no such class, or not a `Task` subclass.
    """
    ref = str(ref).strip()
    if ref in WORKLOADS:
        cls: Any = WORKLOADS[ref]
    elif split_reference(ref) is not None:
        cls = load_reference(ref, "task")
    else:
        cls = _entry_point(ref)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        what = getattr(cls, "__qualname__", type(cls).__name__)
        raise SimfluenceError(
            f"task {ref!r}: {what} is not a subclass of simfluence.recording.Task"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise SimfluenceError(f"task {ref!r}: {cls.__name__} does not implement {missing}")
    return cls


def resolve_task(ref: str, kwargs: dict[str, Any] | None = None) -> Task:
    """A new `Task` from a reference: ``resolve_task_class(ref)(**kwargs)``.

    Raises `SimfluenceError` naming `ref` when it cannot be found or built with `kwargs`.
    """
    cls = resolve_task_class(ref)
    try:
        return cls(**(kwargs or {}))
    except (TypeError, ValueError) as exc:  # the constructor refused the arguments
        raise SimfluenceError(f"task {ref!r}: cannot be built with {kwargs or {}}: {exc}") from None


def _entry_point(name: str) -> Any:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        plugins = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
        raise SimfluenceError(
            f"unknown task {name!r}: not a built-in workload ({', '.join(sorted(WORKLOADS))}), "
            f"not an installed plugin (entry points {ENTRY_POINT_GROUP!r}: "
            f"{', '.join(plugins) or 'none'}), and not 'package.module:Class' or "
            "'path/to/file.py:Class'"
        )
    return load_reference(found[0].value, f"task {name!r} (plugin)")


# -- writing a reference ----------------------------------------------------------------------
def task_reference(task: Task, ref: str | None = None) -> dict[str, Any]:
    """``{"ref": ..., "kwargs": {...}}``: enough to rebuild `task` in another process.

    `ref` is the reference the task was made from (a file reference is made absolute); by
    default it is inferred from the class: its built-in name, ``module:Class``, or
    ``/abs/path/file.py:Class`` for a class defined in a file run as a script or loaded by
    path. ``kwargs`` are the constructor arguments, read from the attributes of the same name.

    Raises `SimfluenceError` saying why when the task cannot be rebuilt (a class defined inside
    a function, a constructor argument not stored as an attribute, or not JSON-able).
    """
    cls = type(task)
    ref = _normalize(ref) if ref is not None else _class_reference(cls)
    return {"ref": ref, "kwargs": constructor_arguments(task)}


def _normalize(ref: str) -> str:
    parts = split_reference(ref)
    if parts is not None and is_file_reference(parts[0]):
        return f"{Path(parts[0]).expanduser().resolve()}:{parts[1]}"
    return ref


def _class_reference(cls: type[Task]) -> str:
    if WORKLOADS.get(cls.name) is cls:
        return cls.name
    if "<locals>" in cls.__qualname__:
        raise SimfluenceError(
            f"task class {cls.__qualname__} is defined inside a function; define it at the top "
            "level of a module or file so it can be imported again"
        )
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if cls.__module__ == "__main__" or cls.__module__.startswith(FILE_MODULE_PREFIX):
        if not path:
            raise SimfluenceError(
                f"task class {cls.__qualname__} was defined interactively; put it in a .py file"
            )
        return f"{Path(path).resolve()}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def constructor_arguments(task: Task) -> dict[str, Any]:
    """The task's ``__init__`` arguments, read from its attributes (JSON-able values)."""
    cls = type(task)
    if cls.__init__ is object.__init__:
        return {}
    kwargs: dict[str, Any] = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise SimfluenceError(
                f"task {task_label(task)!r}: __init__ takes *{p.name}; list its arguments "
                "explicitly so they can be stored and the task rebuilt"
            )
        if not hasattr(task, p.name):
            raise SimfluenceError(
                f"task {task_label(task)!r}: the __init__ argument {p.name!r} is not stored as "
                f"self.{p.name}; store constructor arguments unchanged (as scikit-learn "
                "estimators do) so the task can be rebuilt"
            )
        value = getattr(task, p.name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        try:
            kwargs[p.name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            raise SimfluenceError(
                f"task {task_label(task)!r}: the __init__ argument {p.name}={value!r} is not "
                "JSON-able; pass numbers, strings, lists or dicts"
            ) from None
    return kwargs


# -- reading it back --------------------------------------------------------------------------
def task_for_runset(runs: RunSet, override: str | None = None, trust: bool = False) -> Task:
    """The task that recorded `runs`, rebuilt from its manifest.

    Uses ``metadata["task_spec"]`` (``{"ref", "kwargs"}``, written by `record_runs`); run sets
    recorded before that key existed name a built-in workload in ``config["workload"]``.
    `override` is another reference to the same task class (the file moved, the package was
    renamed): the recorded constructor arguments are kept; its name must match the recorded one.
    The manifest's reference is imported only when `simfluence.trust.check_task_trusted`
    allows it (`trust`: the caller's consent, ``--trust-task``).

    Raises `SimfluenceError` naming the run set and what to do: not recorded by
    `simfluence record`, task code not trusted (how to opt in), a task that cannot be imported
    (what to install), a mismatched override.
    """
    where = str(runs.source or "the run set")
    return task_from_metadata(runs.metadata or {}, where, override, trust)


def task_from_metadata(
    metadata: dict[str, Any], where: str, override: str | None = None, trust: bool = False
) -> Task:
    """`task_for_runset` from a manifest's ``metadata`` (`where` names it in errors)."""
    config = metadata.get("config") or {}
    spec = metadata.get(SPEC_KEY) or {}
    recorded = config.get("workload")
    kwargs = spec.get("kwargs") or {}
    if override:
        cls = resolve_task_class(override)
        if recorded and task_label(cls) != recorded:
            raise SimfluenceError(
                f"--task {override}: is task {task_label(cls)!r}, but {where} was recorded "
                f"with task {recorded!r}"
            )
        return resolve_task(override, kwargs)
    if not config or not recorded:
        raise SimfluenceError(
            f"{where}: was not recorded by `simfluence record` (its manifest names no task), "
            "so the model and examples cannot be rebuilt"
        )
    ref = spec.get("ref") or (recorded if not spec else None)
    if ref is None:
        reason = spec.get("reason", "no reference was stored")
        raise SimfluenceError(
            f"{where}: its task {recorded!r} cannot be rebuilt ({reason}); pass --task "
            "package.module:Class or path/to/file.py:Class"
        )
    check_task_trusted(ref, "manifest", trust, where)
    try:
        return resolve_task(ref, kwargs)
    except SimfluenceError as exc:
        raise SimfluenceError(
            f"{where}: {exc} (or pass --task REF to say where the task is)"
        ) from None


def prepare_for_runset(task: Task, runs: RunSet) -> tuple[Examples, Examples]:
    """``task.prepare`` with the run set's protocol, checked to rebuild its pool and test ids.

    Raises `SimfluenceError` naming the task when the ids differ (another version of the
    task's data, or another task) or `prepare` refuses the sizes.
    """
    config = runs.metadata.get("config") or {}
    try:
        pool, tests = task.prepare(config["pool"], config["tests"], config["seed"])
    except KeyError as exc:
        raise SimfluenceError(
            f"{runs.source or 'the run set'}: its manifest's config has no {exc.args[0]!r}"
        ) from None
    except ValueError as exc:
        if isinstance(exc, SimfluenceError):
            raise
        raise SimfluenceError(f"task {task_label(task)!r}: {exc}") from None
    if pool.ids != runs.train_ids or tests.ids != runs.test_ids:
        raise SimfluenceError(
            f"task {task_label(task)!r} rebuilt other pool/test ids than the run set's "
            f"manifest{f' ({runs.source})' if runs.source else ''}: was it recorded with "
            "another version of the task or its data?"
        )
    return pool, tests
