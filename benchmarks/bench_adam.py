"""Benchmark: a workload trained with Adam, recorded through the Python API (issue 9).

    python benchmarks/bench_adam.py [--lr 0.01] [--runs 32] [--validate 20] [--seeds 0,1]
        [--dir /tmp/adam-runs] [--json out.json]

The task is `digits-mlp` (an MLP 64-32-10 from scratch on scikit-learn's digits) with
``torch.optim.Adam`` instead of SGD: a `Task` subclass that overrides `make_optimizer`, which
`record_runs` and `validate` accept like any built-in workload. It records the default
protocol (32 runs x 96 steps, pool 200, 128 examples per run, batch 4, 3 epochs, 50 tests),
evaluates `linear`, `additive` and `mean` on 5 held-out runs (with their 90% intervals), then
trains `--validate` new random curricula and the same number of curricula found by
`simfluence optimize`'s search (trust region, pessimistic objective), once per validation
seed, and reports whether the search either beats most random curricula when actually
trained, or says that its predicted gain is within the uncertainty.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simfluence.counterfactual.search import optimize_curriculum
from simfluence.evaluation import evaluate, format_table
from simfluence.recording.protocol import RecordingProtocol
from simfluence.recording.record import record_runs
from simfluence.recording.validation import SEARCH_EVALUATIONS, validate
from simfluence.recording.workloads.digits_mlp import DigitsMLPTask
from simfluence.simulators import configure_simulator


class AdamDigitsMLP(DigitsMLPTask):
    """`digits-mlp` trained with Adam (default betas, no weight decay)."""

    name = "digits-mlp-adam"

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=lr)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "workload": self.name, "optimizer": "Adam"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--validate", type=int, default=20, help="curricula per kind")
    parser.add_argument("--seeds", default="0,1", help="validation seeds")
    parser.add_argument("--dir", default="adam-runs", help="where to record (resumable)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = AdamDigitsMLP()
    start = time.perf_counter()
    runs = record_runs(
        task,
        args.dir,
        RecordingProtocol(
            runs=args.runs, pool=200, per_run=128, tests=50, batch=4, epochs=3, lr=args.lr
        ),
        progress=False,
    )
    record_s = time.perf_counter() - start
    methods = ["linear", "additive", "mean"]
    result = evaluate(
        runs, {m: configure_simulator(m, defaults={"unseen": "prior"}) for m in methods}, 5
    )
    print(
        f"digits-mlp with Adam (lr {args.lr}), {len(runs.runs)} runs recorded in {record_s:.0f} s"
    )
    print(format_table(result))
    report: dict = {
        "command": " ".join(sys.argv),
        "lr": args.lr,
        "evaluation": result.to_json(),
        "validation": {},
    }
    for seed in [int(s) for s in args.seeds.split(",")]:
        sims = {m: configure_simulator(m, defaults={"unseen": "prior"}) for m in ("linear", "mean")}
        validation = validate(task, runs, sims, ["random", "optimized"], args.validate, seed)
        optimized = validation["optimized"]
        # the search's own verdict, as `simfluence optimize` prints it (same seed as the first
        # optimized curriculum of this validation)
        config = runs.metadata["config"]
        search = optimize_curriculum(
            sims["linear"],
            config["per_run"],
            config["batch"],
            config["epochs"],
            seed=seed * 1000,
            max_evaluations=SEARCH_EVALUATIONS,
            recorded=runs,
        )
        optimized["search_statement"] = search.statement
        optimized["gain_established"] = search.gain_established
        report["validation"][str(seed)] = validation
        randoms = np.array(optimized["random_mean_test_losses"])
        print(
            f"seed {seed}: optimized actual {optimized['actual_mean_test_loss']:.4f}, predicted "
            f"{optimized['predicted_mean_test_loss_in_trust_region']:.4f} "
            f"{optimized.get('predicted_interval_90')}, in interval "
            f"{optimized.get('actual_in_interval')}; random mean {randoms.mean():.4f} min "
            f"{randoms.min():.4f}; beats {100 * optimized['fraction_of_random_beaten']:.0f}%"
        )
        print(f"  search says: {search.statement}")
        for kind, block in validation["kinds"].items():
            s = block["methods"]["linear"]
            print(
                f"  {kind}: linear coverage_90 {s.get('coverage_90', float('nan')):.3f}, "
                f"mean final in interval {np.mean(s.get('mean_final_in_interval', [np.nan])):.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
