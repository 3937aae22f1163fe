"""Recording training runs (needs torch): a recorder for your own loop, a Hugging Face `Trainer`
callback (`simfluence.recording.hf`, needs transformers), a random-curriculum recording in a
`RecordingProtocol` (`record_runs`), and task
references (`resolve_task`, `task_reference`, `task_for_runset`) that let every command find a
user's own `Task` again.
"""

from __future__ import annotations

from typing import Any

from simfluence.recording.checkpoints import load_checkpoint
from simfluence.recording.devices import resolve_device
from simfluence.recording.loop import train_on_curriculum
from simfluence.recording.optim import OptimizerSpec, Schedule, optimizer_spec
from simfluence.recording.protocol import (
    ProtocolError,
    RecordingProtocol,
    checkpoint_steps,
    steps_per_run,
)
from simfluence.recording.record import record_defaults, record_runs
from simfluence.recording.recorder import Recorder, RecordingError, Scoring
from simfluence.recording.task import Examples, Task, TaskDefaults
from simfluence.recording.tasks import (
    prepare_for_runset,
    resolve_task,
    resolve_task_class,
    task_for_runset,
    task_reference,
)
from simfluence.recording.workers import run_seed
from simfluence.runlog.layout import checkpoint_path, run_id_for

__all__ = [
    "Examples",
    "IdCollator",
    "OptimizerSpec",
    "ProtocolError",
    "Recorder",
    "RecordingError",
    "RecordingProtocol",
    "Schedule",
    "Scoring",
    "SimfluenceCallback",
    "Task",
    "TaskDefaults",
    "checkpoint_path",
    "checkpoint_steps",
    "load_checkpoint",
    "optimizer_spec",
    "prepare_for_runset",
    "record_defaults",
    "record_runs",
    "resolve_device",
    "resolve_task",
    "resolve_task_class",
    "run_id_for",
    "run_seed",
    "steps_per_run",
    "task_for_runset",
    "task_reference",
    "train_on_curriculum",
]


def __getattr__(name: str) -> Any:
    """`IdCollator` and `SimfluenceCallback` import transformers, so only when asked for."""
    if name in ("IdCollator", "SimfluenceCallback"):
        from simfluence.recording import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
