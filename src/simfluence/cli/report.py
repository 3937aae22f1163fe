"""`simfluence report`: evaluate methods on held-out runs and write one self-contained HTML page."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from simfluence.cli._args import add_fit_execution_options, comma_list, positive_int, read_json
from simfluence.cli._failures import raise_failures
from simfluence.cli._options import (
    add_simulator_options,
    build_simulators,
    choice_line,
    with_features,
)
from simfluence.errors import SimfluenceError
from simfluence.evaluation import (
    EvaluationResult,
    evaluate,
    failure_message,
    score_fitted,
)
from simfluence.plots import pick_test_examples, plot_method_grid
from simfluence.report.html import write_report
from simfluence.runlog import load_runset
from simfluence.runlog.layout import TRUTH_FILE
from simfluence.runlog.runs import RunSet, default_holdout
from simfluence.simulators import Simulator, load_simulator
from simfluence.simulators.methods import DEFAULT_EVALUATE_METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="evaluate methods on held-out runs and write a self-contained interactive HTML report",
    )
    p.add_argument("directory", help="run-set directory")
    p.add_argument(
        "--methods",
        type=comma_list,
        default=list(DEFAULT_EVALUATE_METHODS),
        help="comma-separated methods to fit and evaluate (default: "
        f"{','.join(DEFAULT_EVALUATE_METHODS)}; 'truth' adds the true parameters of a "
        "synthetic set)",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="MODEL",
        help="a simulator file from `simfluence fit` to include as an extra method, simulated "
        "on the held-out runs without refitting (repeatable; fit it with the same --holdout)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--holdout", type=positive_int, default=None, help="hold out the last H runs by id"
    )
    group.add_argument("--heldout-runs", type=comma_list, default=None, help="run ids to hold out")
    p.add_argument("--validation", default=None, help="JSON from a validation command to include")
    p.add_argument("--attribution", default=None, help="JSON of attribution results to include")
    p.add_argument("--title", default=None, help="page title (default: from the run set)")
    add_simulator_options(p, unseen="prior")
    add_fit_execution_options(p)
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.set_defaults(func=cmd_report)


def _model_name(path: Path, simulator: Simulator, taken: set[str]) -> str:
    base = f"{path.stem} ({simulator.name})" if path.stem != simulator.name else path.stem
    name, k = base, 2
    while name in taken:
        name, k = f"{base} #{k}", k + 1
    return name


def build_evaluation(
    runs: RunSet,
    simulators: dict[str, Simulator],
    models: list[str],
    heldout: int | list[str],
) -> tuple[EvaluationResult, list[str]]:
    """Evaluate `simulators` (fitted here) and `models` (pre-fitted files); returns notes too."""
    result = evaluate(runs, simulators, heldout, keep_going=True)
    notes = [f"{name} failed: {failure_message(exc, name)}" for name, exc in result.failed.items()]
    notes += [f"warning: {w}" for m in result.methods.values() for w in m.warnings]
    notes += [line for m in result.methods.values() if (line := choice_line(m.simulator))]
    if models:
        _, held = runs.split(heldout)
        for model in models:
            path = Path(model)
            simulator = load_simulator(path)
            name = _model_name(path, simulator, set(result.methods))
            # calibrated when it was fitted: show its own intervals
            result.methods[name] = score_fitted(
                simulator, held, intervals=True, where=f"--model {model}"
            )
            notes.append(
                f"{name}: pre-fitted simulator {path.name}, not refitted here; its scores are "
                "fair only if it was fitted without the held-out runs."
            )
    return result, notes


def cmd_report(args: argparse.Namespace) -> None:
    runs = load_runset(args.directory)
    heldout = args.heldout_runs or args.holdout or default_holdout(len(runs.runs))
    attribution = read_json(args.attribution, "attribution") if args.attribution else None
    validation = read_json(args.validation, "validation") if args.validation else None
    for what, value in (("attribution", attribution), ("validation", validation)):
        if value is not None and not isinstance(value, dict):
            raise SimfluenceError(f"{what} {getattr(args, what)}: expected a JSON object")
    simulators = build_simulators(args, args.methods, path=str(Path(args.directory) / TRUTH_FILE))
    runs = with_features(args.directory, runs, args.methods, args.task)
    print(f"fitting {', '.join(args.methods)} on the training runs ...")
    result, notes = build_evaluation(runs, simulators, args.model, heldout)
    meta = runs.metadata or {}
    workload = meta.get("workload") or (meta.get("config") or {}).get("workload")
    title = args.title or f"simfluence report: {workload or Path(args.directory).name}"
    if not result.methods:
        raise_failures(result)
    with tempfile.TemporaryDirectory() as tmp:
        run = runs.run(result.heldout_runs[0])
        simulated = {name: m.simulated[0] for name, m in result.methods.items()}
        figure = Path(tmp) / "methods.png"
        fig = plot_method_grid(
            run.losses,
            simulated,
            runs.test_ids,
            pick_test_examples(run.losses, 4),
            f"held-out run {run.run_id}: recorded vs simulated, one panel per method",
            figure,
        )
        plt.close(fig)
        written = write_report(
            args.output,
            title=title,
            runs=runs,
            evaluation=result,
            attribution=attribution,
            validation=validation,
            figures={f"per-method rollouts, held-out run {run.run_id}": figure},
            notes=notes,
        )
    size = written.stat().st_size / 1e6
    print(
        f"{len(result.train_runs)} training runs, {len(result.heldout_runs)} held-out runs, "
        f"{len(result.methods)} methods; wrote {written} ({size:.1f} MB)"
    )
    raise_failures(result)
