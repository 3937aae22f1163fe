"""Import and export the GPTfluence run format (Chai et al. 2024).

One directory per run, holding two JSON-lines files:

* ``train_samples_id.json``: ``{"step": s, "samples_id": [id, ...]}``, steps from 1;
* ``all_loss_trajectory.out``:
  ``{"id": test_id, "loss_trajectory": [{"step": s, "loss": x}, ...]}``.

That format has no loss before training. On import, the first recorded loss step becomes the
starting point (our step 0) and the batch consumed at that step is dropped: it cannot be
simulated because its input loss is unknown. On export we also write the step-0 loss as
``{"step": 0, ...}`` so that an export/import round trip is exact; GPTfluence's readers index
losses by step and ignore it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from simfluence._atomic import write_text_atomic
from simfluence.errors import RunLogError
from simfluence.runlog.runs import Run, RunSet

TRAIN_FILE = "train_samples_id.json"
LOSS_FILE = "all_loss_trajectory.out"
_SEED = re.compile(r"seed[-_]?(\d+)")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunLogError(f"{path}: line {line_no}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise RunLogError(f"{path}: line {line_no}: expected a JSON object")
        rows.append(row)
    return rows


def _read_batches(path: Path) -> dict[int, list[str]]:
    batches: dict[int, list[str]] = {}
    for row in _read_jsonl(path):
        if "step" not in row or "samples_id" not in row:
            raise RunLogError(f"{path}: every line needs fields 'step' and 'samples_id'")
        step = int(row["step"])
        if step in batches:
            raise RunLogError(f"{path}: step {step} appears twice")
        batches[step] = [str(i) for i in row["samples_id"]]
    return batches


def _read_losses(path: Path) -> tuple[list[str], list[int], np.ndarray]:
    """Test ids, the recorded steps, and losses of shape ``(n_steps, M)``."""
    test_ids: list[str] = []
    columns: list[np.ndarray] = []
    steps_ref: list[int] | None = None
    for row in _read_jsonl(path):
        if "id" not in row or "loss_trajectory" not in row:
            raise RunLogError(f"{path}: every line needs fields 'id' and 'loss_trajectory'")
        test_id = str(row["id"])
        try:
            points = sorted(row["loss_trajectory"], key=lambda p: int(p["step"]))
        except (KeyError, TypeError, ValueError):
            raise RunLogError(
                f"{path}: test example {test_id!r}: every point needs an integer 'step'"
            ) from None
        steps = [int(p["step"]) for p in points]
        if steps_ref is None:
            steps_ref = steps
        elif steps != steps_ref:
            raise RunLogError(
                f"{path}: test example {test_id!r} is recorded at other steps than the first "
                "test example (ragged trajectories)"
            )
        test_ids.append(test_id)
        try:
            columns.append(np.array([float(p["loss"]) for p in points]))
        except (KeyError, TypeError, ValueError):
            raise RunLogError(
                f"{path}: test example {test_id!r}: every point needs a numeric 'loss'"
            ) from None
    if steps_ref is None:
        raise RunLogError(f"{path}: no test example trajectories")
    if steps_ref != list(range(steps_ref[0], steps_ref[0] + len(steps_ref))):
        raise RunLogError(f"{path}: loss steps are not consecutive (found {steps_ref[:8]}...)")
    return test_ids, steps_ref, np.stack(columns, axis=1)


def _import_run(run_dir: Path) -> tuple[Run, list[str]]:
    batches = _read_batches(run_dir / TRAIN_FILE)
    test_ids, steps, losses = _read_losses(run_dir / LOSS_FILE)
    first, last = steps[0], steps[-1]
    missing = [s for s in range(first + 1, last + 1) if s not in batches]
    if missing:
        raise RunLogError(f"{run_dir / TRAIN_FILE}: no batch for step {missing[0]}")
    seed_match = _SEED.search(run_dir.name)
    run = Run(
        run_id=run_dir.name,
        curriculum=[batches[s] for s in range(first + 1, last + 1)],
        losses=losses,
        seed=int(seed_match.group(1)) if seed_match else None,
        metadata={"imported_from": "gptfluence", "first_recorded_step": first},
    )
    return run, test_ids


def _sort_ids(ids: set[str]) -> list[str]:
    """Numeric order when every id is an integer, else lexical."""
    if all(i.lstrip("-").isdigit() for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)


def import_gptfluence(source: str | os.PathLike[str]) -> RunSet:
    """Read a folder of GPTfluence run directories into a validated `RunSet`.

    The pool is the union of every training id seen in any run; run ids are directory names.
    """
    source = Path(source)
    if not source.is_dir():
        raise RunLogError(f"{source}: no such directory")
    run_dirs = sorted(p for p in source.iterdir() if p.is_dir() and (p / TRAIN_FILE).exists())
    if (source / TRAIN_FILE).exists():
        run_dirs = [source]
    if not run_dirs:
        raise RunLogError(f"{source}: no run directories holding {TRAIN_FILE}")
    runs: list[Run] = []
    test_ref: list[str] | None = None
    for run_dir in run_dirs:
        if not (run_dir / LOSS_FILE).exists():
            raise RunLogError(f"{run_dir}: has {TRAIN_FILE} but no {LOSS_FILE}")
        run, test_ids = _import_run(run_dir)
        if test_ref is None:
            test_ref = test_ids
        elif test_ids != test_ref:
            raise RunLogError(f"{run_dir / LOSS_FILE}: its test ids differ from the first run's")
        runs.append(run)
    pool = _sort_ids({i for run in runs for batch in run.curriculum for i in batch})
    runset = RunSet(pool, test_ref or [], runs, {"imported_from": str(source)})
    return runset.validate(source=str(source))


def _json_id(value: str) -> int | str:
    return int(value) if value.lstrip("-").isdigit() else value


def export_gptfluence(runset: RunSet, out: str | os.PathLike[str]) -> list[Path]:
    """Write every run as a GPTfluence run directory under `out`; returns the directories.

    Integer-like ids are written as JSON integers, others as strings.
    """
    out = Path(out)
    written = []
    for run in runset.runs:
        run_dir = out / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        batch_lines = [
            json.dumps({"step": step, "samples_id": [_json_id(i) for i in batch]})
            for step, batch in enumerate(run.curriculum, start=1)
        ]
        loss_lines = [
            json.dumps(
                {
                    "id": _json_id(test_id),
                    "loss_trajectory": [
                        {"step": step, "loss": float(loss)}
                        for step, loss in enumerate(run.losses[:, col])
                    ],
                }
            )
            for col, test_id in enumerate(runset.test_ids)
        ]
        write_text_atomic(run_dir / TRAIN_FILE, "\n".join(batch_lines) + "\n")
        write_text_atomic(run_dir / LOSS_FILE, "\n".join(loss_lines) + "\n")
        written.append(run_dir)
    return written
