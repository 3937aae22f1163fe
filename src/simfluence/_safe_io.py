"""Reading files that may be hostile: one-line errors naming the file, bounded memory.

Every reader of a user's file (run sets, GPTfluence folders, features, curricula, saved
simulators) either loads it or raises a `SimfluenceError` naming it: never another exception
type (tests/test_hostile_input.py generates the inputs). Two helpers here:

* `refuse_malformed`: a context manager that turns what malformed content makes the parsers
  raise (type, key, index, overflow, recursion, decoding, Arrow, zip errors) into the reader's
  own error, naming the file; a `SimfluenceError` passes through unchanged.
* `read_npz`: the arrays of an ``.npz`` file without pickle, each member's declared size
  checked against what the archive holds *before* anything is allocated: an array may not
  declare more bytes than its member stores (so a 1 kB file cannot ask for 8 TB), and the
  members together may not unpack to more than `NPZ_MAX_RATIO` times the file's size, or
  `NPZ_MIN_BUDGET` bytes if that is more (a zip bomb is refused).
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError

#: an .npz may unpack to at most this many times its size on disk ...
NPZ_MAX_RATIO = 64
#: ... or this many bytes, whichever is more
NPZ_MIN_BUDGET = 1 << 30

_MALFORMED: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    UnicodeError,
    EOFError,
    OSError,
    zipfile.BadZipFile,
    zlib.error,
)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow is a core dependency
        return ()
    return (pa.ArrowException,)


@contextmanager
def refuse_malformed(
    path: str | os.PathLike[str], error: type[SimfluenceError] = SimfluenceError
) -> Iterator[None]:
    """Within the block, an exception that malformed content of `path` causes becomes
    `error` (one line naming `path`); `SimfluenceError` and anything else pass through."""
    try:
        yield
    except SimfluenceError:
        raise
    except (*_MALFORMED, *_arrow_errors()) as exc:
        text = " ".join(str(exc).split())[:200]
        raise error(f"{path}: malformed ({type(exc).__name__}: {text})") from None


def loads_json(
    text: str | bytes, where: str, error: type[SimfluenceError] = SimfluenceError
) -> Any:
    """`json.loads`, with undecodable bytes, invalid or too deeply nested JSON as `error`
    naming `where`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        message = " ".join(str(exc).split())[:200]
        raise error(f"{where}: not valid JSON ({message})") from None


def read_npz(
    path: str | os.PathLike[str],
    error: type[SimfluenceError] = SimfluenceError,
    what: str = "a readable .npz file",
) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at `path` (``allow_pickle=False``), sizes checked first
    (see the module docstring). Raises `error` naming `path` (and saying it is not `what`
    when it is no archive) for anything else."""
    path = Path(path)
    with refuse_malformed(path, error):
        try:
            archive = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
            raise error(f"{path}: not {what} ({exc})") from None
        with archive:
            budget = max(NPZ_MIN_BUDGET, NPZ_MAX_RATIO * path.stat().st_size)
            total = sum(info.file_size for info in archive.infolist())
            if total > budget:
                raise error(
                    f"{path}: its members unpack to {total} bytes, more than {budget} "
                    f"({NPZ_MAX_RATIO} x the file's size, at least {NPZ_MIN_BUDGET})"
                )
            out: dict[str, np.ndarray] = {}
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                try:
                    out[name] = _read_member(archive, info, path, error)
                except (RuntimeError, NotImplementedError, EOFError, zipfile.BadZipFile) as exc:
                    member = info.filename
                    raise error(f"{path}: member {member!r} cannot be read ({exc})") from None
            return out


def _read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, error: type[SimfluenceError]
) -> np.ndarray:
    """One ``.npy`` member, its declared size checked against what the archive holds first."""
    with archive.open(info) as member:
        declared = _declared_bytes(member, path, info.filename, error)
        if declared > info.file_size:
            raise error(
                f"{path}: member {info.filename!r} declares {declared} bytes of data but holds "
                f"{info.file_size}"
            )
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _declared_bytes(member: Any, path: Path, name: str, error: type[SimfluenceError]) -> int:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise error(f"{path}: member {name!r} has .npy format version {version}")
    if dtype.hasobject:
        raise error(f"{path}: member {name!r} holds Python objects (pickle is never loaded)")
    count = 1
    for size in shape:
        count *= int(size)
    return count * dtype.itemsize
