"""The simulator options of every command that fits simulators (fit, evaluate, report, validate,
demo), added the same way, and the one builder that turns them into simulators.

Each flag sets one constructor parameter (`SIMULATOR_FLAGS`). An option the user gives must be
taken by each method named: `build_simulators` raises `SimfluenceError` (``simfluence CMD:
error: method 'hybrid' does not take --loss-power; its options: --l2, --unseen``) rather than
drop it. The baselines that take no options at all (``mean``, ``persistence``) and the methods
that choose their candidates' hyperparameters themselves (`CHOOSERS`: ``auto`` and ``stack``,
which take ``--unseen``, ``--cv-tests`` and ``--memory`` only) are left out of that check when
another named method takes the option, so ``--l2`` still works next to them (in the default
lists).

What the command line sets by itself (`IMPLICIT_FLAGS`: the task's location, the device, the
fit backend of ``--workers``/``--ray``, the run set's ``truth.npz``, the command's ``--unseen``
default) reaches only the methods that take it, never an error.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from simfluence.cli._args import add_task_option, positive_int
from simfluence.errors import SimfluenceError
from simfluence.runlog.layout import features_path
from simfluence.runlog.runs import RunSet
from simfluence.simulators import Simulator
from simfluence.simulators.registry import (
    configure_simulator,
    simulator_class,
    simulator_params,
)

#: command-line flag -> (argparse dest, the constructor parameter it sets). A flag given must be
#: taken by every method named (see the module docstring).
SIMULATOR_FLAGS: dict[str, tuple[str, str]] = {
    "--l2": ("l2", "l2"),
    "--loss-power": ("loss_power", "loss_power"),
    "--unseen": ("unseen", "unseen"),
    "--cv-tests": ("cv_tests", "cv_tests"),
    "--shards": ("shards", "test_shards"),
    "--memory": ("memory", "memory"),
}
#: methods that choose among simulators and their hyperparameters by cross-validation: an option
#: they do not take (``--l2``) is not an error when another method named takes it
CHOOSERS: frozenset[str] = frozenset({"auto", "stack"})
#: flags the command line passes on by itself, to the methods that take the parameter only
IMPLICIT_FLAGS: dict[str, str] = {
    "--task": "task",
    "--device": "device",
    "--workers/--ray": "backend",
}

L2_HELP = (
    "ridge strength; what it pulls toward depends on the method: linear, additive, "
    "linear-blend: each example's effect toward 'no effect'; featurized: the feature "
    "coefficients toward 'no effect'; hybrid: each example's effect toward the featurized one "
    "(default: chosen by cross-validation over whole training runs)"
)


def add_simulator_options(
    p: argparse.ArgumentParser, unseen: str = "prior", task: bool = True
) -> None:
    """``--l2``, ``--loss-power``, ``--unseen``, ``--cv-tests``, ``--shards``, ``--memory``
    (and ``--task``
    unless `task` is False: the command has its own). `unseen` is the command's default."""
    group = p.add_argument_group(
        "simulator options",
        "each option given must be taken by every method named (mean and persistence, which "
        "take none, excepted); a method that does not take it is an error",
    )
    group.add_argument("--l2", type=float, default=None, help=L2_HELP)
    group.add_argument(
        "--loss-power",
        type=float,
        default=None,
        help="linear: weight each step's squared error by (loss before it)^-POWER, so small "
        "losses are fitted more precisely (default 0, ordinary least squares; 1 ranks final "
        "losses better at some cost in all-steps MSE: see the README)",
    )
    group.add_argument(
        "--unseen",
        choices=["error", "prior"],
        default=None,
        help=f"a training id absent from the fitted runs: an error, or no effect (default: "
        f"{unseen})",
    )
    group.add_argument(
        "--cv-tests",
        type=positive_int,
        default=None,
        help="linear/additive: choose l2 on this many test examples drawn at random (default: "
        "all; a few hundred rank l2 as well as thousands, for a fraction of the cost)",
    )
    group.add_argument(
        "--shards",
        type=positive_int,
        default=None,
        help="linear/additive: fit in this many shards of test examples (default: one per "
        "worker with --workers or --ray)",
    )
    group.add_argument(
        "--memory",
        default=None,
        help="linear, hybrid, auto: optimizer memory, a lag kernel on the count matrices "
        "(none, adam, lr, adam+lr, a decay such as 0.8, '0.8+lr', or auto: chosen by run-wise "
        "CV; default: none, auto for the method auto)",
    )
    if task:
        add_task_option(
            group,  # type: ignore[arg-type]
            "the gradient methods and the example features: where the run set's task is, when "
            "the reference stored in its manifest no longer works (a built-in name, "
            "package.module:Class, path/to/file.py:Class or a plugin name; default: the stored "
            "one)",
        )
    p.set_defaults(unseen_default=unseen)


def fit_backend(args: argparse.Namespace) -> str | None:
    """The backend spec that ``--workers``/``--ray`` give the sharded fits (None: serial)."""
    if getattr(args, "ray", None) is not None:
        return f"ray:{args.ray}" if args.ray else "ray"
    if getattr(args, "workers", None) is not None:
        return f"process:{args.workers}"
    return None


def method_flags(name: str) -> list[str]:
    """The command-line flags that reach method `name`."""
    taken = set(simulator_params(name))
    flags = [flag for flag, (_, param) in SIMULATOR_FLAGS.items() if param in taken]
    return flags + [flag for flag, param in IMPLICIT_FLAGS.items() if param in taken]


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """flag -> value for each simulator option the user gave (not left at its default)."""
    return {
        flag: getattr(args, dest)
        for flag, (dest, _) in SIMULATOR_FLAGS.items()
        if getattr(args, dest, None) is not None
    }


def check_options(methods: Sequence[str], given: Mapping[str, Any]) -> None:
    """`SimfluenceError` for the first method named that does not take an option given."""
    params = {name: set(simulator_params(name)) for name in methods}
    settable = {param for _, param in SIMULATOR_FLAGS.values()}
    for flag in given:
        param = SIMULATOR_FLAGS[flag][1]
        takers = [name for name in methods if param in params[name]]
        for name in methods:
            if param in params[name]:
                continue
            if takers and (not params[name] & settable or name in CHOOSERS):
                continue  # a baseline (or auto) beside a method that takes it
            flags = method_flags(name)
            raise SimfluenceError(
                f"method {name!r} does not take {flag}; its options: "
                f"{', '.join(flags) if flags else 'none'}"
            )


def build_simulators(
    args: argparse.Namespace, methods: Sequence[str], **implicit: Any
) -> dict[str, Simulator]:
    """One fresh simulator per method from the parsed options (see the module docstring).

    `implicit`: more parameters the command sets by itself (e.g. ``path`` for the truth
    oracle), passed to the methods that take them."""
    given = given_options(args)
    check_options(methods, given)
    defaults = {
        "unseen": getattr(args, "unseen_default", None),
        "task": getattr(args, "task", None),
        "device": getattr(args, "device", None),
        "backend": fit_backend(args),
        **implicit,
    }
    simulators = {}
    for name in methods:
        taken = set(simulator_params(name))
        options = {
            SIMULATOR_FLAGS[flag][1]: value
            for flag, value in given.items()
            if SIMULATOR_FLAGS[flag][1] in taken
        }
        simulators[name] = configure_simulator(name, defaults=defaults, **options)
    return simulators


def choice_line(simulator: Simulator) -> str | None:
    """The line that says which simulator a method that chooses (``auto``) picked, and why
    (its cross-validated scores); None for every other method."""
    if not callable(getattr(simulator, "choice", None)):
        return None
    return str(simulator.describe())  # type: ignore[attr-defined]


def print_choice(simulator: Simulator) -> None:
    """Print `choice_line` when there is one."""
    line = choice_line(simulator)
    if line:
        print(line)


def with_features(
    directory: str | os.PathLike[str], runs: RunSet, methods: Sequence[str], task: Any = None
) -> RunSet:
    """`runs` with example features, computed with the task's encoder and stored beside the run
    set when some of `methods` need them and it has none (as ``simfluence features DIR``).

    A run set that `simfluence record` did not write (and no `task` given: a task reference or
    object) is returned as it is: the method that needs features then says what to do."""
    if runs.features is not None or not any(
        getattr(simulator_class(name), "needs_features", False) for name in methods
    ):
        return runs
    if task is None and not ((runs.metadata or {}).get("config") or {}).get("workload"):
        return runs
    from simfluence.recording.features import write_features

    print(
        f"computing example features with the task's encoder (stored in {features_path(directory)})"
    )
    runs.features = write_features(directory, task)
    return runs
