"""Execution backends: run independent work units one after another, in local processes, or on
a Ray cluster, behind one small protocol.

A *work unit* is a picklable callable ``work(item) -> result`` applied to every item of a list
(a run index to record, a curriculum to retrain, a shard of test examples to fit). Units never
share state: each writes its own file or returns its own result, and only the caller (the
parent process) writes shared files such as a run set's manifest (kronfluence's "main process
writes" rule; TRAK's one-file-per-model savers). Results come back as ``(position, result)``
pairs **in completion order**, so a caller can report progress and must order them itself.

Backends (`make_backend` parses the specs the command line builds):

* ``serial`` (default): in this process, in order. ``work`` need not be picklable.
* ``process:N``: a pool of ``N`` warm local processes, forked from a fork server that
  imported torch and simfluence's work units once (``spawn`` where there is none: a fresh
  interpreter each); no process ever forks a parent whose torch threads ran. Each process
  takes the parent's environment, sets its thread environment to
  `threads` (``OMP_NUM_THREADS`` and friends, so torch and BLAS use that many threads) and
  learns its slot number ``0..N-1`` (`worker_slot`), which spreads GPUs over workers.
* ``ray`` / ``ray:ADDRESS``: every unit is a Ray task (``num_cpus=threads``, ``num_gpus`` as
  asked). Without an address a local Ray instance is started (``num_cpus`` = `workers` or all
  cores); with one (``auto``, ``ray://host:10001``, ``host:6379``) the cluster is joined. Ray is
  imported only here, only then (``pip install 'simfluence[ray]'``); every node needs
  simfluence installed and, for recordings, the run-set directory on a shared file system.

The package never imports torch or Ray at import time (the core stays light): `base` holds the
protocol and the serial backend, `process` the pool, `ray_tasks` the Ray backend; this module
builds them from specs.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator, Sequence

from simfluence.backends.base import (
    SLOT_VARIABLE,
    THREAD_VARIABLES,
    Backend,
    BackendError,
    R,
    SerialBackend,
    T,
    worker_slot,
)
from simfluence.backends.process import PRELOAD, ProcessBackend
from simfluence.backends.ray_tasks import RAY_HINT, RayBackend


def map_units(
    backend: Backend,
    work: Callable[[T], R],
    items: Sequence[T],
    here: Callable[[T], R] | None = None,
) -> Iterator[tuple[int, R]]:
    """``backend.map_unordered(work, items)``; `here` (``work`` as it runs in this process,
    with the same results) goes to a backend that can use it: a `ProcessBackend` runs units
    with it while its workers start."""
    if here is not None and isinstance(backend, ProcessBackend):
        return backend.map_unordered(work, items, here)
    return backend.map_unordered(work, items)


def make_backend(
    spec: str | Backend | None = None,
    *,
    threads: int = 1,
    gpus: float = 0,
) -> Backend:
    """A backend from a spec: None or ``serial``, ``process:N``, ``ray`` or ``ray:ADDRESS``, or
    a backend object (returned as it is). `threads`: threads per unit (process and Ray);
    `gpus`: GPUs per Ray task.

    Raises `BackendError` naming the spec and the allowed forms.
    """
    if spec is None:
        return SerialBackend()
    if not isinstance(spec, str):
        return spec
    kind, _, argument = spec.partition(":")
    if kind == "serial" and not argument:
        return SerialBackend()
    if kind == "process":
        try:
            workers = int(argument)
        except ValueError:
            workers = 0
        if workers < 1:
            raise BackendError(f"backend {spec!r}: process:N needs a whole number N >= 1")
        return SerialBackend(threads) if workers == 1 else ProcessBackend(workers, threads)
    if kind == "ray":
        return RayBackend(argument or None, threads=threads, gpus=gpus)
    raise BackendError(f"unknown backend {spec!r}; use serial, process:N, ray or ray:ADDRESS")


#: `shared_backend`'s backends, by spec, kept up until the interpreter exits
_SHARED: dict[tuple[str, int], Backend] = {}


def shared_backend(spec: str, threads: int = 1) -> Backend:
    """`make_backend(spec)`, reused by every later call with the same spec in this process (a
    process pool stays warm between fits; closed when the interpreter exits). For callers that
    only hold a spec, such as a simulator's ``backend`` parameter."""
    key = (spec, threads)
    if key not in _SHARED:
        backend = make_backend(spec, threads=threads)
        if isinstance(backend, ProcessBackend):
            if not _SHARED:
                atexit.register(_close_shared)
            _SHARED[key] = backend
        return backend
    return _SHARED[key]


def _close_shared() -> None:
    for backend in _SHARED.values():
        close_backend(backend)
    _SHARED.clear()


def close_backend(backend: Backend) -> None:
    """Release a backend's processes (a no-op for serial and Ray)."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


__all__ = [
    "PRELOAD",
    "RAY_HINT",
    "SLOT_VARIABLE",
    "THREAD_VARIABLES",
    "Backend",
    "BackendError",
    "ProcessBackend",
    "RayBackend",
    "SerialBackend",
    "close_backend",
    "make_backend",
    "map_units",
    "shared_backend",
    "worker_slot",
]
