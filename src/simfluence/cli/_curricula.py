"""Options shared by the commands that take a curriculum (simulate, attribute, optimize): where
the curriculum and the initial loss come from, and counterfactual edits of it."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from simfluence.cli._args import comma_list, positive_int, read_json
from simfluence.curricula import apply_edits
from simfluence.errors import SimfluenceError
from simfluence.runlog import load_runset, normalize_curriculum
from simfluence.runlog.features import read_feature_table
from simfluence.simulators import Simulator


def initial_loss(simulator: Simulator, path: str | None) -> np.ndarray:
    """``(M,)``: the loss before training from a JSON file ``{test_id: loss}``, or the
    simulator's mean recorded one when `path` is None."""
    if path is None:
        return simulator.initial_loss_
    given = read_json(path, "initial loss")
    if not isinstance(given, dict):
        raise SimfluenceError(f"initial loss {path}: expected an object {{test_id: loss}}")
    missing = [t for t in simulator.test_ids_ if t not in given]
    if missing:
        raise SimfluenceError(f"initial loss {path}: no loss for test example {missing[0]!r}")
    for t in simulator.test_ids_:
        value = given[t]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SimfluenceError(
                f"initial loss {path}: the loss of test example {t!r} is not a number: {value!r}"
            )
    return np.array([float(given[t]) for t in simulator.test_ids_])


def add_new_examples_option(p: argparse.ArgumentParser) -> None:
    """``--features FILE``: examples no recorded run holds, for featurized simulators."""
    p.add_argument(
        "--features",
        default=None,
        metavar="FILE",
        help="featurized/hybrid only: vectors (.npz or .parquet, id -> vector) of examples the "
        "model has never seen; each new id with a loss in --initial-loss becomes a test "
        "example, every other new id a training example",
    )


def with_new_examples(
    simulator: Simulator, features: str | None, initial_loss_path: str | None
) -> Simulator:
    """`simulator` grown by the examples of the `--features` file it does not know yet."""
    if features is None:
        return simulator
    if not hasattr(simulator, "extend"):
        raise SimfluenceError(
            f"--features: a {simulator.name} model cannot take new examples (featurized and "
            "hybrid models can)"
        )
    ids, vectors = read_feature_table(features)
    known = set(simulator.train_ids_) | set(simulator.test_ids_)
    losses = read_json(initial_loss_path, "initial loss") if initial_loss_path else {}
    if not isinstance(losses, dict):
        raise SimfluenceError(f"initial loss {initial_loss_path}: expected an object")
    rows = {example_id: k for k, example_id in enumerate(ids) if example_id not in known}
    tests = [i for i in rows if i in losses]
    trains = [i for i in rows if i not in losses]
    vectors = np.asarray(vectors, dtype=np.float64)
    extended = simulator.extend(
        trains,
        vectors[[rows[i] for i in trains]],
        tests,
        vectors[[rows[i] for i in tests]],
        np.array([float(losses[i]) for i in tests]),
    )
    print(f"added {len(trains)} new training and {len(tests)} new test examples from {features}")
    return extended


def add_curriculum_source_options(p: argparse.ArgumentParser) -> None:
    """``--curriculum FILE`` or ``--runs DIR --run RUN_ID``, ``--initial-loss FILE``, and
    ``--features FILE``."""
    p.add_argument("--curriculum", default=None, help="JSON file: a list of batches of ids")
    p.add_argument("--runs", default=None, help="run-set directory holding --run")
    p.add_argument(
        "--run", default=None, help="take the curriculum and initial loss of this recorded run"
    )
    p.add_argument(
        "--initial-loss",
        default=None,
        help="JSON file: {test_id: loss} before training (default: the run's recorded one "
        "with --run, else the model's mean recorded one)",
    )
    add_new_examples_option(p)


def load_curriculum(
    args: argparse.Namespace, simulator: Simulator
) -> tuple[list[list[str]], np.ndarray, str]:
    """``(curriculum, initial loss (M,), description)`` from the source options."""
    if (args.curriculum is None) == (args.run is None):
        raise SimfluenceError("give either --curriculum FILE or --runs DIR --run RUN_ID")
    if args.curriculum is not None:
        raw = read_json(args.curriculum, "curriculum")
        curriculum = normalize_curriculum(raw, f"curriculum {args.curriculum}")
        return curriculum, initial_loss(simulator, args.initial_loss), args.curriculum
    if args.runs is None:
        raise SimfluenceError("--run needs --runs DIR, the run set that holds it")
    runset = load_runset(args.runs)
    run = runset.run(args.run)
    if args.initial_loss is not None:
        return run.curriculum, initial_loss(simulator, args.initial_loss), f"run {run.run_id}"
    columns = {t: j for j, t in enumerate(runset.test_ids)}
    missing = [t for t in simulator.test_ids_ if t not in columns]
    if missing:
        raise SimfluenceError(
            f"run set {args.runs} has no recorded loss for the model's test example "
            f"{missing[0]!r}; pass --initial-loss"
        )
    initial = run.initial_loss[[columns[t] for t in simulator.test_ids_]]
    return run.curriculum, initial, f"run {run.run_id}"


def add_edit_options(p: argparse.ArgumentParser) -> None:
    """Counterfactual edits; applied after --edits, in the order listed here."""
    g = p.add_argument_group(
        "counterfactual edits (applied after --edits FILE, in this order: remove, repeat, add, "
        "reorder, truncate)"
    )
    g.add_argument("--edits", default=None, help="JSON edit spec (see curricula.apply_edits)")
    g.add_argument(
        "--remove",
        type=comma_list,
        action="append",
        default=None,
        metavar="IDS",
        help="drop every occurrence of these ids (comma-separated)",
    )
    g.add_argument(
        "--repeat",
        type=comma_list,
        action="append",
        default=None,
        metavar="ID:TIMES",
        help="consume each occurrence of ID TIMES times",
    )
    g.add_argument(
        "--add",
        type=comma_list,
        action="append",
        default=None,
        metavar="IDS",
        help="new batches of these ids",
    )
    g.add_argument(
        "--add-batch",
        type=positive_int,
        default=None,
        help="batch size of --add batches (default: the model's)",
    )
    g.add_argument(
        "--add-at",
        default="end",
        help="where --add batches go: start, end, or after step K (default: end)",
    )
    g.add_argument(
        "--reorder",
        type=int,
        default=None,
        metavar="SEED",
        help="shuffle the order (same batch sizes) with this seed",
    )
    g.add_argument(
        "--truncate",
        type=positive_int,
        default=None,
        metavar="STEPS",
        help="keep only the first STEPS batches",
    )


def edit_spec(args: argparse.Namespace, simulator: Simulator) -> list[dict[str, Any]]:
    """The edit spec the options ask for (empty: no edits)."""
    spec: list[dict[str, Any]] = []
    if args.edits:
        spec.extend(_read_spec(args.edits))
    for ids in args.remove or []:
        spec.append({"op": "remove", "ids": ids})
    for items in args.repeat or []:
        spec.extend({"op": "repeat", "ids": [i], "times": t} for i, t in map(_id_times, items))
    for ids in args.add or []:
        batch = args.add_batch or round(float(getattr(simulator, "batch_size_", len(ids))))
        at = args.add_at if args.add_at in ("start", "end") else _step(args.add_at)
        spec.append({"op": "add", "ids": ids, "batch_size": batch, "position": at})
    if args.reorder is not None:
        spec.append({"op": "reorder", "seed": args.reorder})
    if args.truncate is not None:
        spec.append({"op": "truncate", "steps": args.truncate})
    return spec


def _read_spec(path: str) -> list[dict[str, Any]]:
    spec = read_json(path, "edit spec")
    if not isinstance(spec, list):
        raise SimfluenceError(f"edit spec {path}: expected a list of operations")
    return spec


def _id_times(item: str) -> tuple[str, int]:
    train_id, sep, times = item.rpartition(":")
    if not sep or not train_id or not times.isdigit():
        raise SimfluenceError(f"--repeat {item!r}: expected ID:TIMES, e.g. train-3:2")
    return train_id, int(times)


def _step(text: str) -> int:
    if not text.isdigit():
        raise SimfluenceError(f"--add-at {text!r}: expected start, end or a step number")
    return int(text)


def edited(
    curriculum: list[list[str]], spec: list[dict[str, Any]], simulator: Simulator
) -> list[list[str]]:
    """`apply_edits` with the model's pool, so unknown ids are named early."""
    return apply_edits(curriculum, spec, pool=set(simulator.train_ids_))
