"""Benchmark: optimizer memory for Simfluence-Linear and the `auto` method (issue 23).

    python benchmarks/bench_adamw.py DIR [DIR ...] [--kernels none,adam,lr,adam+lr,0.5,0.8]
        [--methods mean,additive,hybrid,auto] [--json benchmarks/results/adamw-NAME.json]

Each DIR is a recorded run set (e.g. ``simfluence record DIR --task digits-mlp --optimizer
adamw --lr 0.01 --warmup 10 --schedule linear``, and ``simfluence features DIR`` for hybrid).
Every method is fitted on the runs the CLI's `evaluate` trains on (the last ``round(5 R / 32)``
runs held out) and scored on the held-out runs: all-steps MSE, final-step Spearman, the ratio
of all-steps MSE to the curriculum-blind ``mean``'s, and fit seconds. ``linear[K]`` is
Simfluence-Linear with ``memory=K`` (``linear[none]`` is today's ``linear``;
``linear[auto]`` chooses the kernel with ``l2`` by run-wise CV); a method of ``--methods`` may
name its kernel alike (``hybrid[auto]``, ``hybrid[0.8+lr]``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from simfluence.evaluation import evaluate
from simfluence.runlog import load_runset
from simfluence.simulators import LinearSimulator, make_simulator


def bench(directory: str, kernels: list[str], methods: list[str]) -> list[dict[str, object]]:
    runs = load_runset(directory)
    heldout = max(1, round(len(runs.runs) * 5 / 32))
    simulators = {f"linear[{k}]": LinearSimulator(memory=k) for k in kernels}
    for m in methods:  # "hybrid[auto]": a method with that memory kernel
        name, _, kernel = m.partition("[")
        params = {"memory": kernel.rstrip("]")} if kernel else {}
        simulators[m] = make_simulator(name, **params)
    rows = []
    for name, simulator in simulators.items():
        start = time.perf_counter()
        try:
            result = evaluate(runs, {name: simulator}, heldout, intervals=False)
        except Exception as exc:  # a method that cannot run here (e.g. hybrid without features)
            rows.append({"run_set": directory, "method": name, "error": str(exc)})
            continue
        scores = result.methods[name].scores
        fitted = result.methods[name].simulator
        chosen = ""
        if hasattr(fitted, "describe"):
            chosen = fitted.describe()
        elif getattr(fitted, "memory_", None) is not None:
            chosen = f"memory {fitted.describe_memory()}, l2 {fitted.l2_:g}"
        rows.append(
            {
                "run_set": directory,
                "method": name,
                "all_steps_mse": scores["all_steps_mse"],
                "final_spearman": scores["final_step_spearman"],
                "fit_seconds": scores["fit_seconds"],
                "seconds": time.perf_counter() - start,
                "chosen": chosen,
            }
        )
        print(f"  {name}: {rows[-1]['all_steps_mse']:.4f} {chosen}", flush=True)
    mean = next((r["all_steps_mse"] for r in rows if r["method"] == "mean"), None)
    for row in rows:
        if mean and "all_steps_mse" in row:
            row["ratio_to_mean"] = row["all_steps_mse"] / mean
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"{'run set':28s} {'method':18s} {'all-steps MSE':>13s} {'/ mean':>7s} "
        f"{'final Spearman':>14s} {'fit s':>7s}  chosen"
    ]
    for r in rows:
        name = Path(str(r["run_set"])).name
        if "error" in r:
            lines.append(f"{name:28s} {r['method']!s:18s} failed: {r['error']}")
            continue
        lines.append(
            f"{name:28s} {r['method']!s:18s} {r['all_steps_mse']:13.4f} "
            f"{r.get('ratio_to_mean', float('nan')):7.2f} {r['final_spearman']:14.3f} "
            f"{r['fit_seconds']:7.1f}  {r['chosen']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+")
    parser.add_argument("--kernels", default="none,adam,lr,adam+lr,0.5,0.8,0.8+lr,auto")
    parser.add_argument("--methods", default="mean,additive,hybrid,auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for directory in args.directories:
        print(directory, flush=True)
        rows += bench(
            directory,
            [k for k in args.kernels.split(",") if k],
            [m for m in args.methods.split(",") if m],
        )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
