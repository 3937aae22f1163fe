"""Benchmark: fit Simfluence-Linear at scale and measure simulation throughput.

    python benchmarks/bench_core.py [--pool 1000 --tests 500 --runs 32 --batch 8 --steps 96]

Prints fit seconds (cross-validation included), peak memory (resident set size of this process)
and simulation throughput in test-example-steps per second over 1000 random curricula: once
from id lists (end to end) and once from curricula already encoded with `encode`.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np

from simfluence.curricula import random_curriculum
from simfluence.simulators import LinearSimulator, rollout
from simfluence.synth import SynthConfig, generate


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--tests", type=int, default=500)
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--curricula", type=int, default=1000)
    args = parser.parse_args()
    per_run = args.steps // args.epochs * args.batch
    config = SynthConfig(
        pool=args.pool,
        tests=args.tests,
        runs=args.runs,
        per_run=per_run,
        batch=args.batch,
        epochs=args.epochs,
    )
    runs, _ = generate(config)
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(
        f"synthetic set: pool {args.pool}, {args.tests} tests, {args.runs} runs x "
        f"{runs.runs[0].n_steps} steps, batch {args.batch}"
    )
    base_rss = peak_rss_gib()
    start = time.perf_counter()
    sim = LinearSimulator().fit(runs)
    fit_seconds = time.perf_counter() - start
    print(
        f"fit linear (CV over {len(sim.cv_mse_)} l2 values x {sim.cv_folds} folds, "
        f"chose l2={sim.l2_:g}, final CG {sim.cg_iterations_} iterations): "
        f"{fit_seconds:.1f} s, peak memory {peak_rss_gib():.2f} GiB "
        f"(data alone {base_rss:.2f} GiB)"
    )
    rng = np.random.default_rng(1)
    curricula = [
        random_curriculum(runs.train_ids, per_run, args.batch, args.epochs, rng)
        for _ in range(args.curricula)
    ]
    initial = runs.runs[0].initial_loss
    work = sum(len(c) for c in curricula) * args.tests
    start = time.perf_counter()
    sim.simulate_many(curricula, initial)
    end_to_end = time.perf_counter() - start
    encoded = sim.encode(curricula)
    start = time.perf_counter()
    sim.simulate_encoded(encoded, initial)
    rollout_only = time.perf_counter() - start
    print(
        f"simulate {args.curricula} curricula: {work / end_to_end:.3g} test-example-steps/s "
        f"from id lists ({end_to_end:.2f} s), {work / rollout_only:.3g} from encoded "
        f"curricula ({rollout_only:.2f} s)"
    )
    start = time.perf_counter()
    rollout(encoded, sim.A_, sim.B_, np.broadcast_to(initial, (len(encoded), initial.size)))
    unfloored = time.perf_counter() - start
    print(
        f"  the same without the loss floor: {work / unfloored:.3g} ({unfloored:.2f} s): the "
        f"floor costs {100 * (rollout_only / unfloored - 1):+.0f}%"
    )
    start = time.perf_counter()
    sim.calibrate(runs)
    calibrate_seconds = time.perf_counter() - start
    print(
        f"calibrate predictive intervals (5 run-wise folds, l2 kept): {calibrate_seconds:.1f} s "
        f"= {calibrate_seconds / fit_seconds:.2f} x the fit, peak memory {peak_rss_gib():.2f} GiB"
    )
    start = time.perf_counter()
    sim.simulate_interval(curricula[:100], initial)
    print(f"  90% intervals of 100 curricula: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
