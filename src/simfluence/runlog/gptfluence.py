"""Import and export the GPTfluence run format (Chai et al. 2024).

One directory per run, holding two JSON-lines files:

* ``train_samples_id.json``: ``{"step": s, "samples_id": [id, ...]}``, steps from 1;
* ``all_loss_trajectory.out``:
  ``{"id": test_id, "loss_trajectory": [{"step": s, "loss": x}, ...]}``.

Ids are integers: GPTfluence's Simfluence keeps its parameters in one table indexed by
``test_id * n_train + train_id``, so training ids must be ``0..P-1`` and test ids ``0..M-1``.
Its reader pairs consecutive points of a loss trajectory (point ``k-1`` -> point ``k``, with the
batch of point ``k``'s step), so the first point of a trajectory is the starting point.

On import, the first recorded loss step becomes our step 0 and the batch consumed at that step is
dropped: its input loss is unknown, so it cannot be simulated. On export we write the loss before
training as ``{"step": 0, ...}``, which the peer then uses as its starting point, and a side file
``simfluence_ids.json`` mapping the integer ids back to ours (plus what the format has no room
for: seeds, learning rates, metadata), so that export followed by import is exact.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from simfluence._atomic import write_json_atomic, write_text_atomic
from simfluence._safe_io import loads_json, refuse_malformed
from simfluence.errors import RunLogError
from simfluence.runlog.runs import Run, RunSet

TRAIN_FILE = "train_samples_id.json"
LOSS_FILE = "all_loss_trajectory.out"
IDS_FILE = "simfluence_ids.json"
IDS_FORMAT = "simfluence.gptfluence-ids"
_SEED = re.compile(r"seed[-_]?(\d+)")


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line."""
    rows = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunLogError(f"{path}: not UTF-8 text ({exc})") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = loads_json(line, f"{path}: line {line_no}", RunLogError)
        if not isinstance(row, dict):
            raise RunLogError(f"{path}: line {line_no}: expected a JSON object")
        rows.append((line_no, row))
    return rows


def _integer(value: Any, where: str) -> int:
    """`value` if it is a JSON integer (not a bool), else a `RunLogError` naming `where`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise RunLogError(f"{where} must be an integer, got {value!r}")


class _Names:
    """Integer id -> our id: through the side file's list when there is one, else ``str``."""

    def __init__(self, names: list[str] | None, kind: str) -> None:
        self.names = names
        self.kind = kind

    def __call__(self, value: Any, where: str) -> str:
        number = _integer(value, f"{where}: {self.kind} id")
        if self.names is None:
            return str(number)
        if not 0 <= number < len(self.names):
            raise RunLogError(
                f"{where}: {self.kind} id {number} is outside 0..{len(self.names) - 1} "
                f"(the ids listed in {IDS_FILE})"
            )
        return self.names[number]


def _read_batches(path: Path, name: _Names) -> dict[int, list[str]]:
    batches: dict[int, list[str]] = {}
    for line_no, row in _read_jsonl(path):
        where = f"{path}: line {line_no}"
        if "step" not in row or "samples_id" not in row:
            raise RunLogError(f"{where}: every line needs fields 'step' and 'samples_id'")
        step = _integer(row["step"], f"{where}: 'step'")
        if step in batches:
            raise RunLogError(f"{where}: step {step} appears twice")
        if not isinstance(row["samples_id"], list):
            raise RunLogError(f"{where}: 'samples_id' must be a list of integers")
        batches[step] = [name(i, f"{where}: 'samples_id'") for i in row["samples_id"]]
    return batches


def _read_losses(
    path: Path, name: _Names
) -> tuple[list[str], list[int], np.ndarray, np.ndarray | None]:
    """Test ids, the steps from the first recorded one to the last, losses of shape
    ``(n_steps, M)`` (NaN where a trajectory has no point) and the observed mask (None when
    every trajectory has every step: sparse recordings export only the scored points)."""
    test_ids: list[str] = []
    trajectories: list[dict[int, float]] = []
    for line_no, row in _read_jsonl(path):
        where = f"{path}: line {line_no}"
        if "id" not in row or "loss_trajectory" not in row:
            raise RunLogError(f"{where}: every line needs fields 'id' and 'loss_trajectory'")
        test_id = name(row["id"], f"{where}: 'id'")
        points = row["loss_trajectory"]
        if not isinstance(points, list) or not all(
            isinstance(p, dict) and isinstance(p.get("step"), int) for p in points
        ):
            raise RunLogError(
                f"{where}: test example {test_id!r}: every point needs an integer 'step'"
            )
        test_ids.append(test_id)
        try:
            trajectories.append({p["step"]: float(p["loss"]) for p in points})
        except (KeyError, TypeError, ValueError):
            raise RunLogError(
                f"{where}: test example {test_id!r}: every point needs a numeric 'loss'"
            ) from None
    recorded = sorted(set().union(*trajectories)) if trajectories else []
    if not recorded:
        raise RunLogError(f"{path}: no test example trajectories")
    steps = list(range(recorded[0], recorded[-1] + 1))
    losses = np.full((len(steps), len(test_ids)), np.nan)
    for col, points in enumerate(trajectories):
        for step, loss in points.items():
            losses[step - steps[0], col] = loss
    observed = ~np.isnan(losses)
    if not observed[0].all():
        col = int(np.argmin(observed[0]))
        raise RunLogError(
            f"{path}: test example {test_ids[col]!r} has no loss at the first recorded step "
            f"{steps[0]} (every trajectory must start there)"
        )
    return test_ids, steps, losses, None if observed.all() else observed


def _import_run(run_dir: Path, ids: dict[str, Any] | None) -> tuple[Run, list[str]]:
    train_name = _Names(ids["train_ids"] if ids else None, "training")
    test_name = _Names(ids["test_ids"] if ids else None, "test")
    batches = _read_batches(run_dir / TRAIN_FILE, train_name)
    test_ids, steps, losses, observed = _read_losses(run_dir / LOSS_FILE, test_name)
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
        observed=observed,
    )
    saved = (ids or {}).get("runs", {}).get(run.run_id)
    if saved is not None:
        _restore_run(run, saved, run_dir)
    return run, test_ids


def _restore_run(run: Run, saved: dict[str, Any], run_dir: Path) -> None:
    """Give back what the format has no room for, as `export_gptfluence` saved it."""
    run.seed = saved.get("seed")
    run.metadata = dict(saved.get("metadata") or {})
    lr = saved.get("lr")
    if lr is not None:
        if len(lr) != run.n_steps:
            raise RunLogError(
                f"{run_dir.parent / IDS_FILE}: run {run.run_id!r} has {len(lr)} learning rates "
                f"but {run.n_steps} steps in {run_dir / LOSS_FILE}"
            )
        run.lr = np.array([np.nan if x is None else x for x in lr], dtype=np.float64)


def _read_ids(path: Path) -> dict[str, Any]:
    try:
        ids = loads_json(path.read_bytes(), f"{path}: cannot read", RunLogError)
    except OSError as exc:
        raise RunLogError(f"{path}: cannot read ({exc})") from None
    if not isinstance(ids, dict) or ids.get("format") != IDS_FORMAT:
        raise RunLogError(f"{path}: not a {IDS_FORMAT} file")
    for field in ("train_ids", "test_ids"):
        names = ids.get(field)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RunLogError(f"{path}: {field!r} must be a list of strings")
        if len(set(names)) != len(names):
            raise RunLogError(f"{path}: {field!r} has duplicates")
    if not isinstance(ids.get("runs", {}), dict):
        raise RunLogError(f"{path}: 'runs' must be an object")
    return ids


def _sort_ids(ids: set[str]) -> list[str]:
    """Numeric order (every id on import without a side file is an integer)."""
    return sorted(ids, key=int)


def import_gptfluence(source: str | os.PathLike[str]) -> RunSet:
    """Read a folder of GPTfluence run directories (or one run directory) into a `RunSet`.

    Ids must be JSON integers. When the folder (or, for one run directory, its parent) holds
    ``simfluence_ids.json`` (written by `export_gptfluence`), integer ids are mapped back to the
    original ids and the pool, seeds, learning rates and metadata are restored; otherwise ids
    become their decimal strings and the pool is the union of the ids the runs consumed. Run
    ids are directory names (a ``seed-N`` in the name becomes the run's seed).
    """
    source = Path(source)
    if not source.is_dir():
        raise RunLogError(f"{source}: no such directory")
    run_dirs = sorted(p for p in source.iterdir() if p.is_dir() and (p / TRAIN_FILE).exists())
    ids_path = source / IDS_FILE
    if (source / TRAIN_FILE).exists():
        run_dirs = [source]
        ids_path = source.parent / IDS_FILE
    if not run_dirs:
        raise RunLogError(f"{source}: no run directories holding {TRAIN_FILE}")
    ids = _read_ids(ids_path) if ids_path.exists() else None
    runs: list[Run] = []
    test_ref: list[str] | None = None
    for run_dir in run_dirs:
        if not (run_dir / LOSS_FILE).exists():
            raise RunLogError(f"{run_dir}: has {TRAIN_FILE} but no {LOSS_FILE}")
        with refuse_malformed(run_dir, RunLogError):
            run, test_ids = _import_run(run_dir, ids)
        if test_ref is None:
            test_ref = test_ids
        elif test_ids != test_ref:
            raise RunLogError(f"{run_dir / LOSS_FILE}: its test ids differ from the first run's")
        runs.append(run)
    if ids is not None:
        pool = list(ids["train_ids"])
        with refuse_malformed(ids_path, RunLogError):
            metadata = dict(ids.get("metadata") or {})
    else:
        pool = _sort_ids({i for run in runs for batch in run.curriculum for i in batch})
        metadata = {"imported_from": str(source)}
    with refuse_malformed(source, RunLogError):
        runset = RunSet(pool, test_ref or [], runs, metadata)
        return runset.validate(source=str(source))


def export_gptfluence(runset: RunSet, out: str | os.PathLike[str]) -> list[Path]:
    """Write every run as a GPTfluence run directory under `out`; returns the directories.

    Training ids become their position in ``runset.train_ids`` (``0..P-1``), test ids their
    position in ``runset.test_ids`` (``0..M-1``); ``out/simfluence_ids.json`` keeps the
    mapping (and seeds, learning rates, metadata) for `import_gptfluence`. Loss trajectories
    start at step 0, the loss before training; a sparse recording's trajectories hold only
    its scored points (GPTfluence itself pairs consecutive points, so it would read a gap as
    one step).
    """
    out = Path(out)
    train_index = runset.train_index
    written = []
    for run in runset.runs:
        run_dir = out / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        batch_lines = [
            json.dumps({"step": step, "samples_id": [train_index[i] for i in batch]})
            for step, batch in enumerate(run.curriculum, start=1)
        ]
        loss_lines = [
            json.dumps(
                {
                    "id": col,
                    "loss_trajectory": [
                        {"step": step, "loss": float(loss)}
                        for step, (loss, seen) in enumerate(
                            zip(run.losses[:, col], run.mask[:, col], strict=True)
                        )
                        if seen  # a sparse recording: only the scored points
                    ],
                }
            )
            for col in range(len(runset.test_ids))
        ]
        write_text_atomic(run_dir / TRAIN_FILE, "\n".join(batch_lines) + "\n")
        write_text_atomic(run_dir / LOSS_FILE, "\n".join(loss_lines) + "\n")
        written.append(run_dir)
    write_json_atomic(out / IDS_FILE, _ids_document(runset))
    return written


def _ids_document(runset: RunSet) -> dict[str, Any]:
    runs = {
        run.run_id: {
            "seed": run.seed,
            "lr": None if run.lr is None else [None if np.isnan(x) else x for x in run.lr.tolist()],
            "metadata": run.metadata,
        }
        for run in runset.runs
    }
    return {
        "format": IDS_FORMAT,
        "train_ids": runset.train_ids,
        "test_ids": runset.test_ids,
        "runs": runs,
        "metadata": runset.metadata,
    }
