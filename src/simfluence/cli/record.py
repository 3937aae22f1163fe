"""``simfluence record``: record runs of a built-in workload on random curricula (resumable)."""

from __future__ import annotations

import argparse
import sys
import time

from simfluence.cli._args import comma_list, positive_int
from simfluence.errors import SimfluenceError

_DEFAULT_WORKLOAD = "digits-mlp"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "record",
        help="record training runs of a workload on random curricula (rerun to resume)",
        description="Train a workload's model on random curricula from one initial model and "
        "score every test example after every step. Interrupted recordings resume where they "
        "stopped when the same command is run again. Options default to the workload's.",
    )
    p.add_argument("directory", help="run-set directory to write (or resume)")
    p.add_argument(
        "--workload",
        default=_DEFAULT_WORKLOAD,
        help=f"workload name (default: {_DEFAULT_WORKLOAD})",
    )
    for flag, dest, what in [
        ("--runs", "runs", "number of runs"),
        ("--pool", "pool", "training pool size"),
        ("--per-run", "per_run", "training examples drawn per run"),
        ("--tests", "tests", "test examples scored after every step"),
        ("--batch", "batch", "batch size"),
        ("--epochs", "epochs", "epochs over each run's examples"),
    ]:
        p.add_argument(flag, dest=dest, type=positive_int, default=None, help=what)
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, model, curricula")
    p.add_argument(
        "--checkpoints",
        type=comma_list,
        default=[],
        help="comma-separated steps at which to save the model of every run (0 = before "
        "training), e.g. 0,20,40",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_record)


def cmd_record(args: argparse.Namespace) -> None:
    try:
        from simfluence.recording.runner import record_runs
        from simfluence.recording.workloads import get_workload
    except ImportError as exc:
        raise SimfluenceError(
            f"recording needs the 'record' extras ({exc}); pip install 'simfluence[record]'"
        ) from None
    try:
        task = get_workload(args.workload)
    except ValueError as exc:
        raise SimfluenceError(str(exc)) from None
    steps: list[int] = []
    for item in args.checkpoints:
        try:
            steps.append(int(item))
        except ValueError:
            raise SimfluenceError(f"--checkpoints: {item!r} is not a step number") from None
    d = task.defaults
    options = {
        "runs": args.runs or d.runs,
        "pool": args.pool or d.pool,
        "per_run": args.per_run or d.per_run,
        "tests": args.tests or d.tests,
        "batch": args.batch or d.batch,
        "epochs": args.epochs or d.epochs,
        "lr": d.lr if args.lr is None else args.lr,
        "seed": args.seed,
    }
    start = time.perf_counter()
    try:
        runset = record_runs(
            task,
            args.directory,
            checkpoints=steps,
            progress=not args.no_progress,
            **options,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: finished runs are kept in {args.directory}; run the same command "
            "again to resume",
            file=sys.stderr,
        )
        raise
    seconds = time.perf_counter() - start
    n_steps = runset.runs[0].n_steps
    ckpt = f", checkpoints at steps {sorted(set(steps))}" if steps else ""
    print(
        f"recorded {len(runset.runs)} runs x {n_steps} steps of {task.name} "
        f"(pool {options['pool']}, {options['tests']} test examples{ckpt}) in {seconds:.1f} s; "
        f"wrote {args.directory}"
    )
