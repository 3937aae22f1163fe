"""Benchmark: what scoring adds to training (issue 25), without a reference recording.

    python benchmarks/bench_overhead.py [--workload smollm2-polarity] [--runs 2] [--repeats 1]
        [--json benchmarks/results/overhead-smollm2-polarity.json]

Trains `--runs` random curricula of the workload's default protocol, `--repeats` rounds, under
four loops, interleaved inside each round: plain training (scored once, at the end), full
scoring (every test example after every step: what a recording does), ``--score-every 10``
and ``--score-fraction 0.1``. Prints the median seconds per run of each, their ratio to plain
training (the overhead) and the share of a full recording spent scoring. `bench_sparse.py`
measures the same and, from a full recording, what scoring less costs in held-out error; this
one is for workloads too slow to record in full here (smollm2-polarity on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from simfluence.curricula import random_curriculum
from simfluence.recording import Scoring, train_on_curriculum
from simfluence.recording.loop import final_test_losses, torch_threads
from simfluence.recording.protocol import RecordingProtocol
from simfluence.recording.record import _prepared_examples
from simfluence.recording.workloads import get_workload

VARIANTS: dict[str, Scoring | None] = {
    "full": None,
    "every-10": Scoring(every=10),
    "fraction-0.1": Scoring(fraction=0.1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="smollm2-polarity")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    task = get_workload(args.workload)
    protocol = RecordingProtocol(checkpoints=[]).resolve(task)
    started = time.perf_counter()
    pool, tests = _prepared_examples(task, protocol)
    initial = task.make_model(protocol.seed)
    prepare_seconds = time.perf_counter() - started
    rng = np.random.default_rng(protocol.seed)
    curricula = [
        random_curriculum(pool.ids, protocol.per_run, protocol.batch, protocol.epochs, rng)
        for _ in range(args.runs)
    ]
    timings: dict[str, list[float]] = {name: [] for name in ["plain", *VARIANTS]}
    with torch_threads(initial):
        # one untimed pass of each loop first: lazy initialization is not training's cost
        final_test_losses(task, initial, pool, tests, curricula[0][:2], protocol.lr, 0)
        train_on_curriculum(task, initial, pool, tests, curricula[0][:2], protocol.lr, 0)
        for _ in range(args.repeats):
            for k, curriculum in enumerate(curricula):
                t0 = time.perf_counter()
                final_test_losses(task, initial, pool, tests, curriculum, protocol.lr, k)
                timings["plain"].append(time.perf_counter() - t0)
                for name, scoring in VARIANTS.items():
                    t0 = time.perf_counter()
                    train_on_curriculum(
                        task, initial, pool, tests, curriculum, protocol.lr, k, scoring=scoring
                    )
                    timings[name].append(time.perf_counter() - t0)
    per_run = {name: statistics.median(values) for name, values in timings.items()}
    plain = per_run["plain"]
    result = {
        "benchmark": "overhead",
        "workload": args.workload,
        "steps_per_run": len(curricula[0]),
        "tests": len(tests),
        "runs": args.runs,
        "repeats": args.repeats,
        "prepare_seconds": round(prepare_seconds, 1),
        "seconds_per_run": {k: round(v, 3) for k, v in per_run.items()},
        "overhead_over_plain": {k: round(v / plain, 2) for k, v in per_run.items()},
        "scoring_share_of_full_recording": round(1 - plain / per_run["full"], 3),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "note": "medians over runs x repeats on a 2-core CPU shared with other jobs",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
