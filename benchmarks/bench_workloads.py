"""Benchmark: record a workload, evaluate every method on held-out runs, write the table.

    python benchmarks/bench_workloads.py --workload digits-mlp [--runs R] [--holdout H]
        [--methods ...] [--validate C] [--out benchmarks/results]

Records into ``OUT/<workload>/runs`` (resumable), with checkpoints at 4 evenly spaced steps for
the gradient methods, then writes ``OUT/<workload>.json`` (the `simfluence evaluate --json`
contract plus timings, machine and command) and ``OUT/<workload>.md`` (the table in the
paper's form). With ``--validate C`` it also trains C new curricula of each kind
(`simfluence validate`) and adds that table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from simfluence._atomic import write_json_atomic, write_text_atomic
from simfluence.evaluation import evaluate
from simfluence.plots import pick_test_examples, plot_method_grid
from simfluence.recording.features import ensure_features
from simfluence.recording.protocol import steps_per_run
from simfluence.recording.record import record_defaults
from simfluence.recording.tasks import resolve_task, task_label
from simfluence.simulators import configure_simulator
from simfluence.simulators.methods import DEMO_METHODS


def markdown_table(result: dict, methods: list[str]) -> str:  # type: ignore[type-arg]
    lines = [
        "| method | all-steps MSE | all-steps MAE | final-step MSE | final-step Spearman | fit s |",
        "|---|---|---|---|---|---|",
    ]
    for name in methods:
        s = result["methods"][name]
        lines.append(
            f"| `{name}` | {s['all_steps_mse']:.4g} ± {s['all_steps_mse_std']:.2g} "
            f"| {s['all_steps_mae']:.4g} ± {s['all_steps_mae_std']:.2g} "
            f"| {s['final_step_mse']:.4g} ± {s['final_step_mse_std']:.2g} "
            f"| {s['final_step_spearman']:.3f} ± {s['final_step_spearman_std']:.2f} "
            f"| {s['fit_seconds']:.1f} |"
        )
    return "\n".join(lines)


def validation_table(validation: dict) -> str:  # type: ignore[type-arg]
    kinds = list(validation["kinds"])
    methods = list(next(iter(validation["kinds"].values()))["methods"])
    header = "| method | " + " | ".join(f"{k}: MSE / Spearman / LDS" for k in kinds) + " |"
    lines = [header, "|---" * (len(kinds) + 1) + "|"]
    for name in methods:
        cells = []
        for kind in kinds:
            s = validation["kinds"][kind]["methods"][name]
            cells.append(
                f"{s['all_steps_mse']:.3g} / {s['final_step_spearman']:.2f} / {s['lds']:.2f}"
            )
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if "optimized" in validation:
        o = validation["optimized"]
        randoms = o["random_mean_test_losses"]
        lines.append("")
        lines.append(
            f"Optimized curriculum (searched with the first method): actual mean final test loss "
            f"{o['actual_mean_test_loss']:.4f} vs {len(randoms)} random curricula of the same "
            f"size: mean {sum(randoms) / len(randoms):.4f}, best {min(randoms):.4f}; it beats "
            f"{100 * o['fraction_of_random_beaten']:.0f}% of them."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload", "--task", default="digits-mlp", help="a built-in name or a task reference"
    )
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--holdout", type=int, default=5)
    parser.add_argument("--methods", default=",".join(DEMO_METHODS))
    parser.add_argument("--validate", type=int, default=0, help="curricula per kind (0: skip)")
    parser.add_argument("--kinds", default="random,leave-out,reorder,repeat,optimized")
    parser.add_argument("--validate-methods", default=None, help="default: --methods")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    task = resolve_task(args.workload)  # a built-in name or any task reference
    task_name = task_label(task)
    d = task.defaults
    runs_count = args.runs or d.runs
    steps = steps_per_run(d.per_run, d.batch, d.epochs)
    start = time.perf_counter()
    runs = record_defaults(task, out / task_name / "runs", runs_count)
    record_seconds = time.perf_counter() - start
    methods = args.methods.split(",")
    runs = ensure_features(out / task.name / "runs", runs, methods)
    simulators = {name: configure_simulator(name, defaults={"unseen": "prior"}) for name in methods}
    result = evaluate(runs, simulators, args.holdout, lambda items: tqdm(items, desc="methods"))
    payload = result.to_json()
    run = runs.run(result.heldout_runs[0])
    plot_method_grid(
        run.losses,
        {n: m.simulated[0] for n, m in result.methods.items()},
        runs.test_ids,
        pick_test_examples(run.losses, 4),
        f"{task_name}: held-out run {run.run_id}",
        out / f"{task_name}.png",
    )
    payload |= {
        "workload": task_name,
        "describe": task.describe(),
        "protocol": {
            "runs": runs_count,
            "pool": d.pool,
            "per_run": d.per_run,
            "tests": d.tests,
            "batch": d.batch,
            "epochs": d.epochs,
            "lr": d.lr,
            "steps": steps,
        },
        "record_seconds_this_invocation": record_seconds,
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "command": "python " + " ".join(sys.argv),
    }
    table = markdown_table(payload, methods)
    if args.validate:
        from simfluence.recording.validation import validate

        vmethods = (args.validate_methods or args.methods).split(",")
        vsims = {name: configure_simulator(name, defaults={"unseen": "prior"}) for name in vmethods}
        vstart = time.perf_counter()
        payload["validation"] = validate(
            task,
            runs,
            vsims,
            args.kinds.split(","),
            args.validate,
            progress=lambda items, total: tqdm(items, total=total, desc="validate"),
        )
        payload["validation"]["seconds"] = time.perf_counter() - vstart
        table += "\n\nValidation against real retraining:\n\n" + validation_table(
            payload["validation"]
        )
    write_json_atomic(out / f"{task_name}.json", payload)
    write_text_atomic(out / f"{task_name}.md", table + "\n")
    print(table)
    print(json.dumps({k: payload[k] for k in ("date", "machine", "command")}, indent=1))


if __name__ == "__main__":
    main()
