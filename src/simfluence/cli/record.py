"""``simfluence record``: record runs of a task on random curricula (resumable)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from simfluence.backends import PRELOAD, close_backend
from simfluence.cli._args import (
    TASK_HELP,
    add_execution_options,
    add_task_option,
    backend_from_args,
    load_json_object,
    positive_int,
)
from simfluence.errors import SimfluenceError

_DEFAULT_TASK = "digits-mlp"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "record",
        help="record training runs of a task on random curricula (rerun to resume)",
        description="Train a task's model on random curricula from one initial model and "
        "score every test example after every step. Interrupted recordings resume where they "
        "stopped when the same command is run again (options left out take the values the "
        "directory was recorded with). Options default to the task's.",
    )
    p.add_argument("directory", help="run-set directory to write (or resume)")
    add_task_option(
        p,
        f"{TASK_HELP} (default: the task DIRECTORY was recorded with, else {_DEFAULT_TASK}); "
        "stored in the run set so later commands find it",
    )
    p.add_argument(
        "--task-kwargs",
        default=None,
        metavar="JSON",
        help="constructor arguments of the task as a JSON object, e.g. '{\"hidden\": 64}'",
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
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the data split, model, curricula (0)"
    )
    p.add_argument(
        "--checkpoints",
        default=None,
        metavar="STEPS",
        help="comma-separated steps at which to save the model of every run (0 = before "
        "training), e.g. 0,20,40; 'none' for none (default: 4 evenly spaced steps from 0, "
        "what the gradient methods need)",
    )
    p.add_argument(
        "--reserve",
        type=float,
        default=None,
        metavar="SHARE",
        help="never-seen protocol: keep this share of the pool (e.g. 0.2) for the held-out runs "
        "only (default: the share DIR was recorded with when resuming, else 0: off)",
    )
    p.add_argument(
        "--reserve-from",
        type=int,
        default=None,
        metavar="RUN",
        help="with --reserve: runs with this index and above may draw the reserved examples "
        "(default: the last round(5 * runs / 32), the runs `evaluate` holds out by default)",
    )
    p.add_argument(
        "--score-every",
        type=int,
        default=None,
        metavar="K",
        help="sparse scoring: score the test examples every K steps only (step 0 and the last "
        "step always); unscored losses are missing in the run files and every simulator fits "
        "from the gaps (default: the value DIR was recorded with, else 1: every step)",
    )
    p.add_argument(
        "--score-fraction",
        type=float,
        default=None,
        metavar="F",
        help="sparse scoring: score a rotating share F of the test examples at every (scored) "
        "step, e.g. 0.1 (default: the value DIR was recorded with, else 1: all)",
    )
    p.add_argument(
        "--score-full-from",
        type=int,
        default=None,
        metavar="RUN",
        help="with sparse scoring: runs with this index and above are scored in full (e.g. the "
        "held-out runs `evaluate` scores at every step: the last round(5 * runs / 32))",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adamw"],
        default=None,
        help="the algorithm, over the parameters the task trains (default: the one DIRECTORY "
        "was recorded with, else the task's own optimizer, plain SGD for the built-in ones); "
        "stored in the run set's config",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay (default: 0 for SGD, 0.01 for AdamW)",
    )
    p.add_argument(
        "--schedule",
        choices=["constant", "linear", "cosine"],
        default=None,
        help="learning-rate schedule after the warm-up (default: constant)",
    )
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 0)")
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip the gradients to this total 2-norm before every step, as Hugging Face's "
        "Trainer does (1.0 there; default here: no clipping)",
    )
    p.add_argument(
        "--adapter",
        choices=["lora"],
        default=None,
        help="train LoRA adapters (PEFT) instead of the workload's top layers (smollm2-polarity)",
    )
    add_execution_options(p, "runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_record)


def parse_checkpoints(text: str | None) -> list[int] | None:
    """``--checkpoints``: None (the default), ``[]`` for 'none', else the step numbers."""
    if text is None:
        return None
    if text.strip().lower() in ("none", ""):
        return []
    steps = []
    for item in text.split(","):
        try:
            steps.append(int(item))
        except ValueError:
            raise SimfluenceError(f"--checkpoints: {item.strip()!r} is not a step number") from None
    return steps


def cmd_record(args: argparse.Namespace) -> None:
    # warm workers start first (in the background): their fork server imports torch while
    # this process imports it too and prepares the task
    backend = backend_from_args(args)
    if hasattr(backend, "start"):
        backend.start(preload=PRELOAD)
    try:
        _record_with(args, backend)
    finally:  # shut the workers down here, not in the interpreter's exit handlers
        close_backend(backend)


def _record_with(args: argparse.Namespace, backend: Any) -> None:
    from simfluence.recording.directory import recorded_metadata
    from simfluence.recording.protocol import ProtocolError
    from simfluence.recording.record import record_runs
    from simfluence.recording.tasks import resolve_task, task_from_metadata, task_label
    from simfluence.trust import remember_trusted

    steps = parse_checkpoints(args.checkpoints)
    kwargs = load_json_object(args.task_kwargs, "--task-kwargs")
    meta = {}
    if args.task is None and not kwargs:
        meta = recorded_metadata(args.directory)
    if meta:  # resume the task it was recorded with
        task = task_from_metadata(meta, str(args.directory))
        task_ref = (meta.get("task_spec") or {}).get("ref")
    else:
        task_ref = args.task or _DEFAULT_TASK
        if args.adapter:
            kwargs = {**kwargs, "adapter": args.adapter}
            _check_accepts(task_ref, "adapter")
        task = resolve_task(task_ref, kwargs)
        remember_trusted(task_ref)  # the user's own task code: later commands may import it
    optimizer = _optimizer_spec(args)
    if optimizer is None and meta:  # resume as recorded
        optimizer = _recorded_optimizer(meta, task)
    start = time.perf_counter()
    try:
        protocol = _protocol(args, steps, optimizer)
        runset = record_runs(
            task,
            args.directory,
            protocol,
            task_ref=task_ref,
            device=args.device,
            backend=backend,
            progress=not args.no_progress,
        )
    except ProtocolError as exc:  # the library names the protocol's fields; here, the flags
        raise SimfluenceError(exc.with_name(_flag(exc.field))) from None
    except KeyboardInterrupt:
        print(
            f"interrupted: finished runs are kept in {args.directory}; run the same command "
            "again to resume",
            file=sys.stderr,
        )
        raise
    seconds = time.perf_counter() - start
    config = runset.metadata["config"]
    ckpt = config["checkpoints"]
    print(
        f"recorded {len(runset.runs)} runs x {config['steps']} steps of {task_label(task)} "
        f"(pool {config['pool']}, {config['tests']} test examples, "
        f"{config['optimizer']['name'] if 'optimizer' in config else 'SGD'} lr {config['lr']:g}"
        f"{f', checkpoints at steps {ckpt}' if ckpt else ', no checkpoints'}) in "
        f"{seconds:.1f} s ({backend.name}); wrote {args.directory}"
    )


def _protocol(args: argparse.Namespace, checkpoints: list[int] | None, optimizer):  # type: ignore[no-untyped-def]
    """The `RecordingProtocol` the flags ask for (options left out: None); `optimizer`: an
    `OptimizerSpec` or None."""
    from simfluence.recording.protocol import RecordingProtocol

    return RecordingProtocol(
        runs=args.runs,
        pool=args.pool,
        per_run=args.per_run,
        tests=args.tests,
        batch=args.batch,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        checkpoints=checkpoints,
        reserve=args.reserve,
        reserve_from=args.reserve_from,
        optimizer=optimizer,
        score_every=args.score_every,
        score_fraction=args.score_fraction,
        score_full_from=args.score_full_from,
    )


def _flag(field: str) -> str:
    """The flag of a protocol field: ``per_run`` -> ``--per-run``."""
    return "--" + field.replace("_", "-")


def _optimizer_spec(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The `OptimizerSpec` that --optimizer/--weight-decay/--schedule/--warmup/--max-grad-norm
    ask for; None when none is given (resuming keeps the recorded optimizer, else the task's
    own)."""
    given = (args.optimizer, args.weight_decay, args.schedule, args.warmup, args.max_grad_norm)
    if all(value is None for value in given):
        return None
    from simfluence.recording.optim import OptimizerSpec

    return OptimizerSpec(
        name=args.optimizer,
        weight_decay=args.weight_decay,
        schedule=args.schedule or "constant",
        warmup=0 if args.warmup is None else args.warmup,
        max_grad_norm=args.max_grad_norm,
    )


def _recorded_optimizer(meta: dict, task):  # type: ignore[no-untyped-def]
    """The `OptimizerSpec` the resumed recording was made with (None: the task's own)."""
    from simfluence.recording.optim import spec_from_config

    config = meta.get("config") or {}
    return spec_from_config(config, task, task.make_model(config.get("seed", 0)))


def _check_accepts(task_ref: str, option: str) -> None:
    """One-line error when the task's constructor has no `option` parameter."""
    import inspect

    from simfluence.recording.tasks import resolve_task_class

    cls = resolve_task_class(task_ref)
    if option not in inspect.signature(cls.__init__).parameters:
        raise SimfluenceError(f"--{option}: task {task_ref!r} does not take this option")
