"""One writer per directory: an exclusive, non-blocking ``flock`` on a lock file.

The lock belongs to the open file, so the operating system releases it when the process that
holds it exits, however it exits (kill -9 included): a lock file left behind never blocks the
next writer. A second process that asks while the lock is held is refused at once with one line
naming the directory and the holder's process id. Where ``fcntl`` does not exist (Windows) no
lock is taken.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simfluence._atomic import write_error
from simfluence.errors import SimfluenceError


class LockedError(SimfluenceError):
    """Another process holds the lock of a directory."""


def _holder(fd: int) -> str:
    """The process id the holder wrote into the lock file ("" when unknown)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


@contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold the lock of `path` (created if missing) for the block, or raise `LockedError`:
    "`what`: another process (pid N) is writing to it ...". A lock file that cannot be created
    (a read-only directory) raises `SimfluenceError` naming it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            who = f"another process (pid {pid})" if pid else "another process"
            raise LockedError(
                f"{what}: {who} is writing to it; wait for it to finish (a process that died "
                f"releases it), or use another directory (lock: {path})"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:  # only informative (a full disk): the lock itself is held
            pass
        try:
            yield
        finally:
            # unlock explicitly: a forked worker sharing this open file keeps no lock behind
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
