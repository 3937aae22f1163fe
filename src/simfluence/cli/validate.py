"""`simfluence validate`: train the task on new curricula and score every simulator.

The JSON it writes is deterministic: two identical calls give byte-identical files except the
``"timing"`` object (wall-clock seconds), which is kept apart at the end.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from tqdm.auto import tqdm

from simfluence._atomic import write_json_atomic
from simfluence.cli._args import (
    add_execution_options,
    add_task_option,
    backend_from_args,
    comma_list,
    positive_int,
)
from simfluence.cli._options import add_simulator_options, build_simulators, with_features
from simfluence.evaluation.text import format_validation
from simfluence.runlog import load_runset
from simfluence.simulators.methods import DEFAULT_VALIDATE_METHODS

#: `simfluence.attribution.smoothness.DEFAULT_DIRECTIONS` (not imported: it loads torch)
DEFAULT_DIRECTIONS = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="validate simulators against real retraining on new curricula",
        description="Train the run set's task on C new curricula of each kind (never "
        "recorded), and compare every simulator's predictions with what training actually did.",
    )
    p.add_argument("directory", help="run set recorded by `simfluence record`")
    add_task_option(
        p,
        "where the run set's task is, when the reference stored in its manifest no longer "
        "works (checked against the recorded task's name; default: the stored one)",
    )
    p.add_argument("--curricula", type=positive_int, default=20, help="curricula per kind")
    p.add_argument(
        "--kinds",
        type=comma_list,
        default=["random", "leave-out", "reorder", "repeat", "optimized"],
        help="comma-separated kinds (default: the five curriculum kinds); loo and "
        "loo-weight0 retrain the last --curricula recorded runs without each example "
        "(drop and re-average the batch / keep it at loss weight 0); subsets: random halves "
        "of the pool (dattri's LDS protocol)",
    )
    p.add_argument(
        "--methods",
        type=comma_list,
        default=list(DEFAULT_VALIDATE_METHODS),
        help="comma-separated methods; the first one searches the optimized curricula "
        f"(default: {','.join(DEFAULT_VALIDATE_METHODS)})",
    )
    p.add_argument(
        "--max-examples",
        type=positive_int,
        default=None,
        help="loo kinds: remove at most this many examples one at a time (a seeded random "
        "choice; default: every distinct example of the run)",
    )
    p.add_argument(
        "--groups",
        type=positive_int,
        default=20,
        help="loo kinds: random 10%% removals retrained for the LDS (default 20)",
    )
    p.add_argument(
        "--smoothness-directions",
        type=int,
        default=DEFAULT_DIRECTIONS,
        metavar="N",
        help="loo kinds: measure how close to linear each held-out run's final test loss is "
        "in the example weights along N random directions (2 retrains each; 0: off; default "
        f"{DEFAULT_DIRECTIONS}); see docs/counterfactuals.md",
    )
    p.add_argument(
        "--subsets",
        type=positive_int,
        default=None,
        help="subsets kind: random 50%% subsets of the pool retrained (dattri's LDS protocol; "
        "default: --curricula)",
    )
    p.add_argument(
        "--subset-seeds",
        type=positive_int,
        default=1,
        help="subsets kind: trainings per subset (different orders), averaged (default 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--search-evaluations",
        type=positive_int,
        default=None,
        metavar="N",
        help="rollouts per optimized-curriculum search (default: 10000); the search is "
        "bounded by work, so results do not depend on the machine",
    )
    p.add_argument(
        "--search-seconds",
        type=float,
        default=None,
        metavar="S",
        help="also stop each search after S seconds (opt-in: results then depend on the "
        "machine's speed and load)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    # new curricula may consume examples no recorded run did: by default they get "no effect"
    add_simulator_options(p, unseen="prior", task=False)
    add_execution_options(p, "curricula")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> None:
    from simfluence.backends import PRELOAD, close_backend

    backend = backend_from_args(args)
    if hasattr(backend, "start"):  # warm workers import torch while this process fits
        backend.start(preload=PRELOAD)
    try:
        _validate_with(args, backend)
    finally:  # shut the workers down here, not in the interpreter's exit handlers
        close_backend(backend)


def _validate_with(args: argparse.Namespace, backend: Any) -> None:
    from simfluence.recording.tasks import task_for_runset
    from simfluence.recording.validation import SEARCH_EVALUATIONS, validate

    # --workers/--ray train the curricula here: the linear fits stay serial
    simulators = build_simulators(args, args.methods, backend=None)
    runs = load_runset(args.directory)
    task = task_for_runset(runs, args.task)
    runs = with_features(args.directory, runs, args.methods, task)
    start = time.perf_counter()

    def progress(items, total):  # type: ignore[no-untyped-def]
        return tqdm(
            items, total=total, desc="training", unit="curriculum", leave=False, disable=None
        )

    result = validate(
        task,
        runs,
        simulators,
        args.kinds,
        args.curricula,
        args.seed,
        progress,
        search_evaluations=args.search_evaluations or SEARCH_EVALUATIONS,
        search_seconds=args.search_seconds,
        max_examples=args.max_examples,
        groups=args.groups,
        device=args.device,
        backend=backend,
        smoothness_directions=args.smoothness_directions,
        subsets=args.subsets,
        subset_seeds=args.subset_seeds,
    )
    # the one non-deterministic key, last (the leave-one-out kinds' seconds are in it too)
    result["timing"] = {"seconds": time.perf_counter() - start, **result.pop("timing", {})}
    print(format_validation(result))
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
