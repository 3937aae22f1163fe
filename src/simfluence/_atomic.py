"""Atomic file writes: write a temporary file next to the target, then rename over it.

A write that fails for the file system (full disk, read-only directory, no permission, quota)
raises `SimfluenceError` naming the file and the reason, which the command line prints as one
line (exit status 2); the target is left as it was and the temporary file removed, so a
recording interrupted that way resumes once there is room.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from simfluence.errors import SimfluenceError

#: the temporary file of a write to ``NAME`` is ``.NAME.XXXXXXXX.tmp`` in the same folder
TEMPORARY_SUFFIX = ".tmp"
#: a glob for the temporary files an interrupted write left behind
TEMPORARY_GLOB = f".*{TEMPORARY_SUFFIX}"


def write_error(path: str | os.PathLike[str], exc: OSError) -> SimfluenceError:
    """The one-line error of a failed write of `path` (e.g. "No space left on device")."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return SimfluenceError(f"{path}: cannot write: {reason}")


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success.

    Readers never see a half-written file: on any exception the temporary file is removed and
    the target is left as it was. An `OSError` while creating, writing or renaming the file
    (a full disk, a read-only directory) becomes a `SimfluenceError` naming `target`.
    """
    target = Path(target)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent
        )
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as exc:
        raise write_error(target, exc) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: str | os.PathLike[str], obj: Any, **kwargs: Any) -> None:
    """Write `obj` as indented JSON to `target` atomically."""
    write_text_atomic(target, json.dumps(obj, indent=2, **kwargs) + "\n")


def write_with(target: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and rename the result onto `target`."""
    with atomic_path(target) as tmp:
        writer(tmp)


def save_npz_atomic(target: str | os.PathLike[str], **arrays: Any) -> None:
    """`numpy.savez` to `target` atomically (the exact file name is kept: no ``.npz`` added)."""
    import numpy as np

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    write_with(target, writer)
