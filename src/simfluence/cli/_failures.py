"""How a command that evaluated several methods ends when some failed (shared by the commands)."""

from __future__ import annotations

from simfluence.cli._args import CommandFailedError
from simfluence.errors import SimfluenceError
from simfluence.evaluation import EvaluationResult, failure_message


def raise_failures(result: EvaluationResult) -> None:
    """After the results of the others are out: `CommandFailedError` naming the methods that
    failed (status 2 when every failure was a user mistake, else 1)."""
    if not result.failed:
        return
    names = ", ".join(result.failed)
    first_name, first = next(iter(result.failed.items()))
    mistakes = all(isinstance(exc, SimfluenceError) for exc in result.failed.values())
    raise CommandFailedError(
        f"{len(result.failed)} of {len(result.failed) + len(result.methods)} methods failed "
        f"({names}); {first_name}: {failure_message(first, first_name)}",
        status=2 if mistakes else 1,
    )
