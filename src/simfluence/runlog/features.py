"""Example features: one float vector per training and test example, stored beside a run set.

Featurized simulators (`simfluence.simulators.featurized`) compute every training example's effect
on every test example from these vectors, so they can speak about examples that few, or no,
recorded runs consumed. Features are data, like the losses: a `RunSet` carries them
(``runs.features``), and they live in the run-set directory as

    DIR/features.npz   train (P, d) float64, rows in the manifest's train_ids order;
                       test (M, d') float64, rows in its test_ids order;
                       train_ids, test_ids (the ids, for checking);
                       __meta__: JSON {"format": "simfluence.features", "schema_version": 1,
                                       "source": "...", ...}

written atomically. They come from a workload (`simfluence features DIR`, which asks the task's
`example_features` hook, or takes per-example gradients at the initial model) or from a user
file mapping ids to vectors (`simfluence features DIR --from FILE`): an ``.npz`` with arrays
``ids`` (n,) and ``vectors`` (n, d), or a Parquet table with a string column ``id`` and either a
list column ``vector`` or numeric columns (one per dimension).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simfluence._atomic import save_npz_atomic
from simfluence._safe_io import loads_json, read_npz, refuse_malformed
from simfluence.errors import RunLogError
from simfluence.runlog.layout import FEATURES_FILE, features_path

FORMAT = "simfluence.features"
SCHEMA_VERSION = 1


class FeatureError(RunLogError):
    """Features that do not match their run set (missing id, NaN, wrong shape, bad file)."""


@dataclass
class ExampleFeatures:
    """Feature vectors aligned with a run set's ids.

    Attributes:
        train: shape ``(P, d)``, row ``i`` belongs to ``train_ids[i]``.
        test: shape ``(M, d')``, row ``j`` belongs to ``test_ids[j]``.
        metadata: JSON-able provenance (``source``: what made them; ``seconds``: how long).
    """

    train: np.ndarray
    test: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train = np.asarray(self.train, dtype=np.float64)
        self.test = np.asarray(self.test, dtype=np.float64)

    def check(self, n_train: int, n_test: int, where: str = "features") -> ExampleFeatures:
        """`FeatureError` naming the side and row unless both arrays are finite 2-d arrays with
        one row per id. Returns self."""
        for side, array, rows in (("train", self.train, n_train), ("test", self.test, n_test)):
            if array.ndim != 2 or array.shape[0] != rows or array.shape[1] < 1:
                raise FeatureError(
                    f"{where}: {side} features have shape {array.shape}, expected ({rows}, d) "
                    f"(one row per {side} id, d >= 1)"
                )
            bad = ~np.isfinite(array)
            if bad.any():
                row, col = (int(v) for v in np.argwhere(bad)[0])
                raise FeatureError(
                    f"{where}: {side} features of row {row}, dimension {col}: {array[row, col]}"
                )
        return self


def align(
    ids: Sequence[str],
    vectors: np.ndarray,
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    where: str,
    metadata: dict[str, Any] | None = None,
) -> ExampleFeatures:
    """`ExampleFeatures` for a run set's ids from an ``id -> vector`` table (extra ids ignored).

    Raises `FeatureError` naming the first run-set id without a vector, a duplicate id, a
    non-finite value (with its id), or a table that is not ``(n, d)``.
    """
    vectors = np.asarray(vectors)
    ids = [str(i) for i in ids]
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise FeatureError(
            f"{where}: {len(ids)} ids but vectors of shape {vectors.shape} (expected "
            f"({len(ids)}, d))"
        )
    if not np.issubdtype(vectors.dtype, np.number):
        raise FeatureError(f"{where}: vectors must be numbers, found dtype {vectors.dtype}")
    row_of: dict[str, int] = {}
    for row, example_id in enumerate(ids):
        if example_id in row_of:
            raise FeatureError(f"{where}: id {example_id!r} appears twice")
        row_of[example_id] = row
    wanted = [*train_ids, *test_ids]
    missing = [i for i in wanted if i not in row_of]
    if missing:
        raise FeatureError(
            f"{where}: no vector for id {missing[0]!r}"
            + (f" ({len(missing)} ids missing)" if len(missing) > 1 else "")
        )
    table = np.asarray(vectors, dtype=np.float64)
    rows = np.array([row_of[i] for i in wanted], dtype=np.int64)
    bad = ~np.isfinite(table[rows])
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise FeatureError(f"{where}: the vector of id {wanted[row]!r} has {table[rows][row, col]}")
    n_train = len(train_ids)
    return ExampleFeatures(table[rows[:n_train]], table[rows[n_train:]], dict(metadata or {}))


def read_feature_table(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """``(ids, vectors (n, d))`` from a user's ``.npz`` or ``.parquet`` file (see the module
    docstring); `FeatureError` naming the file and what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"{path}: no such feature file")
    if path.suffix == ".npz":
        return _read_npz_table(path)
    if path.suffix in (".parquet", ".pq"):
        return _read_parquet_table(path)
    raise FeatureError(f"{path}: feature files must be .npz or .parquet")


def _read_npz_table(path: Path) -> tuple[list[str], np.ndarray]:
    data = read_npz(path, FeatureError)
    if "ids" not in data or "vectors" not in data:
        raise FeatureError(
            f"{path}: an .npz feature file needs arrays 'ids' and 'vectors' (found "
            f"{', '.join(data) or 'none'})"
        )
    with refuse_malformed(path, FeatureError):
        return [str(i) for i in data["ids"]], np.asarray(data["vectors"], dtype=np.float64)


def _read_parquet_table(path: Path) -> tuple[list[str], np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise FeatureError(f"{path}: not a readable Parquet file ({exc})") from None
    with refuse_malformed(path, FeatureError):
        return _parquet_vectors(path, table)


def _parquet_vectors(path: Path, table: Any) -> tuple[list[str], np.ndarray]:
    import pyarrow as pa

    if "id" not in table.column_names:
        raise FeatureError(f"{path}: needs a column 'id' (found {', '.join(table.column_names)})")
    ids = [str(i) for i in table.column("id").to_pylist()]
    if "vector" in table.column_names:
        column = table.column("vector").combine_chunks()
        if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)):
            raise FeatureError(f"{path}: column 'vector' must hold lists of numbers")
        rows = column.to_pylist()
        lengths = {len(r) if r is not None else -1 for r in rows}
        if len(lengths) != 1 or -1 in lengths:
            raise FeatureError(f"{path}: column 'vector' holds missing or unequal-length vectors")
        return ids, np.asarray(rows, dtype=np.float64)
    others = [c for c in table.column_names if c != "id"]
    if not others:
        raise FeatureError(f"{path}: needs a list column 'vector' or numeric feature columns")
    for name in others:
        if not pa.types.is_integer(table.schema.field(name).type) and not pa.types.is_floating(
            table.schema.field(name).type
        ):
            raise FeatureError(f"{path}: column {name!r} is not numeric")
    return ids, np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in others])


def save_features(
    directory: str | os.PathLike[str],
    features: ExampleFeatures,
    train_ids: Sequence[str],
    test_ids: Sequence[str],
) -> Path:
    """Check and write ``DIR/features.npz`` atomically; returns its path."""
    features.check(len(train_ids), len(test_ids))
    meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **features.metadata}
    path = features_path(directory)
    save_npz_atomic(
        path,
        train=features.train,
        test=features.test,
        train_ids=np.array([str(i) for i in train_ids]),
        test_ids=np.array([str(i) for i in test_ids]),
        __meta__=np.array(json.dumps(meta)),
    )
    return path


def load_features(
    directory: str | os.PathLike[str], train_ids: Sequence[str], test_ids: Sequence[str]
) -> ExampleFeatures | None:
    """The features stored in a run-set directory, or None when it has none.

    Raises `FeatureError` naming the file when it is unreadable or does not match the ids.
    """
    path = features_path(directory)
    if not path.is_file():
        return None
    data = read_npz(path, FeatureError)
    try:
        meta = loads_json(str(data["__meta__"]), str(path), FeatureError)
        arrays = {k: data[k] for k in ("train", "test", "train_ids", "test_ids")}
    except KeyError as exc:
        raise FeatureError(f"{path}: not a simfluence feature file (no {exc})") from None
    if not isinstance(meta, dict):
        raise FeatureError(f"{path}: not a simfluence feature file (its header is no object)")
    if meta.get("format") != FORMAT or meta.get("schema_version") != SCHEMA_VERSION:
        raise FeatureError(f"{path}: unsupported feature file (format {meta.get('format')!r})")
    for side, ids in (("train", train_ids), ("test", test_ids)):
        with refuse_malformed(path, FeatureError):
            stored = [str(i) for i in arrays[f"{side}_ids"]]
        if stored != [str(i) for i in ids]:
            raise FeatureError(
                f"{path}: its {side} ids differ from the run set's (recompute them with "
                "`simfluence features`)"
            )
    metadata = {k: v for k, v in meta.items() if k not in ("format", "schema_version")}
    with refuse_malformed(path, FeatureError):
        return ExampleFeatures(arrays["train"], arrays["test"], metadata).check(
            len(train_ids), len(test_ids), str(path)
        )


__all__ = [
    "FEATURES_FILE",
    "ExampleFeatures",
    "FeatureError",
    "align",
    "load_features",
    "read_feature_table",
    "save_features",
]
