"""Argument helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from simfluence.errors import SimfluenceError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def level(text: str) -> float:
    """An interval level strictly between 0 and 1 (e.g. 0.9)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.9, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {value}")
    return value


def comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file the user gave; `SimfluenceError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SimfluenceError(f"{what} {path}: no such file")
    from simfluence._safe_io import loads_json

    return loads_json(path.read_bytes(), f"{what} {path}")


class CommandFailedError(Exception):
    """A command finished part of its work and reports the rest as failed (e.g. one method of
    `evaluate`): `main` prints the message as one line and exits with `status`."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


TASK_HELP = (
    "the task: a built-in workload name, package.module:Class, path/to/file.py:Class, or an "
    "installed plugin's name (entry point group simfluence.tasks)"
)


def add_task_option(p: argparse.ArgumentParser, help: str, trust: bool = True) -> None:
    """``--task REF`` (``--workload`` is its older name), and ``--trust-task`` unless `trust`
    is False (a command that never imports a run set's task)."""
    p.add_argument("--task", "--workload", dest="task", default=None, metavar="REF", help=help)
    if trust:
        add_trust_option(p)


def add_trust_option(p: argparse.ArgumentParser) -> None:
    """``--trust-task``: import the task code a run set's manifest names even when it is not a
    built-in, an installed plugin or on the user's allow-list (`simfluence.trust`)."""
    p.add_argument(
        "--trust-task",
        action="store_true",
        help="run the task code (a file or module) that the run set's manifest names, though "
        "it was not recorded on this machine (only for run sets you trust: see "
        "docs/security.md; or set SIMFLUENCE_TRUST_TASK=1)",
    )


def load_json_object(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object given on the command line (``{}`` when None)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SimfluenceError(f"{what} {text!r}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SimfluenceError(f"{what} {text!r}: expected a JSON object {{name: value}}")
    return value


def add_execution_options(
    p: argparse.ArgumentParser,
    what: str,
    *,
    verb: str = "train",
    device: str = "where to train",
    threads: bool = True,
) -> None:
    """``--device``, ``--workers``, ``--ray [ADDRESS]`` (and ``--threads`` unless `threads` is
    False) for commands that train or fit (`what` says what the units of work are, `verb` what
    is done to them, `device` what ``--device`` chooses)."""
    group = p.add_argument_group("execution options")
    group.add_argument(
        "--device",
        default="cpu",
        help=f"{device}: auto (a GPU when there is one), cpu (default), cuda or cuda:K",
    )
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help=f"{verb} {what} in N local processes at a time (default: one after another here)",
    )
    where.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=f"{verb} {what} as Ray tasks: on a local Ray instance, or the cluster at ADDRESS "
        "(needs pip install 'simfluence[ray]')",
    )
    if threads:
        group.add_argument(
            "--threads",
            type=positive_int,
            default=None,
            help="torch threads per unit of work (default: 1 with --workers or --ray)",
        )


def add_fit_execution_options(p: argparse.ArgumentParser) -> None:
    """`add_execution_options` for commands that fit simulators: the units of work are the
    shards of the linear/additive fits, ``--device`` is where gradient methods compute."""
    add_execution_options(
        p,
        "the shards of the linear/additive fits",
        verb="fit",
        device="gradient methods: where gradients are computed",
        threads=False,
    )


def backend_from_args(args: argparse.Namespace) -> Any:
    """The `simfluence.backends` backend that ``--workers``/``--ray``/``--threads`` ask for."""
    from simfluence.backends import SerialBackend, make_backend

    gpus = 1 if str(args.device).startswith("cuda") else 0
    if args.ray is not None:
        spec = f"ray:{args.ray}" if args.ray else "ray"
        return make_backend(spec, threads=args.threads or 1, gpus=gpus)
    if args.workers is not None:
        return make_backend(f"process:{args.workers}", threads=args.threads or 1)
    return SerialBackend(args.threads)
