"""Recording training runs (needs torch): a recorder for your own loop, a Hugging Face `Trainer`
callback (`simfluence.recording.hf`, needs transformers), and a random-curriculum runner.
"""

from __future__ import annotations

from typing import Any

from simfluence.recording.recorder import Recorder, RecordingError
from simfluence.recording.runner import (
    checkpoint_path,
    load_checkpoint,
    record_runs,
    run_id_for,
    run_seed,
    steps_per_run,
)
from simfluence.recording.task import Examples, Task, TaskDefaults

__all__ = [
    "Examples",
    "IdCollator",
    "Recorder",
    "RecordingError",
    "SimfluenceCallback",
    "Task",
    "TaskDefaults",
    "checkpoint_path",
    "load_checkpoint",
    "record_runs",
    "run_id_for",
    "run_seed",
    "steps_per_run",
]


def __getattr__(name: str) -> Any:
    """`IdCollator` and `SimfluenceCallback` import transformers, so only when asked for."""
    if name in ("IdCollator", "SimfluenceCallback"):
        from simfluence.recording import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
