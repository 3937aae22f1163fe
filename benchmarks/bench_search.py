"""Benchmark: does the curriculum search find curricula that really are better? (issue 9)

    python benchmarks/bench_search.py RUNSET [--task WORKLOAD | --adam LR] [--random 20]
        [--seeds 3] [--evaluations 10000] [--seconds S] [--json out.json]

Fits `linear` on all recorded runs (and calibrates it), then searches curricula of the
recorded protocol's size with three settings, `--seeds` searches each:

* ``unsafe``: the search before issue 9: the simulator's plain prediction, no trust region,
  no fallback on recorded runs;
* ``trust-region``: the pessimistic objective inside the recorded per-step envelope;
* ``safe`` (the default of `simfluence optimize --runs`): the same, falling back on the best
  recorded curriculum when its actual outcome beats the found one's pessimistic objective.

Every found curriculum and `--random` new random curricula are actually trained (the workload
from the run set's manifest, or digits-mlp with Adam at `--adam LR`); printed per setting: the
predicted mean final test loss, its 90% interval, the actual one, whether the actual fell
inside, the share of random curricula it beats, and the search's statement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simfluence.counterfactual.search import optimize_curriculum
from simfluence.curricula import random_curriculum
from simfluence.recording.loop import torch_threads, train_on_curriculum
from simfluence.recording.tasks import task_for_runset
from simfluence.recording.validation import SEARCH_EVALUATIONS
from simfluence.runlog import load_runset
from simfluence.simulators import LinearSimulator

SETTINGS = {
    "unsafe": {"trust_region": False, "fallback": False},
    "trust-region": {"trust_region": True, "fallback": False},
    "safe": {"trust_region": True, "fallback": True},
}


def _task(args: argparse.Namespace, runs):  # type: ignore[no-untyped-def]
    if args.adam is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_adam import AdamDigitsMLP

        return AdamDigitsMLP()
    return task_for_runset(runs, args.task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runset")
    parser.add_argument("--task", default=None)
    parser.add_argument("--adam", type=float, default=None)
    parser.add_argument("--random", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--evaluations", type=int, default=SEARCH_EVALUATIONS, help="rollouts per search"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="also a time limit per search (opt-in)"
    )
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = load_runset(args.runset)
    config = runs.metadata["config"]
    task = _task(args, runs)
    pool, tests = task.prepare(config["pool"], config["tests"], config["seed"])
    model = task.make_model(config["seed"])
    start = time.perf_counter()
    sim = LinearSimulator(unseen="prior").fit(runs).calibrate(runs)
    seconds = time.perf_counter() - start
    print(f"{Path(args.runset).name}: linear fitted and calibrated in {seconds:.1f} s")

    def train(curriculum, seed: int) -> np.ndarray:  # type: ignore[no-untyped-def]
        with torch_threads(model, 1):
            run = train_on_curriculum(task, model, pool, tests, curriculum, config["lr"], seed)
        return run.losses

    def actual(curriculum, seed: int) -> float:  # type: ignore[no-untyped-def]
        return float(train(curriculum, seed)[-1].mean())

    rng = np.random.default_rng([7, 919])
    randoms = [
        random_curriculum(runs.train_ids, config["per_run"], config["batch"], config["epochs"], rng)
        for _ in range(args.random)
    ]
    random_runs = [train(c, k) for k, c in enumerate(randoms)]
    random_actual = np.array([r[-1].mean() for r in random_runs])
    simulated = sim.simulate_many(randoms, sim.initial_loss_)
    bands = [sim.interval_of(p) for p in simulated]
    coverage = float(
        np.mean(
            [
                ((t[1:] >= b.lower[1:]) & (t[1:] <= b.upper[1:])).mean()
                for t, b in zip(random_runs, bands, strict=True)
            ]
        )
    )
    inside = [
        bool(lo <= t[-1].mean() <= hi)
        for t, (lo, hi) in zip(
            random_runs,
            (sim.objective_interval(p, np.arange(p.shape[1])) for p in simulated),
            strict=True,
        )
    ]
    print(
        f"linear's 90% intervals on these random curricula: coverage {coverage:.3f} of (step, test)"
        f" points; mean final loss inside its interval for {sum(inside)} of {len(inside)}"
    )
    print(
        f"{args.random} random curricula, actually trained: mean {random_actual.mean():.4f}, "
        f"min {random_actual.min():.4f}, max {random_actual.max():.4f}"
    )
    report: dict = {
        "command": " ".join(sys.argv),
        "random_actual": random_actual.tolist(),
        "random_coverage_90": coverage,
        "random_mean_final_in_interval": inside,
        "settings": {},
    }
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        rows = []
        for seed in range(args.seeds):
            result = optimize_curriculum(
                sim,
                config["per_run"],
                config["batch"],
                config["epochs"],
                seed=seed,
                max_evaluations=args.evaluations,
                max_seconds=args.seconds,
                trust_region=setting["trust_region"],
                recorded=runs if setting["fallback"] else None,
            )
            predicted = result.predicted if setting["trust_region"] else result.unconstrained
            value = actual(result.curriculum, 1000 + seed)
            interval = result.interval
            row = {
                "seed": seed,
                "predicted": predicted,
                "interval": list(interval) if interval else None,
                "actual": value,
                "in_interval": bool(interval and interval[0] <= value <= interval[1]),
                "beats": float(np.mean(value < random_actual)),
                "gain_established": result.gain_established,
                "source": result.source,
                "statement": result.statement,
            }
            rows.append(row)
            print(
                f"  {name:<12} seed {seed}: predicted {predicted:.4f} "
                f"[{interval[0]:.4f}, {interval[1]:.4f}] actual {value:.4f} "
                f"(in interval: {row['in_interval']}), beats {100 * row['beats']:.0f}% of "
                f"random; {result.source}; gain established: {result.gain_established}"
            )
        report["settings"][name] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
