"""Cost of exact metagradients (`unrolled`) against one training run (not a test).

Usage::

    PYTHONPATH=src python benchmarks/bench_unrolled.py DIR --run run-0031 [--repeats 5]

Times, on the same recorded run of DIR (a run set recorded with a step-0 checkpoint), the median
of `--repeats` calls of: one training run as the recorder runs it (`train_on_curriculum`:
training plus scoring every test example after every step), the same training scored only at
the end (`final_test_losses`), and `run_metagradients` (replay, checks against the recording,
and the reverse pass for all test examples together). Prints the ratios and the replay error
(`--json FILE`: also writes them). The recorded optimizer, schedule and clipping are used.
"""

from __future__ import annotations

import argparse
import statistics
import time

from simfluence.attribution.replay import load_recorded_run
from simfluence.attribution.unrolled import unrolled_metagradients
from simfluence.recording.loop import final_test_losses, torch_threads, train_on_curriculum
from simfluence.recording.optim import Schedule
from simfluence.runlog import load_runset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--run", default=None, help="run id (default: the last one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--segment", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the timings here")
    args = parser.parse_args()
    runs = load_runset(args.directory)
    run_id = args.run or sorted(runs.run_ids)[-1]
    rec = load_recorded_run(runs, run_id)
    run = rec.run
    config = runs.metadata["config"]
    # the recorded recipe: optimizer, schedule (rec.lrs[0] is step 1's rate, not the base one)
    recipe = {
        "optimizer": rec.optimizer,
        "schedule": Schedule.from_config(config.get("schedule")),
        "max_grad_norm": rec.max_grad_norm,
    }
    initial = rec.task.make_model(config["seed"])

    def recorded_run() -> None:
        train_on_curriculum(
            rec.task, initial, rec.pool, rec.tests, run.curriculum, config["lr"], run.seed, **recipe
        )

    def training_only() -> None:
        final_test_losses(
            rec.task, initial, rec.pool, rec.tests, run.curriculum, config["lr"], run.seed, **recipe
        )

    errors = []

    def unrolled() -> None:
        mg = unrolled_metagradients(
            rec.task,
            rec.model,
            rec.checkpoint,
            rec.pool,
            rec.tests,
            run.curriculum,
            rec.lrs,
            recorded_final_loss=run.losses[-1],
            saved=rec.saved,
            segment=args.segment,
            seed=run.seed,
            optimizer=rec.optimizer,
            max_grad_norm=rec.max_grad_norm,
        )
        errors.append(mg.replay_error)

    timings = {}
    with torch_threads(rec.model):
        for name, fn in [
            ("training run (recorded: scores every step)", recorded_run),
            ("training run (scored at the end)", training_only),
            (f"unrolled, all {len(rec.tests)} tests", unrolled),
        ]:
            fn()  # warm up
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                seconds.append(time.perf_counter() - start)
            timings[name] = statistics.median(seconds)
    base = timings["training run (recorded: scores every step)"]
    print(f"{args.directory} {run_id}: {run.n_steps} steps, {len(rec.tests)} tests")
    for name, value in timings.items():
        print(f"  {name:<45} {value:8.3f} s  ({value / base:.2f}x the recorded run)")
    print(f"  replay error vs the recording: {max(errors):.3g}")
    if args.json:
        import json
        from pathlib import Path

        out = {
            "run_set": args.directory,
            "run": run_id,
            "steps": run.n_steps,
            "tests": len(rec.tests),
            "optimizer": (rec.optimizer or {}).get("name"),
            "repeats": args.repeats,
            "seconds": timings,
            "ratio_to_recorded_run": {name: value / base for name, value in timings.items()},
            "replay_error": max(errors),
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
