"""Counterfactual commands: attribute (which examples, where in training) and optimize (the
curriculum a simulator predicts is best)."""

from __future__ import annotations

import argparse

from simfluence._atomic import write_json_atomic
from simfluence.cli._args import add_task_option, level, positive_int
from simfluence.cli._curricula import (
    add_curriculum_source_options,
    add_new_examples_option,
    initial_loss,
    load_curriculum,
    with_new_examples,
)
from simfluence.cli._options import print_choice
from simfluence.counterfactual import optimize_curriculum
from simfluence.counterfactual.attribution import REMOVALS, attribution_views
from simfluence.errors import SimfluenceError
from simfluence.evaluation.text import format_attribution
from simfluence.runlog import load_runset
from simfluence.runlog.layout import checkpoint_path
from simfluence.simulators import load_simulator


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_attribute(subparsers)
    _register_optimize(subparsers)


# -- attribute --------------------------------------------------------------------------------
def _register_attribute(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "attribute",
        help="which training examples, and which steps, moved a test loss",
        description="Leave-one-out effects (effect = L_T(with) - L_T(without), negative = "
        "helpful), where in training, and pairwise interactions. For a recorded run with a "
        "step-0 checkpoint the default answers from the run itself (exact metagradients, "
        "`unrolled`: closest to actual retraining); otherwise a fitted simulator simulates.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="simulator file written by `simfluence fit` (needed by --method simulator and "
        "combined, and for --curriculum)",
    )
    p.add_argument(
        "--test",
        action="append",
        required=True,
        metavar="ID",
        help="test example id; repeat to average a group",
    )
    add_curriculum_source_options(p)
    p.add_argument("--top", type=positive_int, default=10, help="rows per table (default 10)")
    p.add_argument(
        "--pairs",
        type=int,
        default=6,
        help="pairwise interactions among the top K by |effect| (0: none; default 6)",
    )
    p.add_argument(
        "--method",
        choices=ATTRIBUTE_METHODS,
        default="auto",
        help="auto (default): unrolled for a recorded run (--runs/--run) with a step-0 "
        "checkpoint, else simulator; unrolled: exact metagradients of the run; dvemb: DVEmb "
        "(dattri); simulator: the MODEL's simulated removals; combined: unrolled plus the "
        "MODEL's pairwise interactions",
    )
    p.add_argument(
        "--removal",
        choices=REMOVALS,
        default="renormalize",
        help="what removing an example means: drop it and re-average its batches "
        "(renormalize, default: what retraining on a shorter list does) or keep it in its "
        "batches with loss weight 0 (zero-weight)",
    )
    add_task_option(
        p,
        "unrolled, dvemb, combined: where the run set's task is, when the reference stored in "
        "its manifest no longer works (default: the stored one)",
    )
    p.add_argument(
        "--smoothness-directions",
        type=int,
        default=SMOOTHNESS_DIRECTIONS,
        metavar="N",
        help="unrolled, dvemb, combined: before trusting the first-order answer, retrain the "
        "run along N random directions in the example weights and report how close to linear "
        f"the final test loss is (2 retrains each; 0: off; default {SMOOTHNESS_DIRECTIONS})",
    )
    p.add_argument("--json", default=None, help="write every view as JSON here")
    p.add_argument("--plot", default=None, help="draw trajectory and top effects to this PNG")
    p.set_defaults(func=cmd_attribute)


#: `simfluence.attribution.smoothness.DEFAULT_DIRECTIONS` (not imported: it loads torch)
SMOOTHNESS_DIRECTIONS = 3


ATTRIBUTE_METHODS = ("auto", "simulator", "unrolled", "dvemb", "combined")


def _attribute_method(args: argparse.Namespace) -> str:
    """The method `auto` stands for: the run's own metagradients when they can be had."""
    if args.method != "auto":
        return args.method
    recorded = args.run is not None and args.runs is not None and args.curriculum is None
    if recorded and _has_step0_checkpoint(args.runs, args.run):
        return "unrolled"
    if args.model is None:
        raise SimfluenceError(
            "no MODEL given and no recorded run with a step-0 checkpoint (--runs DIR --run ID) "
            "to replay: give a simulator file or a run"
        )
    return "simulator"


def _has_step0_checkpoint(directory: str, run_id: str) -> bool:
    return checkpoint_path(directory, run_id, 0).is_file()


def cmd_attribute(args: argparse.Namespace) -> None:
    method = _attribute_method(args)
    simulator = load_simulator(args.model) if args.model is not None else None
    if simulator is not None:
        simulator = with_new_examples(simulator, args.features, args.initial_loss)
        print_choice(simulator)
    elif args.features is not None:
        raise SimfluenceError("--features needs MODEL, a featurized or hybrid simulator file")
    if method == "simulator":
        if simulator is None:
            raise SimfluenceError("--method simulator needs MODEL, a simulator file")
        curriculum, initial, source = load_curriculum(args, simulator)
        loo, steps, pairs, views = attribution_views(
            simulator, curriculum, initial, args.test, args.top, args.pairs, removal=args.removal
        )
        loo.method = simulator.name
        n_steps = len(curriculum)
    else:
        if args.runs is None or args.run is None or args.curriculum is not None:
            raise SimfluenceError(
                f"--method {method} answers for a recorded run: give --runs DIR --run ID "
                "(recorded with a step-0 checkpoint)"
            )
        if method == "combined" and simulator is None:
            raise SimfluenceError("--method combined needs MODEL, a fitted simulator file")
        from simfluence.attribution.run_views import run_attribution_views

        runset = load_runset(args.runs)
        loo, steps, pairs, views = run_attribution_views(
            runset,
            args.run,
            args.test,
            method,
            args.removal,
            top=args.top,
            pairs=args.pairs,
            simulator=simulator,
            task=args.task,
        )
        source, n_steps = f"run {args.run}", runset.run(args.run).n_steps
        if args.smoothness_directions > 0:
            from simfluence.attribution.smoothness import recorded_run_smoothness

            smooth = recorded_run_smoothness(
                runset, args.run, args.test, method, args.smoothness_directions, task=args.task
            )
            views["smoothness"] = smooth.to_json()
    print(format_attribution(loo, steps, pairs, source, n_steps, args.top))
    if "smoothness" in views:
        from simfluence.attribution.smoothness import smoothness_line

        print(smoothness_line(views["smoothness"]))
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "curriculum": source, **views})
        print(f"wrote {args.json}")
    if args.plot:
        from simfluence.plots import plot_attribution  # matplotlib: only when drawing

        plot_attribution(loo, steps, args.top, args.plot)
        print(f"wrote {args.plot}")


# -- optimize ---------------------------------------------------------------------------------
def _register_optimize(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "optimize", help="search the curriculum the simulator predicts gives the lowest loss"
    )
    p.add_argument("model", help="simulator file written by `simfluence fit`")
    p.add_argument("--size", type=positive_int, required=True, help="K pool examples to use")
    p.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        help="batch size (default: the model's training batch size)",
    )
    p.add_argument("--epochs", type=positive_int, default=1, help="epochs over the K (default 1)")
    p.add_argument(
        "--objective",
        choices=["mean", "ids"],
        default=None,
        help="mean final loss of all test examples (default), or of the --test ids",
    )
    p.add_argument(
        "--test",
        action="append",
        default=None,
        metavar="ID",
        help="test id of the objective (implies --objective ids); repeatable",
    )
    p.add_argument("--initial-loss", default=None, help="JSON file: {test_id: loss}")
    add_new_examples_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--budget",
        type=positive_int,
        default=200_000,
        help="curricula to roll out at most (default 200000)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="also stop after this many seconds (opt-in: the result then depends on the "
        "machine's speed and load; by default the search is bounded by --budget and stops "
        "after 3 rounds without improvement, so the same command gives the same curriculum)",
    )
    p.add_argument(
        "--include-unseen",
        action="store_true",
        help="also consider pool examples absent from the fitted runs (and those added by "
        "--features): outside the trust region, no run shows what they do",
    )
    p.add_argument(
        "--no-trust-region",
        dest="trust_region",
        action="store_false",
        help="let simulated losses go below the lowest recorded at each step (the simulator "
        "then extrapolates; its predictions are not to be trusted)",
    )
    p.add_argument(
        "--level",
        type=level,
        default=0.9,
        help="interval level of the pessimistic objective and the report (default 0.9)",
    )
    p.add_argument(
        "--runs",
        default=None,
        metavar="DIR",
        help="the run set the model was fitted on: a recorded curriculum whose actual loss beats "
        "what the search can promise (pessimistically) is returned instead (recommended)",
    )
    p.add_argument("-o", "--output", required=True, help="curriculum JSON to write")
    p.add_argument("--json", default=None, help="also write the search's figures as JSON here")
    p.set_defaults(func=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> None:
    simulator = with_new_examples(load_simulator(args.model), args.features, args.initial_loss)
    print_choice(simulator)
    if args.objective == "ids" and not args.test:
        raise SimfluenceError("--objective ids needs at least one --test ID")
    objective = args.test if args.test and args.objective != "mean" else "mean"
    batch = args.batch or round(float(getattr(simulator, "batch_size_", 0)))
    if batch < 1:
        raise SimfluenceError(f"{simulator.name} model has no batch size: pass --batch")
    result = optimize_curriculum(
        simulator,
        args.size,
        batch,
        args.epochs,
        objective,
        initial_loss(simulator, args.initial_loss),
        seed=args.seed,
        max_evaluations=args.budget,
        max_seconds=args.max_seconds,
        include_unseen=args.include_unseen,
        trust_region=args.trust_region,
        level=args.level,
        recorded=None if args.runs is None else load_runset(args.runs),
    )
    write_json_atomic(args.output, result.curriculum)
    what = "mean final loss" + ("" if objective == "mean" else f" of {', '.join(objective)}")
    print(
        f"searched {args.size} examples x {args.epochs} epochs, batch {batch} "
        f"({len(result.curriculum)} steps) in {result.seconds:.1f} s, "
        f"{result.evaluations} rollouts, {len(result.history)} rounds"
    )
    print(f"trust region: {result.trust_region}")
    if result.interval is not None:
        print(f"objective (pessimistic): the upper end of the {what}'s {args.level:g} interval")
    print(f"{what}: {result.statement}")
    if result.unconstrained < result.predicted - 1e-9:
        print(
            f"note: without the trust region the simulator predicts {result.unconstrained:.4g} "
            "for this curriculum, a gain no recorded run showed: not credited"
        )
    if result.source != "search":
        print(f"wrote {args.output} (the curriculum of {result.source})")
    elif result.gain_established is False:
        print(f"wrote {args.output} (the best found, not predicted to be reliably better)")
    else:
        print(f"wrote {args.output}")
    if args.json:
        write_json_atomic(args.json, {"model": str(args.model), **result.to_json()})
        print(f"wrote {args.json}")
