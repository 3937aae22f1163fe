"""Run sets on disk: a JSON manifest plus one Parquet file per run (format in docs/runlog.md).

    DIR/manifest.json         {"format": "simfluence.runset", "schema_version": 1,
                               "train_ids": [...], "test_ids": [...], "metadata": {...}}
    DIR/features.npz          optional: one vector per example (`simfluence.runlog.features`)
    DIR/runs/<run_id>.parquet one row per step 0..T: step (int32), batch (list<string>),
                              lr (float64, null when unknown), loss (fixed_size_list<float64>[M]);
                              key b"simfluence" of the schema metadata holds JSON
                              {"run_id", "seed", "test_ids", "metadata"}.

Every file is written atomically (temporary file, then rename), so a crash leaves either the
whole run or none of it: the recorder resumes by skipping the runs already on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simfluence._atomic import write_json_atomic, write_with
from simfluence._safe_io import loads_json, refuse_malformed
from simfluence.errors import RunLogError
from simfluence.runlog.features import load_features, save_features
from simfluence.runlog.layout import RUNS_DIR, manifest_path, run_files, run_path
from simfluence.runlog.runs import Run, RunSet, validate_run

FORMAT = "simfluence.runset"
SCHEMA_VERSION = 1
_META_KEY = b"simfluence"


def write_manifest(
    directory: str | os.PathLike[str],
    train_ids: list[str],
    test_ids: list[str],
    metadata: dict[str, Any] | None = None,
) -> None:
    """Create (or overwrite) the manifest of a run set, atomically."""
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "train_ids": [str(i) for i in train_ids],
        "test_ids": [str(i) for i in test_ids],
        "metadata": metadata or {},
    }
    write_json_atomic(manifest_path(directory), manifest)


def write_run(directory: str | os.PathLike[str], run: Run, test_ids: list[str]) -> Path:
    """Write one run atomically into the run set at `directory`; returns its path."""
    n_tests = len(test_ids)
    losses = np.ascontiguousarray(run.losses, dtype=np.float64)
    # unobserved losses (sparse scoring) are nulls in the file, never NaN or 0
    mask = None if run.observed is None else ~np.asarray(run.observed, dtype=bool).ravel()
    values = pa.array(losses.ravel(), mask=mask)
    lr = [None] + ([None] * run.n_steps if run.lr is None else [float(x) for x in run.lr])
    table = pa.table(
        {
            "step": pa.array(np.arange(run.n_steps + 1, dtype=np.int32)),
            "batch": pa.array([[]] + [list(b) for b in run.curriculum], type=pa.list_(pa.string())),
            "lr": pa.array(lr, type=pa.float64()),
            "loss": pa.FixedSizeListArray.from_arrays(values, n_tests),
        }
    )
    meta = {"run_id": run.run_id, "seed": run.seed, "test_ids": test_ids, "metadata": run.metadata}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path = run_path(directory, run.run_id)
    write_with(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def save_runset(runset: RunSet, directory: str | os.PathLike[str]) -> None:
    """Validate and write a whole run set (manifest + one file per run, and its features)."""
    runset.validate()
    write_manifest(directory, runset.train_ids, runset.test_ids, runset.metadata)
    for run in runset.runs:
        write_run(directory, run, runset.test_ids)
    if runset.features is not None:
        save_features(directory, runset.features, runset.train_ids, runset.test_ids)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the manifest; `RunLogError` naming the file and field on any fault."""
    path = manifest_path(directory)
    if not Path(directory).is_dir():
        raise RunLogError(f"{directory}: no such run-set directory")
    if not path.is_file():
        raise RunLogError(f"{path}: missing (not a simfluence run set?)")
    manifest = loads_json(path.read_bytes(), str(path), RunLogError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RunLogError(f"{path}: field 'format' must be {FORMAT!r}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunLogError(
            f"{path}: schema_version {version!r} is not supported (this version reads "
            f"{SCHEMA_VERSION})"
        )
    for key in ("train_ids", "test_ids"):
        if not isinstance(manifest.get(key), list):
            raise RunLogError(f"{path}: field {key!r} must be a list of ids")
    if not isinstance(manifest.get("metadata", {}), dict):
        raise RunLogError(f"{path}: field 'metadata' must be an object")
    return manifest


def list_run_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The finished run files of a run set (temporary files of interrupted writes excluded)."""
    return run_files(directory)


def read_run(path: str | os.PathLike[str], test_ids: list[str]) -> Run:
    """Read one run file and check its structure against the set's test ids."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunLogError(f"{path}: not a readable Parquet file ({exc})") from None
    raw_meta = (table.schema.metadata or {}).get(_META_KEY)
    if raw_meta is None:
        raise RunLogError(f"{path}: missing the simfluence schema metadata")
    meta = loads_json(raw_meta, f"{path}: the simfluence schema metadata", RunLogError)
    if not isinstance(meta, dict):
        raise RunLogError(f"{path}: the simfluence schema metadata must be a JSON object")
    run_id = str(meta.get("run_id", path.stem))
    where = f"{path}: run {run_id!r}"
    for column in ("step", "batch", "lr", "loss"):
        if column not in table.column_names:
            raise RunLogError(f"{where}: missing column {column!r}")
    if meta.get("test_ids") != test_ids:
        raise RunLogError(f"{where}: its test_ids differ from the manifest's test list")
    steps = table.column("step").to_numpy()
    expected = np.arange(len(steps))
    if len(steps) == 0 or not np.array_equal(steps, expected):
        first_bad = int(np.argmax(steps != expected)) if len(steps) == len(expected) else 0
        raise RunLogError(
            f"{where}: steps must be 0, 1, ..., T with none missing; found {steps[first_bad]} "
            f"at row {first_bad}"
        )
    loss_col = table.column("loss").combine_chunks()
    if not pa.types.is_fixed_size_list(loss_col.type) or loss_col.type.list_size != len(test_ids):
        raise RunLogError(
            f"{where}: column 'loss' must hold {len(test_ids)} losses per step (one per test "
            f"example), found type {loss_col.type}"
        )
    shape = (len(steps), len(test_ids))
    # nulls are losses that were not scored (sparse scoring): a whole step (a null list) or
    # single test examples (null values)
    observed = None
    if loss_col.null_count or loss_col.values.null_count:
        observed = ~np.asarray(loss_col.values.is_null().to_numpy(zero_copy_only=False))
        observed = observed.reshape(shape)
        if loss_col.null_count:
            observed &= np.asarray(loss_col.is_valid().to_numpy(zero_copy_only=False))[:, None]
    losses = loss_col.values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(shape)
    batches = table.column("batch").to_pylist()
    lr_values = table.column("lr").to_pylist()[1:]
    lr = (
        None
        if all(v is None for v in lr_values)
        else np.array([np.nan if v is None else v for v in lr_values], dtype=np.float64)
    )
    return Run(
        run_id=run_id,
        curriculum=[list(b or []) for b in batches[1:]],
        losses=losses,
        seed=meta.get("seed"),
        lr=lr,
        metadata=meta.get("metadata") or {},
        observed=observed,
    )


def load_runset(directory: str | os.PathLike[str]) -> RunSet:
    """Load and fully validate a run set written by `save_runset` or the recorder."""
    manifest = read_manifest(directory)
    test_ids = [str(i) for i in manifest["test_ids"]]
    metadata = manifest.get("metadata", {})
    with refuse_malformed(manifest_path(directory), RunLogError):
        runset = RunSet(manifest["train_ids"], test_ids, [], metadata, Path(directory))
        runset.validate(source=str(manifest_path(directory)))  # ids unique, tests non-empty
    index = runset.train_index
    seen: dict[str, Path] = {}
    for path in list_run_files(directory):
        with refuse_malformed(path, RunLogError):
            run = read_run(path, runset.test_ids)
        if run.run_id in seen:
            raise RunLogError(f"duplicate run id {run.run_id!r} in {seen[run.run_id]} and {path}")
        seen[run.run_id] = path
        with refuse_malformed(path, RunLogError):
            validate_run(run, index, len(test_ids), test_ids, str(path))
        runset.runs.append(run)
    if not runset.runs:
        raise RunLogError(f"{directory}: the run set holds no runs (nothing in {RUNS_DIR}/)")
    runset.features = load_features(directory, runset.train_ids, runset.test_ids)
    return runset
