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

This module never imports torch or Ray at import time (the core stays light).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

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
RAY_HINT = "pip install 'simfluence[ray]'"
#: times Ray reruns a unit whose worker process or node died
RAY_RETRIES = 3
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


def _start_worker(threads: int, counter: Any, environment: dict[str, str] | None = None) -> None:
    """Initializer of every pool process: the parent's environment (a fork server's child
    would otherwise keep the server's), thread settings and slot number."""
    if environment is not None:
        os.environ.clear()
        os.environ.update(environment)
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:  # preloaded by the fork server: its thread pools are already sized
        torch.set_num_threads(threads)
    with counter.get_lock():
        os.environ[SLOT_VARIABLE] = str(counter.value)
        counter.value += 1


#: modules a fork server imports once for all its workers, when this process has them loaded
#: (workers of a recording or validation then start in a fraction of a second, not seconds)
PRELOAD = (
    "torch",
    "simfluence.recording.workers",
    "simfluence.recording.validation",
    "simfluence.recording.loo",
)
#: units handed to a `ProcessBackend`'s pool ahead, per worker (the rest wait in this process)
IN_FLIGHT = 2
#: times a `ProcessBackend` replaces its pool after a worker died, per `map_unordered`
PROCESS_RETRIES = 3


def _context(threads: int, preload: Sequence[str] | None = None) -> Any:
    """``forkserver`` where there is one (POSIX), preloading `preload` (default: what this
    process has loaded of `PRELOAD`); else ``spawn``. A forked child of the server never saw
    a torch thread start. The server is started once per process: the first call decides
    what it preloads."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    if preload is None:
        preload = [m for m in PRELOAD if m in sys.modules]
    context.set_forkserver_preload(["simfluence.backends", *preload])
    # the server (one per process, started once) imports torch with this thread environment
    # and this process's import path (Python 3.11's server does not apply it before preloading)
    from multiprocessing import forkserver

    server_environment = {variable: str(threads) for variable in THREAD_VARIABLES}
    server_environment["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with _environment(server_environment):
        forkserver.ensure_running()
    return context


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


@dataclass
class ProcessBackend:
    """`workers` local processes, each on `threads` threads (see module docstring).

    Warm workers: the processes are forked from a fork server that imported torch and
    simfluence's work units once (``spawn`` where there is no fork server), start on `start`
    or the first `map_unordered`, and stay up until `close` (or the end of a ``with`` block):
    every unit they are given reuses what they prepared (a recording's task, examples and
    initial model). A worker that dies (killed, out of memory) breaks the pool: a new one
    starts and the units not finished run again (units rewrite their own output from scratch),
    up to `PROCESS_RETRIES` times per call.
    """

    workers: int
    threads: int = 1
    name: str = field(init=False)
    parallelism: int = field(init=False)
    #: pools replaced after a worker died (all calls)
    restarts: int = field(default=0, init=False)
    _pool: ProcessPoolExecutor | None = field(default=None, init=False, repr=False)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _warming: threading.Thread | None = field(default=None, init=False, repr=False)
    #: workers of the current pool that have started (each takes the next slot number)
    _started: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 1:
            raise BackendError(
                f"workers and threads must be at least 1, got {self.workers} and {self.threads}"
            )
        self.name = f"process:{self.workers}"
        self.parallelism = self.workers

    def start(self, preload: Sequence[str] | None = None) -> None:
        """Start the worker processes now, in the background (a no-op when they run), so that
        they import while this process prepares. `preload`: modules the fork server imports
        for them (default: what this process has loaded of `PRELOAD`; `PRELOAD` itself when
        the work will need torch but this process has not imported it yet).

        Returns at once: starting the pool blocks for seconds (the resource tracker and the
        fork server start, and a worker is handed out only once the fork server has imported
        `preload`), so a thread does it while this process goes on. The first unit waits for
        the workers it needs, as it would have anyway."""
        if self._pool is None and self._warming is None:

            def warm() -> None:
                try:
                    pool = self._executor(preload)
                    for _ in range(self.workers):
                        pool.submit(int)
                except Exception:  # the first unit meets the error again and reports it
                    pass

            self._warming = threading.Thread(target=warm, name="simfluence-warm", daemon=True)
            self._warming.start()

    def _executor(self, preload: Sequence[str] | None = None) -> ProcessPoolExecutor:
        with self._pool_lock:  # `start`'s thread and the first unit may both get here
            if self._pool is None:
                context = _context(self.threads, preload)
                self._started = context.Value("i", 0)
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=context,
                    initializer=_start_worker,
                    initargs=(self.threads, self._started, dict(os.environ)),
                )
            return self._pool

    def map_unordered(
        self, work: Callable[[T], R], items: Sequence[T], here: Callable[[T], R] | None = None
    ) -> Iterator[tuple[int, R]]:
        """`here` (``work`` bound in this process): while the workers start, this process
        takes units from the back of the queue and runs them with it, so the seconds the
        workers take to start are not idle here."""
        todo = list(range(len(items)))
        for attempt in range(PROCESS_RETRIES + 1):
            failed: list[int] = []
            yield from self._map_once(work, items, todo, failed, here)
            if not failed:
                return
            self.close()  # a worker died: the pool is broken, start a new one
            self.restarts += 1
            todo = failed
            if attempt == PROCESS_RETRIES:
                break
        raise BackendError(
            f"{self.name}: a worker process died (killed, or out of memory) "
            f"{PROCESS_RETRIES + 1} times; finished units are kept, rerun to resume"
        )

    def _map_once(
        self,
        work: Callable[[T], R],
        items: Sequence[T],
        todo: list[int],
        failed: list[int],
        here: Callable[[T], R] | None,
    ) -> Iterator[tuple[int, R]]:
        """Run `todo` (positions of `items`); the positions lost to a dead worker go to
        `failed`.

        Units are handed to the pool a few at a time (`IN_FLIGHT` per worker), the next one as
        each finishes, so the rest stay here: `here` takes them from the back while the
        workers start (`_starting`), and none is ever submitted and then cancelled (Python
        3.11's pool, once broken, fails on a cancelled unit and leaves its workers running)."""
        queue = deque(todo)
        futures: dict[Future[R], int] = {}
        pending: set[Future[R]] = set()
        while here is not None and queue and self._warming is not None and self._warming.is_alive():
            k = queue.pop()  # `start`'s thread is still starting the fork server and the pool
            yield k, here(items[k])
        pool = self._executor()

        def refill() -> None:
            try:
                while queue and len(pending) < IN_FLIGHT * self.workers:
                    k = queue.popleft()
                    future = pool.submit(work, items[k])
                    futures[future] = k
                    pending.add(future)
            except BrokenProcessPool:
                failed.append(k)

        try:
            refill()
            while here is not None and queue and self._starting(pending):
                k = queue.pop()  # the workers are still starting: this one is run here
                yield k, here(items[k])
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                pending.difference_update(done)
                for future in sorted(done, key=futures.__getitem__):
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        failed.append(futures[future])
                        continue
                    yield futures[future], result
                if failed:  # the pool is broken: the units not handed out are lost too
                    failed += queue
                    queue.clear()
                refill()
            failed += queue  # not handed out: the pool broke at a submission
        finally:
            for future in pending:
                future.cancel()
        failed.sort()

    def _starting(self, pending: set[Future[R]]) -> bool:
        """Whether the pool's workers are still starting: not all of them have run their
        initializer, and none has finished a unit."""
        started = self._started.value if self._started is not None else self.workers
        return started < self.workers and not any(f.done() for f in pending)

    def close(self) -> None:
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ProcessBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RayBackend:
    """Every unit a Ray task (see module docstring).

    Parameters:
        address: a cluster to join (``auto``, ``ray://host:10001``...); None starts a local
            instance with `workers` CPUs (default: all cores), unless Ray is already running in
            this process (then that one is used as it is).
        threads: CPUs per unit (``num_cpus`` of each task, and its thread environment).
        gpus: GPUs per unit (``num_gpus``; 1 for ``--device cuda``).
        workers: CPUs of a local instance.
    """

    address: str | None = None
    threads: int = 1
    gpus: float = 0
    workers: int | None = None
    name: str = field(init=False)
    init_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.name = "ray" if self.address is None else f"ray:{self.address}"
        try:  # fail before any work is written, not when the first unit is submitted
            ray_missing = importlib.util.find_spec("ray") is None
        except ValueError:  # a stub module without a spec
            ray_missing = True
        if ray_missing or sys.modules.get("ray", ...) is None:
            raise BackendError(f"the {self.name} backend needs Ray: {RAY_HINT}")

    @property
    def parallelism(self) -> int:
        """Units that fit on the cluster at once (connects to Ray when asked)."""
        ray = self._ray()
        return max(1, int(ray.cluster_resources().get("CPU", 1)) // self.threads)

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise BackendError("the ray backend needs Ray: pip install 'simfluence[ray]'") from None
        if not ray.is_initialized():
            start = time.perf_counter()
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            environment = {variable: str(self.threads) for variable in THREAD_VARIABLES}
            local: dict[str, str] = {}
            if self.address is None:
                # a local instance inherits this environment (cheaper than a runtime_env,
                # which makes Ray start fresh workers for the job)
                options["num_cpus"] = self.workers or os.cpu_count() or 1
                local = environment
            else:
                options["address"] = self.address
                options["runtime_env"] = {"env_vars": environment}
            try:
                with _environment(local):
                    ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BackendError(f"{self.name}: cannot start or join Ray ({exc})") from None
            self.init_seconds = time.perf_counter() - start
        return ray

    def map_unordered(self, work: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[int, R]]:
        ray = self._ray()
        # a unit whose worker or node dies is retried (it rewrites its own files from scratch,
        # with the same result); an exception it raises is not
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, max_retries=RAY_RETRIES)(
            _call
        )
        refs = {remote.remote(work, item): k for k, item in enumerate(items)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause if isinstance(exc.cause, Exception) else None
                        if isinstance(cause, SimfluenceError):
                            raise cause from None
                        raise
                    yield refs[ref], result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        """Ray stays up for later calls in this process (`ray.shutdown` ends it)."""


def _call(work: Callable[[T], R], item: T) -> R:
    return work(item)


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
    "Backend",
    "BackendError",
    "ProcessBackend",
    "RayBackend",
    "SerialBackend",
    "close_backend",
    "make_backend",
    "shared_backend",
    "worker_slot",
]
