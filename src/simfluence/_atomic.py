"""Atomic file writes: write a temporary file next to the target, then rename over it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: the temporary file of a write to ``NAME`` is ``.NAME.XXXXXXXX.tmp`` in the same folder
TEMPORARY_SUFFIX = ".tmp"
#: a glob for the temporary files an interrupted write left behind
TEMPORARY_GLOB = f".*{TEMPORARY_SUFFIX}"


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success.

    Readers never see a half-written file: on any exception the temporary file is removed and
    the target is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
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
