"""The backends' shared pieces: the `Backend` protocol, its error, the serial backend, and the
thread environment a worker process (or Ray task) runs under. See `simfluence.backends`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from simfluence.errors import SimfluenceError

T = TypeVar("T")
R = TypeVar("R")

#: environment variables that bound the threads of torch, OpenMP and the BLAS libraries
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
#: set in every worker process of a `ProcessBackend`: its slot, ``0..N-1``
SLOT_VARIABLE = "SIMFLUENCE_WORKER_SLOT"


class BackendError(SimfluenceError):
    """A backend cannot be built or used (bad spec, Ray missing, a worker died)."""


class Backend(Protocol):
    """Runs ``work`` on every item; yields ``(position, result)`` as units finish."""

    #: how the backend describes itself in messages and JSON (``serial``, ``process:2``...)
    name: str
    #: units that run at the same time (1 for serial)
    parallelism: int
    #: torch/BLAS threads of each unit (None: the process's own setting)
    threads: int | None

    def map_unordered(
        self, work: Callable[[T], R], items: Sequence[T]
    ) -> Iterator[tuple[int, R]]: ...


def worker_slot() -> int | None:
    """This process's slot in a `ProcessBackend` pool (``0..N-1``), or None elsewhere."""
    value = os.environ.get(SLOT_VARIABLE)
    return None if value is None else int(value)


@dataclass
class SerialBackend:
    """Every unit in this process, in order (the default; `work` need not be picklable).

    `threads`: torch threads per unit, or None to leave the process's setting alone.
    """

    threads: int | None = None
    name: str = field(default="serial", init=False)
    parallelism: int = field(default=1, init=False)

    def map_unordered(self, work: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[int, R]]:
        for position, item in enumerate(items):
            yield position, work(item)


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in ``os.environ`` for the block (what starts a worker process reads
    them), the previous values (or their absence) restored afterwards."""
    saved = {variable: os.environ.get(variable) for variable in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
