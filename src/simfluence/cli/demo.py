"""`simfluence demo`: the main job, end to end on a real workload.

Record runs (with checkpoints for the gradient methods), fit every simulator on the training
runs, evaluate free-running rollouts of the held-out runs, print the table, and write
``evaluation.json``, the figures and a self-contained ``report.html`` into the output folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm.auto import tqdm

from simfluence._atomic import write_json_atomic
from simfluence.cli._args import TASK_HELP, add_task_option, comma_list
from simfluence.cli._failures import raise_failures
from simfluence.cli._options import add_simulator_options, build_simulators, with_features
from simfluence.evaluation import evaluate, format_table
from simfluence.plots import pick_test_examples, plot_method_grid, plot_trajectories
from simfluence.simulators.methods import DEMO_METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="record a workload, fit and evaluate every simulator, write a report",
        description=__doc__,
    )
    add_task_option(p, f"{TASK_HELP} (default: digits-mlp)", trust=False)
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument(
        "--methods",
        type=comma_list,
        default=list(DEMO_METHODS),
        help=f"comma-separated methods (default: {','.join(DEMO_METHODS)})",
    )
    p.add_argument("--runs", type=int, default=None, help="runs to record (workload default)")
    p.add_argument("--holdout", type=int, default=5, help="held-out runs (default: 5)")
    p.add_argument("--seed", type=int, default=0)
    add_simulator_options(p, unseen="prior", task=False)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from simfluence.recording.protocol import RecordingProtocol, steps_per_run
    from simfluence.recording.record import record_runs
    from simfluence.recording.tasks import resolve_task, task_label
    from simfluence.trust import remember_trusted

    out = Path(args.out)
    ref = args.task or "digits-mlp"
    task = resolve_task(ref)
    remember_trusted(ref)  # the user's own task code: later commands may import it
    simulators = build_simulators(args, args.methods, task=None)  # the stored task
    d = task.defaults
    runs_count = args.runs or d.runs
    steps = steps_per_run(d.per_run, d.batch, d.epochs)
    start = time.perf_counter()
    print(
        f"[1/3] recording {runs_count} runs x {steps} steps of {task_label(task)} (pool {d.pool}, "
        f"{d.tests} test examples, batch {d.batch}, lr {d.lr}) into {out / 'runs'}"
    )
    protocol = RecordingProtocol(runs=runs_count, seed=args.seed)
    runs = record_runs(task, out / "runs", protocol, task_ref=ref)
    recorded = time.perf_counter() - start
    print(f"      recorded in {recorded:.1f} s")
    runs = with_features(out / "runs", runs, args.methods, task)
    print(
        f"[2/3] fitting {len(args.methods)} simulators on {runs_count - args.holdout} runs, "
        f"simulating {args.holdout} held-out runs"
    )
    result = evaluate(
        runs,
        simulators,
        args.holdout,
        lambda items: tqdm(items, desc="methods", leave=False, disable=None),
        keep_going=True,
    )
    print(format_table(result))
    write_json_atomic(out / "evaluation.json", result.to_json())
    print(f"[3/3] writing figures and the report into {out}")
    figures = _figures(runs, result, out)
    attribution = _attribution(runs, result, out)
    from simfluence.report.html import write_report

    report = write_report(
        out / "report.html",
        title=f"simfluence demo: {task_label(task)}",
        runs=runs,
        evaluation=result,
        attribution=attribution,
        figures=figures,
        notes=[
            f"Recorded {runs_count} runs in {recorded:.1f} s; every simulator was fitted on "
            f"the {len(result.train_runs)} training runs only and rolled out free-running "
            f"from step 0 on the {len(result.heldout_runs)} held-out runs.",
        ],
    )
    total = time.perf_counter() - start
    print(f"wrote {out / 'evaluation.json'} and {report} ({total:.0f} s in all)")
    raise_failures(result)


def _attribution(runs, result, out: Path) -> dict | None:  # type: ignore[no-untyped-def,type-arg]
    """Leave-one-out, per-step and pair views under `linear` for the test example whose loss
    moves most in the first held-out run; written to ``attribution.json`` too."""
    if "linear" not in result.methods:
        return None
    from simfluence.counterfactual.attribution import attribution_views

    run = runs.run(result.heldout_runs[0])
    test_id = runs.test_ids[pick_test_examples(run.losses, 1)[0]]
    simulator = result.methods["linear"].simulator
    *_, views = attribution_views(simulator, run.curriculum, run.initial_loss, test_id)
    views = {
        "description": f"Why did {test_id} end where it did in held-out run {run.run_id}? "
        "Simulated by linear (fitted on the training runs).",
        "curriculum": f"held-out run {run.run_id}",
        **views,
    }
    write_json_atomic(out / "attribution.json", views)
    # the page shows the ten most helpful and most harmful; the JSON file keeps every example
    effects = views["leave_one_out"].pop("effects")
    views["leave_one_out"]["most_helpful"] = [e for e in effects if e["effect"] < 0][:10]
    views["leave_one_out"]["most_harmful"] = [e for e in effects if e["effect"] > 0][::-1][:10]
    return views


def _figures(runs, result, out: Path) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    run = runs.run(result.heldout_runs[0])
    simulated = {name: m.simulated[0] for name, m in result.methods.items()}
    title = f"{runs.metadata.get('config', {}).get('workload', '')} held-out run {run.run_id}"
    grid = out / "methods.png"
    plot_method_grid(
        run.losses, simulated, runs.test_ids, pick_test_examples(run.losses, 4), title, grid
    )
    best = {k: v for k, v in simulated.items() if k in ("linear", "mean", "tracin-cp-scaled")}
    lines = out / "trajectories.png"
    plot_trajectories(
        run.losses, best, runs.test_ids, pick_test_examples(run.losses, 6), title, lines
    )
    return {"Recorded vs simulated, every method": grid, "Linear vs the baselines": lines}
