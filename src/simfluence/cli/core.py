"""Core commands: synth, fit, simulate, evaluate, import-gptfluence, export-gptfluence."""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from simfluence._atomic import write_json_atomic, write_text_atomic
from simfluence.cli._args import (
    add_fit_execution_options,
    comma_list,
    level,
    positive_int,
)
from simfluence.cli._curricula import (
    add_curriculum_source_options,
    add_edit_options,
    edit_spec,
    edited,
    load_curriculum,
    with_new_examples,
)
from simfluence.cli._failures import raise_failures
from simfluence.cli._options import (
    add_simulator_options,
    build_simulators,
    print_choice,
    with_features,
)
from simfluence.evaluation import evaluate, format_table, format_unseen_table
from simfluence.plots import pick_test_examples, plot_method_grid, plot_trajectories
from simfluence.runlog import (
    export_gptfluence,
    import_gptfluence,
    load_runset,
    save_runset,
)
from simfluence.runlog.gptfluence import IDS_FILE
from simfluence.runlog.layout import TRUTH_FILE, truth_path
from simfluence.runlog.runs import default_holdout
from simfluence.simulators import Simulator, available_simulators, load_simulator
from simfluence.simulators.intervals import Interval
from simfluence.simulators.methods import DEFAULT_EVALUATE_METHODS
from simfluence.synth import SynthConfig, write_synthetic


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_synth(subparsers)
    _register_fit(subparsers)
    _register_simulate(subparsers)
    _register_evaluate(subparsers)
    p = subparsers.add_parser(
        "import-gptfluence", help="convert GPTfluence run directories into a run set"
    )
    p.add_argument("source", help="folder of GPTfluence run directories (or one run directory)")
    p.add_argument("directory", help="run-set directory to write")
    p.set_defaults(func=cmd_import_gptfluence)
    p = subparsers.add_parser("export-gptfluence", help="write a run set in GPTfluence's format")
    p.add_argument("directory", help="run-set directory")
    p.add_argument("out", help="folder to write one GPTfluence run directory per run into")
    p.set_defaults(func=cmd_export_gptfluence)


# -- synth ------------------------------------------------------------------------------------
def _register_synth(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth", help="write a synthetic run set drawn from known Simfluence-Linear parameters"
    )
    p.add_argument("directory")
    defaults = SynthConfig()
    for flag, dest in [
        ("--pool", "pool"),
        ("--tests", "tests"),
        ("--runs", "runs"),
        ("--per-run", "per_run"),
        ("--batch", "batch"),
        ("--epochs", "epochs"),
    ]:
        p.add_argument(flag, dest=dest, type=positive_int, default=getattr(defaults, dest))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--noise", type=float, default=defaults.noise, help="process noise (log scale)")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> None:
    config = SynthConfig(
        pool=args.pool,
        tests=args.tests,
        runs=args.runs,
        per_run=args.per_run,
        batch=args.batch,
        epochs=args.epochs,
        seed=args.seed,
        noise=args.noise,
    )
    runset = write_synthetic(args.directory, config)
    steps = runset.runs[0].n_steps
    print(
        f"wrote {len(runset.runs)} runs x {steps} steps, pool {config.pool}, "
        f"{config.tests} test examples to {args.directory} (true parameters in {TRUTH_FILE})"
    )


# -- fit --------------------------------------------------------------------------------------
def _register_fit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="fit a simulator on a run set and save it")
    p.add_argument("directory", help="run-set directory")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(available_simulators())}")
    p.add_argument(
        "--holdout",
        type=positive_int,
        default=None,
        help="leave out the last H runs by run id (to evaluate them later)",
    )
    p.add_argument("-o", "--output", required=True, help="simulator file to write (.npz)")
    p.add_argument(
        "--no-intervals",
        dest="intervals",
        action="store_false",
        help="skip the calibration of predictive intervals (5 refits on run-wise folds; "
        "`simulate --interval`, attribution and search intervals need it)",
    )
    add_simulator_options(p, unseen="error")
    add_fit_execution_options(p)
    p.set_defaults(func=cmd_fit)


def cmd_fit(args: argparse.Namespace) -> None:
    runs = load_runset(args.directory)
    truth = str(truth_path(args.directory))
    (simulator,) = build_simulators(args, [args.method], path=truth).values()
    runs = with_features(args.directory, runs, [args.method], args.task)
    if args.holdout:
        runs, held = runs.split(args.holdout)
        print(f"holding out {len(held.runs)} runs: {', '.join(held.run_ids)}")
    start = time.perf_counter()
    simulator.fit(runs)
    seconds = time.perf_counter() - start
    extra = f", l2 = {simulator.l2_:g}" if hasattr(simulator, "l2_") else ""
    if hasattr(simulator, "n_components_"):
        extra += f", {simulator.n_components_} feature directions"
    print(f"fitted {args.method} on {len(runs.runs)} runs in {seconds:.2f} s{extra}")
    print_choice(simulator)
    if args.intervals:
        if len(runs.runs) < 2:
            print("note: one run cannot calibrate intervals (needs 2 or more); skipped")
        else:
            start = time.perf_counter()
            simulator.calibrate(runs)
            print(
                f"calibrated predictive intervals on {len(runs.runs)} runs in "
                f"{time.perf_counter() - start:.2f} s"
            )
    simulator.save(args.output)
    print(f"wrote {args.output}")


# -- simulate ---------------------------------------------------------------------------------
def _register_simulate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="predict the loss trajectories of a curriculum")
    p.add_argument("model", help="simulator file written by `simfluence fit`")
    add_curriculum_source_options(p)
    p.add_argument("-o", "--output", required=True, help="predictions: .json or .csv")
    p.add_argument("--plot", default=None, help="also draw the trajectories to this PNG")
    p.add_argument(
        "--interval",
        type=level,
        default=None,
        metavar="LEVEL",
        help="also write the predictive interval at this level (e.g. 0.9) as lower/upper "
        "(the model must be calibrated: `simfluence fit` does it by default)",
    )
    add_edit_options(p)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> None:
    """Simulate a curriculum (a file, or a recorded run's); with edits, simulate the edited
    curriculum (written to the output) and report both mean final losses."""
    simulator = with_new_examples(load_simulator(args.model), args.features, args.initial_loss)
    print_choice(simulator)
    curriculum, initial, _ = load_curriculum(args, simulator)
    spec = edit_spec(args, simulator)
    original = None
    if spec:
        original, curriculum = curriculum, edited(curriculum, spec, simulator)
    trajectory = simulator.simulate(curriculum, initial)
    interval = None if args.interval is None else simulator.interval_of(trajectory, args.interval)
    _write_predictions(args.output, simulator, trajectory, interval)
    if args.plot:
        columns = pick_test_examples(trajectory, 6)
        plot_trajectories(
            None,
            {simulator.name: trajectory},
            simulator.test_ids_,
            columns,
            f"{simulator.name} rollout",
            args.plot,
            band=None if interval is None else (interval.lower, interval.upper),
        )
    mean0, mean_t = trajectory[0].mean(), trajectory[-1].mean()
    band = ""
    if interval is not None:
        low, high = simulator.objective_interval(trajectory, np.arange(trajectory.shape[1]))
        band = f" ({100 * args.interval:g}% interval of the mean: {low:.4f} to {high:.4f})"
    print(
        f"simulated {len(curriculum)} steps with {simulator.name}: mean test loss "
        f"{mean0:.4f} -> {mean_t:.4f}{band}; wrote {args.output}"
    )
    if original is not None:
        before = simulator.simulate(original, initial)[-1].mean()
        print(
            f"predicted mean final loss: original ({len(original)} steps) {before:.5f}, edited "
            f"({len(curriculum)} steps) {mean_t:.5f}, change {mean_t - before:+.5f}"
        )


def _write_predictions(
    output: str, simulator: Simulator, trajectory: np.ndarray, interval: Interval | None = None
) -> None:
    """JSON ``{"method", "test_ids", "loss", "final_loss"}`` (+ ``"interval_level"``,
    ``"lower"``, ``"upper"``, each ``(T + 1, M)``), or CSV with one row per step: ``step``, the
    test ids (+ ``lower:<id>`` and ``upper:<id>`` columns)."""
    test_ids = simulator.test_ids_
    if output.endswith(".csv"):
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        header = ["step", *test_ids]
        blocks = [trajectory]
        if interval is not None:
            header += [f"lower:{t}" for t in test_ids] + [f"upper:{t}" for t in test_ids]
            blocks += [interval.lower, interval.upper]
        writer.writerow(header)
        for step, row in enumerate(np.hstack(blocks)):
            writer.writerow([step, *(f"{v:.10g}" for v in row)])
        write_text_atomic(output, buffer.getvalue())
        return
    payload: dict[str, Any] = {
        "method": simulator.name,
        "test_ids": test_ids,
        "loss": trajectory.tolist(),
        "final_loss": dict(zip(test_ids, trajectory[-1].tolist(), strict=True)),
    }
    if interval is not None:
        payload |= {
            "interval_level": interval.level,
            "lower": interval.lower.tolist(),
            "upper": interval.upper.tolist(),
        }
    write_json_atomic(output, payload)


# -- evaluate ---------------------------------------------------------------------------------
def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="fit methods on training runs and score rollouts of held-out runs"
    )
    p.add_argument("directory", help="run-set directory")
    p.add_argument(
        "--methods",
        type=comma_list,
        default=list(DEFAULT_EVALUATE_METHODS),
        help=f"comma-separated methods (default: {','.join(DEFAULT_EVALUATE_METHODS)}; 'truth' "
        "adds the true parameters of a synthetic run set)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--holdout", type=positive_int, default=None, help="hold out the last H runs by id"
    )
    group.add_argument("--heldout-runs", type=comma_list, default=None, help="run ids to hold out")
    p.add_argument("--json", default=None, help="write the metrics as JSON here")
    p.add_argument("--plot", default=None, help="draw true vs simulated trajectories to this PNG")
    add_simulator_options(p, unseen="prior")
    add_fit_execution_options(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> None:
    runs = load_runset(args.directory)
    heldout = args.heldout_runs or args.holdout or default_holdout(len(runs.runs))
    simulators = build_simulators(args, args.methods, path=str(truth_path(args.directory)))
    runs = with_features(args.directory, runs, args.methods, args.task)
    result = evaluate(
        runs,
        simulators,
        heldout,
        lambda items: tqdm(items, desc="fit + simulate", leave=False, disable=None),
        keep_going=True,
    )
    print(
        f"{len(result.train_runs)} training runs, {len(result.heldout_runs)} held-out runs, "
        f"{len(runs.test_ids)} test examples"
    )
    if result.unseen_fraction:
        print(
            f"note: {100 * result.unseen_fraction:.1f}% of the held-out runs' consumptions are of "
            f"examples no training run consumed (--unseen {args.unseen or args.unseen_default})"
        )
    print(format_table(result))
    for method in result.methods.values():
        print_choice(method.simulator)
    by_unseen = format_unseen_table(result)
    if by_unseen:
        print(by_unseen)
    if args.json:
        write_json_atomic(args.json, result.to_json())
        print(f"wrote {args.json}")
    if args.plot and result.methods:
        run = runs.run(result.heldout_runs[0])
        simulated = {name: m.simulated[0] for name, m in result.methods.items()}
        title = f"held-out run {run.run_id}: recorded vs simulated"
        if len(simulated) > 5:  # too many lines for one panel: one panel per method
            columns = pick_test_examples(run.losses, 4)
            plot_method_grid(run.losses, simulated, runs.test_ids, columns, title, args.plot)
        else:
            columns = pick_test_examples(run.losses, 6)
            plot_trajectories(run.losses, simulated, runs.test_ids, columns, title, args.plot)
        print(f"wrote {args.plot}")
    raise_failures(result)


# -- GPTfluence interop -----------------------------------------------------------------------
def cmd_import_gptfluence(args: argparse.Namespace) -> None:
    runset = import_gptfluence(args.source)
    save_runset(runset, args.directory)
    print(
        f"imported {len(runset.runs)} runs, pool {len(runset.train_ids)}, "
        f"{len(runset.test_ids)} test examples into {args.directory} (the first recorded step "
        "of each run is its starting point; its batch is not simulated)"
    )


def cmd_export_gptfluence(args: argparse.Namespace) -> None:
    runset = load_runset(args.directory)
    written = export_gptfluence(runset, args.out)
    print(
        f"exported {len(written)} runs to {args.out}: training ids 0..{len(runset.train_ids) - 1} "
        f"and test ids 0..{len(runset.test_ids) - 1} as GPTfluence reads them, the mapping to "
        f"ours in {Path(args.out) / IDS_FILE}"
    )
