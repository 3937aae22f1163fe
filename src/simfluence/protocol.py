"""Protocol policies shared by evaluation and recording (torch-free: the core imports it)."""

from __future__ import annotations


def default_holdout(n_runs: int) -> int:
    """How many of `n_runs` runs are held out by default: the GPTfluence protocol holds out
    5 of 32 runs, so ``max(1, round(n_runs * 5 / 32))`` (about 1 in 6, at least 1).

    `simfluence evaluate` and `simfluence report` hold out the last that many runs; a
    never-seen recording (`simfluence.recording.protocol.RecordingProtocol.reserve`) lets the
    same last runs draw the reserved examples.
    """
    return max(1, round(n_runs * 5 / 32))
