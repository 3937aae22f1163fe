"""``process:N``: a pool of warm local worker processes (see `simfluence.backends`)."""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from simfluence.backends.base import (
    SLOT_VARIABLE,
    THREAD_VARIABLES,
    BackendError,
    R,
    T,
    _environment,
)


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


#: preloaded whenever this process has torch: a worker's first ``torch.optim`` optimizer
#: imports it (0.8 s in every worker), and a library call such as ``record_runs(...,
#: backend="process:2")`` starts its pool before this process has built an optimizer
WITH_TORCH = ("torch._dynamo",)
#: modules a fork server imports once for all its workers, when this process has them loaded
#: (workers of a recording or validation then start in a fraction of a second, not seconds)
PRELOAD = (
    "torch",
    *WITH_TORCH,
    "simfluence.recording.workers",
    "simfluence.recording.validation",
    "simfluence.recording.loo",
)
#: units handed to a `ProcessBackend`'s pool ahead, per worker (the rest wait in this process)
IN_FLIGHT = 2
#: times a `ProcessBackend` replaces its pool after a worker died, per `map_unordered`
PROCESS_RETRIES = 3


def _comes_with_torch(module: str) -> bool:
    return module in WITH_TORCH and "torch" in sys.modules


def _context(threads: int, preload: Sequence[str] | None = None) -> Any:
    """``forkserver`` where there is one (POSIX), preloading `preload` (default: what this
    process has loaded of `PRELOAD`, and `WITH_TORCH` when it has torch); else ``spawn``. A
    forked child of the server never saw a torch thread start. The server is started once per
    process: the first call decides what it preloads."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    if preload is None:
        preload = [m for m in PRELOAD if m in sys.modules or _comes_with_torch(m)]
    context.set_forkserver_preload(["simfluence.backends", *preload])
    # the server (one per process, started once) imports torch with this thread environment
    # and this process's import path (Python 3.11's server does not apply it before preloading)
    from multiprocessing import forkserver

    server_environment = {variable: str(threads) for variable in THREAD_VARIABLES}
    server_environment["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with _environment(server_environment):
        forkserver.ensure_running()
    return context


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
