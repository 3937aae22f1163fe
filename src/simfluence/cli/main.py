"""Entry point: builds the parser from each command module and turns user mistakes into one line.

Every user mistake (a bad option, a missing file, an unknown task or method, a missing optional
package) prints ``simfluence COMMAND: error: ...`` on one line of stderr and exits with 2, never
a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from simfluence._resolve import install_hint
from simfluence.cli import core, counterfactual, demo, features, record, report, validate
from simfluence.cli._args import CommandFailedError
from simfluence.errors import SimfluenceError
from simfluence.trust import trusting_tasks

#: command modules; each has ``register(subparsers)`` and sets ``func`` on its parsers
COMMAND_MODULES = [core, record, features, demo, validate, counterfactual, report]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="simfluence",
        description="Training-run simulation (Simfluence): record runs, fit simulators, "
        "simulate curricula, evaluate on held-out runs.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 user mistake, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    prefix = f"simfluence {args.command}"
    try:
        with trusting_tasks(getattr(args, "trust_task", False)):  # --trust-task
            args.func(args)
    except SimfluenceError as exc:
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except CommandFailedError as exc:
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.status
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        print(
            f"{prefix}: error: this needs the package {exc.name!r}, which is not installed "
            f"({install_hint(exc.name)})",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> NoReturn:
    """The ``simfluence`` program: `main` on ``sys.argv``, then `exit_now` with its status."""
    exit_now(main())


def exit_now(status: int) -> NoReturn:
    """End the process with `status` as a normal exit would, minus the interpreter's teardown.

    Tearing down torch's modules and objects takes 0.5 to 1 s of every command that imported
    it (measured on the 2-core machine: ``import torch`` alone, 2.0 s with teardown, 1.1 s
    without), and nothing a command leaves needs it: the commands write files atomically and
    close them. What a normal exit does that matters is done here, in its order: non-daemon
    threads are joined, the ``atexit`` handlers run (multiprocessing's and Ray's clean-up, log
    handlers' flush), and the standard streams are flushed.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (``| head``) or stream
            stream.flush()
    os._exit(status)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    run()
