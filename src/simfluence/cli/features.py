"""`simfluence features`: store example features beside a run set (for featurized simulators)."""

from __future__ import annotations

import argparse

from simfluence.cli._args import add_task_option, positive_int
from simfluence.errors import SimfluenceError
from simfluence.runlog import load_runset
from simfluence.runlog.features import align, read_feature_table, save_features
from simfluence.runlog.layout import FEATURES_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "features",
        help="compute or import one feature vector per example (for featurized/hybrid)",
        description=f"Write DIR/{FEATURES_FILE}: from the run set's workload (nothing is trained: "
        "the features come from the initial model), or from a file of id -> vector.",
    )
    p.add_argument("directory", help="run-set directory")
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="FILE",
        help=".npz (arrays 'ids', 'vectors') or .parquet (column 'id' and a list column "
        "'vector' or numeric columns) holding a vector for every training and test id",
    )
    add_task_option(
        p,
        "without --from: where the run set's task is, when the reference stored in its "
        "manifest no longer works (default: the stored one)",
    )
    p.add_argument(
        "--kind",
        default="gradients",
        help="with a workload: gradients (default; per-example loss gradients at the initial "
        "model), embedding or activations (the built-in workloads)",
    )
    p.add_argument(
        "--dim",
        type=positive_int,
        default=2048,
        help="gradients: sketch width when the model has more than 2 x DIM parameters "
        "(default: 2048)",
    )
    p.set_defaults(func=cmd_features)


def cmd_features(args: argparse.Namespace) -> None:
    if args.source is not None:
        runs = load_runset(args.directory)
        ids, vectors = read_feature_table(args.source)
        features = align(
            ids, vectors, runs.train_ids, runs.test_ids, args.source, {"source": args.source}
        )
        save_features(args.directory, features, runs.train_ids, runs.test_ids)
    else:
        try:
            from simfluence.recording.features import write_features
        except ImportError as exc:
            raise SimfluenceError(
                f"computing features needs the 'record' extras ({exc}); pip install "
                "'simfluence[record]', or pass --from FILE"
            ) from None
        features = write_features(args.directory, args.task, kind=args.kind, dim=args.dim)
    seconds = features.metadata.get("seconds")
    cost = f", {seconds:.1f} s" if seconds is not None else ""
    print(
        f"wrote {args.directory}/{FEATURES_FILE}: {features.train.shape[0]} training and "
        f"{features.test.shape[0]} test examples x {features.train.shape[1]} dimensions "
        f"({features.metadata.get('kind', features.metadata.get('source'))}{cost})"
    )
