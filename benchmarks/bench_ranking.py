"""Benchmark: how Simfluence-Linear's fitting choices trade all-steps MSE for final-step ranking.

    python benchmarks/bench_ranking.py RUNSET [RUNSET ...] [--holdout 5]
        [--variants linear,p0.5,p1,p2,log,mean] [--json OUT]

For every run set, holds out the last H runs by id, fits each variant on the rest, and prints
all-steps MSE, final-step MSE, final-step Spearman and fit seconds. Variants:

* ``linear``: the default `LinearSimulator`;
* ``pX``: `LinearSimulator(loss_power=X)`, each step's squared error weighted by
  ``(L_{t-1} + c)^-X`` (small losses fitted more precisely);
* ``log``: Simfluence-Linear fitted and rolled out on ``log L`` (positive by construction);
* ``blend``: `BlendSimulator` (``linear-blend``): per test example, a blend of ``linear``,
  ``log`` and ``mean`` with weights on the simplex fitted on cross-validated rollouts;
* ``bag8``: the mean rollout of 8 fits on bootstrap resamples of the training runs (``l2``
  from the default fit);
* ``mean``: the curriculum-blind mean trajectory.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from simfluence.evaluation import score
from simfluence.runlog import RunSet, load_runset
from simfluence.simulators import BlendSimulator, LinearSimulator, MeanTrajectorySimulator
from simfluence.simulators.blend import LOG_FLOOR_SHARE, log_runs


def log_variant(train: RunSet, curricula, initial):  # type: ignore[no-untyped-def]
    """`linear` fitted and rolled out on ``log L`` (the floor `linear-blend` uses)."""
    floor = LOG_FLOOR_SHARE * min(float(r.losses[r.losses > 0].min()) for r in train.runs)
    sim = LinearSimulator(unseen="prior").fit(log_runs(train, floor))
    logged = np.log(np.maximum(initial, floor))
    return [np.exp(s) for s in sim.simulate_many(curricula, logged)]


def bagged(train: RunSet, curricula, initial, n_bags: int = 8):  # type: ignore[no-untyped-def]
    l2 = LinearSimulator(unseen="prior").fit(train).l2_
    rng = np.random.default_rng(0)
    outs = []
    for _ in range(n_bags):
        pick = rng.choice(len(train.runs), len(train.runs), replace=True)
        runs = [replace(train.runs[k], run_id=f"bag-{n}") for n, k in enumerate(pick)]
        sample = RunSet(train.train_ids, train.test_ids, runs, train.metadata)
        outs.append(
            LinearSimulator(l2=l2, unseen="prior").fit(sample).simulate_many(curricula, initial)
        )
    return [np.mean(z, axis=0) for z in zip(*outs, strict=True)]


def rollouts(name: str, train: RunSet, curricula, initial):  # type: ignore[no-untyped-def]
    if name == "log":
        return log_variant(train, curricula, initial)
    if name == "bag8":
        return bagged(train, curricula, initial)
    if name == "mean":
        sim = MeanTrajectorySimulator().fit(train)
    elif name == "blend":
        sim = BlendSimulator(unseen="prior").fit(train)
    elif name == "linear":
        sim = LinearSimulator(unseen="prior").fit(train)
    elif name.startswith("p"):
        sim = LinearSimulator(unseen="prior", loss_power=float(name[1:])).fit(train)
    else:
        raise SystemExit(f"unknown variant {name!r}")
    return sim.simulate_many(curricula, initial)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runsets", nargs="+", type=Path)
    parser.add_argument("--holdout", type=int, default=5)
    parser.add_argument("--variants", default="linear,p0.5,p1,p2,log,blend,bag8,mean")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    print("| run set | variant | all-steps MSE | final-step MSE | final-step Spearman | fit s |")
    print("|---|---|---|---|---|---|")
    for path in args.runsets:
        train, held = load_runset(path).split(args.holdout)
        curricula = [r.curriculum for r in held.runs]
        initial = np.stack([r.initial_loss for r in held.runs])
        true = [r.losses for r in held.runs]
        results[str(path)] = {}
        for name in args.variants.split(","):
            start = time.perf_counter()
            simulated = rollouts(name, train, curricula, initial)
            s = score(true, simulated) | {"seconds": time.perf_counter() - start}
            results[str(path)][name] = s
            print(
                f"| {path.name} | `{name}` | {s['all_steps_mse']:.4g} | {s['final_step_mse']:.4g} "
                f"| {s['final_step_spearman']:.3f} | {s['seconds']:.1f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
