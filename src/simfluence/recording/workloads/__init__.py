"""The built-in workloads, by name.

``WORKLOADS`` maps a workload's command-line name to its `Task` class; `get_workload` makes one.
The pretrained workloads import their heavy dependencies (transformers, gguf) only when used.
"""

from __future__ import annotations

from simfluence.errors import SimfluenceError
from simfluence.recording.task import Task
from simfluence.recording.workloads._common import cache_dir
from simfluence.recording.workloads.digits_logreg import DigitsLogRegTask
from simfluence.recording.workloads.digits_mlp import DigitsMLPTask
from simfluence.recording.workloads.newsgroups_minilm import NewsgroupsMiniLMTask
from simfluence.recording.workloads.smollm2_polarity import SmolLM2PolarityTask

#: the default workload's name
DEFAULT_WORKLOAD = DigitsMLPTask.name

WORKLOADS: dict[str, type[Task]] = {
    DigitsMLPTask.name: DigitsMLPTask,
    DigitsLogRegTask.name: DigitsLogRegTask,
    NewsgroupsMiniLMTask.name: NewsgroupsMiniLMTask,
    SmolLM2PolarityTask.name: SmolLM2PolarityTask,
}


def get_workload(name: str) -> Task:
    """A new instance of the built-in workload called `name` (any task reference, a user's
    own task included: `simfluence.recording.tasks.resolve_task`).

    Raises `SimfluenceError` (a `ValueError`) naming the unknown workload and listing the
    known ones.
    """
    try:
        cls = WORKLOADS[name]
    except KeyError:
        known = ", ".join(sorted(WORKLOADS))
        raise SimfluenceError(f"unknown workload {name!r}; known workloads: {known}") from None
    return cls()


__all__ = [
    "DEFAULT_WORKLOAD",
    "WORKLOADS",
    "DigitsLogRegTask",
    "DigitsMLPTask",
    "NewsgroupsMiniLMTask",
    "SmolLM2PolarityTask",
    "cache_dir",
    "get_workload",
]
