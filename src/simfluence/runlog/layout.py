"""Where everything of a run-set directory lives: the one module that spells out its paths.

    DIR/manifest.json                          pool + test ids, metadata (`simfluence.runlog.store`)
    DIR/features.npz                           optional: one vector per example
                                               (`simfluence.runlog.features`)
    DIR/truth.npz                              synthetic run sets only: the true parameters
                                               (`simfluence.simulators.truth`)
    DIR/runs/run-0000.parquet ...              one file per run (``run-{index:04d}`` for the runs
                                               of a recording)
    DIR/checkpoints/run-0000/step-20.pt ...    the model's state_dict of a recorded run at a step
                                               (`simfluence.recording.checkpoints`)
    .NAME.XXXX.tmp (beside NAME)               a temporary file of an atomic write
                                               (`simfluence._atomic`) an interrupted write left
    DIR/.simfluence.lock                       held (flock) by the one process recording into
                                               DIR (`simfluence._lock`); not part of the run set

Pure path arithmetic: no file is read or written here, and torch is never imported (the
command line asks where a checkpoint is without loading one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from simfluence._atomic import TEMPORARY_GLOB

MANIFEST = "manifest.json"
FEATURES_FILE = "features.npz"
TRUTH_FILE = "truth.npz"
RUNS_DIR = "runs"
CHECKPOINTS_DIR = "checkpoints"
RUN_SUFFIX = ".parquet"
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_SUFFIX = ".pt"
LOCK_FILE = ".simfluence.lock"

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")

PathLike = str | os.PathLike[str]


def run_id_for(index: int) -> str:
    """The id of run number `index` of a recording: ``run-0000``, ``run-0001``, ..."""
    return f"run-{index:04d}"


def manifest_path(directory: PathLike) -> Path:
    """The manifest of the run set at `directory`."""
    return Path(directory) / MANIFEST


def lock_path(directory: PathLike) -> Path:
    """The file whose lock the process recording into `directory` holds."""
    return Path(directory) / LOCK_FILE


def features_path(directory: PathLike) -> Path:
    """The example features stored beside the run set at `directory`."""
    return Path(directory) / FEATURES_FILE


def truth_path(directory: PathLike) -> Path:
    """The true parameters of the synthetic run set at `directory`."""
    return Path(directory) / TRUTH_FILE


def runs_dir(directory: PathLike) -> Path:
    """The folder of the run files."""
    return Path(directory) / RUNS_DIR


def run_path(directory: PathLike, run_id: str) -> Path:
    """Where run `run_id` lives in the run set at `directory`."""
    return runs_dir(directory) / f"{_SAFE_NAME.sub('_', run_id)}{RUN_SUFFIX}"


def run_files(directory: PathLike) -> list[Path]:
    """The finished run files of a run set (temporary files of interrupted writes excluded)."""
    folder = runs_dir(directory)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{RUN_SUFFIX}") if not p.name.startswith("."))


def checkpoint_dir(directory: PathLike, run_id: str) -> Path:
    """The folder of run `run_id`'s checkpoints."""
    return Path(directory) / CHECKPOINTS_DIR / run_id


def checkpoint_path(directory: PathLike, run_id: str, step: int) -> Path:
    """Where the checkpoint of run `run_id` at step `step` lives."""
    return checkpoint_dir(directory, run_id) / f"{CHECKPOINT_PREFIX}{int(step)}{CHECKPOINT_SUFFIX}"


def saved_checkpoint_steps(directory: PathLike, run_id: str) -> list[int]:
    """The steps at which run `run_id` has a checkpoint on disk, sorted."""
    folder = checkpoint_dir(directory, run_id)
    if not folder.is_dir():
        return []
    pattern = f"{CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX}"
    return sorted(int(p.stem.removeprefix(CHECKPOINT_PREFIX)) for p in folder.glob(pattern))


def stale_temporaries(directory: PathLike) -> Iterator[Path]:
    """The temporary files interrupted writes left in the run and checkpoint folders."""
    checkpoints = Path(directory) / CHECKPOINTS_DIR
    for folder in [runs_dir(directory), *checkpoints.glob("*")]:
        if folder.is_dir():
            yield from folder.glob(TEMPORARY_GLOB)
