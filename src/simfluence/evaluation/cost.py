"""What an answer cost: wall time and peak resident memory of a block (no torch import)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["measure_cost"]


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the high-water mark (never goes down)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def measure_cost(into: dict[str, float]) -> Iterator[dict[str, float]]:
    """Fill `into` with ``seconds`` (wall) and ``peak_rss_mb`` (peak resident memory above the
    level at the start, sampled every 5 ms by a thread) of the block."""
    start_rss, peak = _rss_mb(), [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield into
    finally:
        done.set()
        sampler.join()
        into["seconds"] = time.perf_counter() - started
        into["peak_rss_mb"] = max(0.0, max(peak[0], _rss_mb()) - start_rss)
