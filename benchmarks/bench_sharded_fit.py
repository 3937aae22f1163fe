"""Benchmark: Simfluence-Linear fitted in shards of test examples on an execution backend.

    python benchmarks/bench_sharded_fit.py DIR [--shards 8] [--backend process:2] \
        [--cv-tests 256] [--l2 X] [--tests M] [--compare-truth]

DIR is a run set, e.g. the issue's target written by
``simfluence synth DIR --pool 10000 --tests 2000 --runs 64 --per-run 400 --batch 4 --epochs 2``
(64 runs x 200 steps). Prints the fit's wall-clock seconds (loading excluded), the chosen
``l2``, the peak resident memory of this process *plus* its worker processes (sampled every
0.2 s: the sum over the process tree), and, with ``--compare-truth``, the all-steps MSE of 5
held-out runs next to the true parameters'. ``--tests M`` fits the first M test examples only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time

import numpy as np
import psutil

from simfluence import load_runset
from simfluence.metrics import all_steps_mse
from simfluence.simulators import LinearSimulator


class TreeMemory:
    """Peak of (resident memory of this process + all its descendants), sampled in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--backend", default="serial")
    parser.add_argument("--cv-tests", type=int, default=None)
    parser.add_argument("--l2", type=float, default=None)
    parser.add_argument("--tests", type=int, default=None)
    parser.add_argument("--holdout", type=int, default=5)
    parser.add_argument("--compare-truth", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = load_runset(args.directory)
    if args.tests:
        runs = runs.select_tests(np.arange(args.tests))
    train, held = runs.split(args.holdout) if args.holdout else (runs, runs.subset([]))
    n_steps = train.runs[0].n_steps
    print(
        f"run set: pool {len(runs.train_ids)}, {len(runs.test_ids)} tests, {len(train.runs)} "
        f"training runs x {n_steps} steps ({len(held.runs)} held out); load average "
        f"{os.getloadavg()[0]:.2f} before the fit",
        flush=True,
    )
    sim = LinearSimulator(
        l2=args.l2,
        cv_tests=args.cv_tests,
        test_shards=args.shards,
        backend=args.backend,
        unseen="prior",
    )
    with TreeMemory() as memory:
        start = time.perf_counter()
        sim.fit(train)
        seconds = time.perf_counter() - start
    result = {
        "pool": len(runs.train_ids),
        "tests": len(runs.test_ids),
        "training_runs": len(train.runs),
        "steps": n_steps,
        "shards": args.shards,
        "backend": args.backend,
        "cv_tests": args.cv_tests,
        "fit_seconds": seconds,
        "l2": sim.l2_,
        "cv_mse": sim.cv_mse_,
        "cg_iterations": getattr(sim, "cg_iterations_", None),
        "peak_memory_gib": memory.peak / 2**30,
        "load_average_after": os.getloadavg()[0],
    }
    print(
        f"fit {seconds:.1f} s (shards {args.shards}, backend {args.backend}, cv_tests "
        f"{args.cv_tests}): l2 {sim.l2_}, CG iterations {result['cg_iterations']}; peak memory "
        f"(process tree) {result['peak_memory_gib']:.2f} GiB; load average "
        f"{result['load_average_after']:.2f} after",
        flush=True,
    )
    if args.compare_truth and held.runs:
        from simfluence.runlog.layout import TRUTH_FILE
        from simfluence.simulators.truth import TruthSimulator

        truth = TruthSimulator(path=os.path.join(args.directory, TRUTH_FILE))
        if args.tests:
            raise SystemExit("--compare-truth needs all test examples")
        truth.fit(train)
        observed = [r.losses for r in held.runs]
        for name, model in [("linear", sim), ("truth", truth)]:
            predicted = model.simulate_many(
                [r.curriculum for r in held.runs], np.stack([r.initial_loss for r in held.runs])
            )
            result[f"{name}_heldout_mse"] = all_steps_mse(observed, predicted).mean
            print(f"held-out all-steps MSE, {name}: {result[f'{name}_heldout_mse']:.4g}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
