"""Entry point: builds the parser from each command module and turns user mistakes into one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from simfluence.cli import core, counterfactual, demo, record, report, validate
from simfluence.errors import SimfluenceError

#: command modules; each has ``register(subparsers)`` and sets ``func`` on its parsers
COMMAND_MODULES = [core, record, demo, validate, counterfactual, report]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except SimfluenceError as exc:
        print(f"simfluence {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"simfluence {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
