"""``ray`` / ``ray:ADDRESS``: every unit a Ray task (see `simfluence.backends`). Ray itself is
imported only when a backend is used."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from simfluence.backends.base import THREAD_VARIABLES, BackendError, R, T, _environment
from simfluence.errors import SimfluenceError

RAY_HINT = "pip install 'simfluence[ray]'"
#: times Ray reruns a unit whose worker process or node died
RAY_RETRIES = 3


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
