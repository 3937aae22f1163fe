"""Generated hostile input (Hypothesis): every reader either loads a file or refuses it with a
`SimfluenceError` naming the file; never another exception, a hang, or memory beyond a bound for
a file that declares a huge size.

Readers: run files (Parquet) and the manifest (`load_runset`), GPTfluence folders
(`import_gptfluence`), features (`read_feature_table`, `load_features`), curricula, initial
losses and edit specs given to ``simulate``/``optimize`` (`load_curriculum`, `edit_spec`), and
saved simulators (`load_simulator`). Inputs are mutations of valid files (flipped or dropped
bytes, a field replaced by any JSON value, odd Parquet columns) and arbitrary values.

Profiles (tests/conftest.py): a few dozen examples per test in the normal suite;
``SIMFLUENCE_FUZZ=1`` (``make fuzz``) runs 10,000 per test.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simfluence.cli._curricula import edit_spec, edited, load_curriculum
from simfluence.errors import SimfluenceError
from simfluence.runlog import load_runset, read_manifest
from simfluence.runlog.features import (
    ExampleFeatures,
    load_features,
    read_feature_table,
)
from simfluence.runlog.gptfluence import IDS_FILE, LOSS_FILE, TRAIN_FILE, import_gptfluence
from simfluence.runlog.layout import FEATURES_FILE, MANIFEST
from simfluence.runlog.runs import Run, RunSet
from simfluence.runlog.store import list_run_files, save_runset
from simfluence.simulators.baselines import MeanTrajectorySimulator
from simfluence.simulators.registry import load_simulator

FUZZ = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    deadline=None,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def loads_or_refuses(read: Callable[[], object], *names: str) -> None:
    """`read()` succeeds, or raises `SimfluenceError` whose message names one of `names`."""
    try:
        read()
    except SimfluenceError as exc:
        message = " ".join(str(exc).split())
        assert any(name in message for name in names), (names, message)


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """Flip, drop, insert or truncate bytes of `data`."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "drop", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= draw(st.integers(1, 255))
        elif kind == "drop":
            del out[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[at:]
    return bytes(out)


def small_runset() -> RunSet:
    rng = np.random.default_rng(0)
    runs = [
        Run(f"run-{k}", [["a", "b"], ["c"], ["a"]], rng.uniform(0, 2, (4, 2)), seed=k, lr=[0.1] * 3)
        for k in range(2)
    ]
    return RunSet(["a", "b", "c"], ["t0", "t1"], runs, {"note": "fuzz"})


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("valid") / "runs"
    runset = small_runset()
    runset.features = ExampleFeatures(np.ones((3, 2)), np.zeros((2, 2)), {"kind": "x"})
    save_runset(runset, directory)
    return directory


def fresh_copy(valid: Path, tmp: Path) -> Path:
    target = tmp / "runs"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(valid, target)
    return target


# -- the manifest -----------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_manifest(valid_dir: Path, tmp_path_factory: pytest.TempPathFactory, data) -> None:
    directory = fresh_copy(valid_dir, tmp_path_factory.mktemp("m"))
    path = directory / MANIFEST
    how = data.draw(st.sampled_from(["field", "value", "bytes"]))
    if how == "field":
        manifest = json.loads(path.read_text())
        key = data.draw(st.sampled_from([*manifest, "extra"]))
        manifest[key] = data.draw(json_values)
        path.write_text(json.dumps(manifest))
    elif how == "value":
        path.write_text(json.dumps(data.draw(json_values)))
    else:
        path.write_bytes(mutate(path.read_bytes(), data.draw))
    loads_or_refuses(lambda: load_runset(directory), MANIFEST, str(directory))


def test_manifest_nested_too_deeply(valid_dir: Path, tmp_path: Path) -> None:
    directory = fresh_copy(valid_dir, tmp_path)
    (directory / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    loads_or_refuses(lambda: load_runset(directory), MANIFEST)


# -- run files --------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_run_file_bytes(valid_dir: Path, tmp_path_factory: pytest.TempPathFactory, data) -> None:
    directory = fresh_copy(valid_dir, tmp_path_factory.mktemp("r"))
    path = list_run_files(directory)[0]
    path.write_bytes(mutate(path.read_bytes(), data.draw))
    loads_or_refuses(lambda: load_runset(directory), path.name)


column_values = st.one_of(
    st.lists(st.integers(-3, 5), min_size=0, max_size=5),
    st.lists(st.floats(allow_nan=True), max_size=5),
    st.lists(st.none() | st.text(max_size=3), max_size=5),
    st.lists(st.lists(st.none() | st.text(max_size=2), max_size=3) | st.none(), max_size=5),
    st.lists(st.lists(st.floats(allow_nan=True) | st.none(), max_size=3) | st.none(), max_size=5),
)


@FUZZ
@given(data=st.data())
def test_run_file_columns(valid_dir: Path, tmp_path_factory: pytest.TempPathFactory, data) -> None:
    directory = fresh_copy(valid_dir, tmp_path_factory.mktemp("c"))
    path = list_run_files(directory)[0]
    table = pq.read_table(path)
    meta = dict(table.schema.metadata or {})
    columns = {name: table.column(name) for name in table.column_names}
    for _ in range(data.draw(st.integers(0, 2))):
        name = data.draw(st.sampled_from([*columns, "extra"]))
        n = data.draw(st.integers(0, 6))
        values = data.draw(column_values)
        values = (values * n)[:n] if values else [None] * n
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            continue
    if data.draw(st.booleans()):
        key = next(iter(k for k in meta if b"simfluence" in k), b"simfluence")
        choice = data.draw(st.sampled_from(["json", "bytes", "drop"]))
        if choice == "json":
            meta[key] = json.dumps(data.draw(json_values)).encode()
        elif choice == "bytes":
            meta[key] = data.draw(st.binary(max_size=20))
        else:
            meta.pop(key, None)
    lengths = {len(c) for c in columns.values()}
    if len(lengths) != 1:
        return  # a table needs columns of one length
    pq.write_table(pa.table(columns).replace_schema_metadata(meta), path)
    loads_or_refuses(lambda: load_runset(directory), path.name)


# -- GPTfluence folders -----------------------------------------------------------------------
def gpt_line(draw: st.DrawFn, kind: str) -> str:
    if draw(st.integers(0, 4)) == 0:
        return json.dumps(draw(json_values))
    if kind == "train":
        row = {
            "step": draw(st.integers(-2, 6) | json_values),
            "samples_id": draw(
                st.lists(st.integers(-1, 4) | json_values, max_size=3) | json_values
            ),
        }
    else:
        points = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"step": st.integers(0, 4) | json_values, "loss": st.floats() | json_values}
                ),
                max_size=4,
            )
            | json_values
        )
        row = {"id": draw(st.integers(-1, 3) | json_values), "loss_trajectory": points}
    return json.dumps(row)


@FUZZ
@given(data=st.data())
def test_gptfluence(tmp_path_factory: pytest.TempPathFactory, data) -> None:
    source = tmp_path_factory.mktemp("g")
    run = source / "run-seed-1"
    run.mkdir()
    train = "\n".join(gpt_line(data.draw, "train") for _ in range(data.draw(st.integers(0, 4))))
    loss = "\n".join(gpt_line(data.draw, "loss") for _ in range(data.draw(st.integers(0, 3))))
    (run / TRAIN_FILE).write_bytes(
        mutate(train.encode(), data.draw) if data.draw(st.booleans()) else train.encode()
    )
    (run / LOSS_FILE).write_text(loss)
    if data.draw(st.booleans()):
        ids = {
            "format": "simfluence.gptfluence-ids",
            "train_ids": ["a", "b", "c", "d", "e"],
            "test_ids": ["t0", "t1", "t2", "t3"],
            "runs": {"run-seed-1": {}},
        }
        key = data.draw(st.sampled_from([*ids, "metadata"]))
        ids[key] = data.draw(json_values)
        if key == "runs" and data.draw(st.booleans()):
            ids["runs"] = {"run-seed-1": data.draw(json_values)}
        (source / IDS_FILE).write_text(json.dumps(ids))
    loads_or_refuses(lambda: import_gptfluence(source), str(source))


def test_gptfluence_huge_numbers_and_bad_bytes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / TRAIN_FILE).write_text('{"step": 1, "samples_id": [0]}\n')
    (run / LOSS_FILE).write_text(
        '{"id": 0, "loss_trajectory": [{"step": 0, "loss": 1e999}, {"step": 1, "loss": '
        + "9" * 400
        + "}]}\n"
    )
    loads_or_refuses(lambda: import_gptfluence(tmp_path), str(tmp_path))
    (run / TRAIN_FILE).write_bytes(b"\xff\xfe{not utf-8}\n")
    loads_or_refuses(lambda: import_gptfluence(tmp_path), str(tmp_path))


# -- features ---------------------------------------------------------------------------------
arrays = st.one_of(
    st.lists(st.floats(allow_nan=True, width=32), max_size=6).map(np.array),
    st.lists(st.text(max_size=3), max_size=6).map(np.array),
    st.lists(st.lists(st.floats(width=32), min_size=2, max_size=2), max_size=4).map(np.array),
    st.integers(-5, 5).map(np.array),
    st.just(np.zeros((0, 3))),
    st.just(np.zeros(3, dtype=np.complex64)),
    st.just(np.zeros(2, dtype=[("a", "i4")])),
)


def npz_bytes(members: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


@FUZZ
@given(data=st.data())
def test_feature_table(tmp_path_factory: pytest.TempPathFactory, data) -> None:
    folder = tmp_path_factory.mktemp("f")
    if data.draw(st.booleans()):
        path = folder / "features.npz"
        names = data.draw(st.lists(st.sampled_from(["ids", "vectors", "other"]), max_size=3))
        content = npz_bytes({name: data.draw(arrays) for name in names})
        if data.draw(st.booleans()):
            content = mutate(content, data.draw)
        path.write_bytes(content)
    else:
        path = folder / "features.parquet"
        columns = {}
        for name in data.draw(st.lists(st.sampled_from(["id", "vector", "x1", "x2"]), max_size=3)):
            try:
                columns[name] = pa.array((data.draw(column_values) * 3)[:3] or [None] * 3)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                continue
        if columns:
            pq.write_table(pa.table(columns), path)
            if data.draw(st.booleans()):
                path.write_bytes(mutate(path.read_bytes(), data.draw))
        else:
            path.write_bytes(data.draw(st.binary(max_size=64)))
    loads_or_refuses(lambda: read_feature_table(path), path.name)


@FUZZ
@given(data=st.data())
def test_stored_features(valid_dir: Path, tmp_path_factory: pytest.TempPathFactory, data) -> None:
    directory = fresh_copy(valid_dir, tmp_path_factory.mktemp("s"))
    path = directory / FEATURES_FILE
    if data.draw(st.booleans()):
        path.write_bytes(mutate(path.read_bytes(), data.draw))
    else:
        with np.load(path) as stored:
            members = {k: stored[k] for k in stored.files}
        key = data.draw(st.sampled_from([*members, "extra"]))
        if key == "__meta__" and data.draw(st.booleans()):
            members[key] = np.array(json.dumps(data.draw(json_values)))
        else:
            members[key] = data.draw(arrays)
        path.write_bytes(npz_bytes(members))
    loads_or_refuses(lambda: load_features(directory, ["a", "b", "c"], ["t0", "t1"]), path.name)


def huge_npz(declared: tuple[int, ...]) -> bytes:
    """An .npz whose member ``vectors`` declares `declared` float64s but holds 16 bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": declared}
    )
    member = b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\x00" * 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ids.npy", npz_member(np.array(["a", "b"])))
        archive.writestr("vectors.npy", member)
    return buffer.getvalue()


def npz_member(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("declared", [(10**12,), (2, 10**11), (10**9, 10**9)])
def test_an_npz_declaring_a_huge_array_is_refused_before_allocating(
    tmp_path: Path, declared: tuple[int, ...]
) -> None:
    import tracemalloc

    path = tmp_path / "features.npz"
    path.write_bytes(huge_npz(declared))
    tracemalloc.start()
    try:
        with pytest.raises(SimfluenceError, match=r"features\.npz.*declares"):
            read_feature_table(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # bytes: nothing the size of the declared array


# -- curricula, initial losses, edit specs; saved simulators ----------------------------------
@pytest.fixture(scope="module")
def simulator_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "mean.npz"
    MeanTrajectorySimulator().fit(small_runset()).save(path)
    return path


@FUZZ
@given(data=st.data())
def test_curriculum_initial_loss_and_edit_files(
    simulator_file: Path, tmp_path_factory: pytest.TempPathFactory, data
) -> None:
    simulator = load_simulator(simulator_file)
    folder = tmp_path_factory.mktemp("cur")
    files = {}
    for name in ("curriculum", "initial", "edits"):
        path = folder / f"{name}.json"
        value = data.draw(
            json_values
            | st.lists(st.lists(st.sampled_from(["a", "b", "c", "zz"]), max_size=3), max_size=3)
            | st.fixed_dictionaries({"t0": json_values, "t1": st.floats()})
        )
        raw = json.dumps(value).encode()
        path.write_bytes(mutate(raw, data.draw) if data.draw(st.booleans()) else raw)
        files[name] = str(path)
    args = argparse.Namespace(
        curriculum=files["curriculum"],
        run=None,
        runs=None,
        initial_loss=files["initial"],
        features=None,
        edits=files["edits"],
        remove=None,
        add=None,
        repeat=None,
        reorder=None,
        truncate=None,
        sort=None,
    )
    names = (*files.values(), *(Path(f).name for f in files.values()))
    loads_or_refuses(lambda: load_curriculum(args, simulator), *names)
    spec = None

    def read() -> None:
        nonlocal spec
        spec = edit_spec(args, simulator)

    loads_or_refuses(read, *names)
    if spec is not None:  # applying it: refused by operation number (the file is read above)
        loads_or_refuses(lambda: edited([["a", "b"], ["c"]], spec, simulator), "operation #")


@FUZZ
@given(data=st.data())
def test_saved_simulator(
    simulator_file: Path, tmp_path_factory: pytest.TempPathFactory, data
) -> None:
    path = tmp_path_factory.mktemp("sim") / "model.npz"
    how = data.draw(st.sampled_from(["bytes", "meta", "arrays"]))
    with np.load(simulator_file) as stored:
        members = {k: stored[k] for k in stored.files}
    if how == "bytes":
        path.write_bytes(mutate(simulator_file.read_bytes(), data.draw))
    else:
        if how == "meta":
            meta = json.loads(str(members["__meta__"]))
            key = data.draw(st.sampled_from([*meta, "extra"]))
            meta[key] = data.draw(json_values)
            if key in ("params", "learned") and data.draw(st.booleans()):
                meta[key] = {data.draw(st.text(max_size=6)): data.draw(json_values)}
            members["__meta__"] = np.array(json.dumps(meta))
        else:
            members[data.draw(st.sampled_from([*members, "extra"]))] = data.draw(arrays)
        path.write_bytes(npz_bytes(members))
    loads_or_refuses(lambda: load_simulator(path), path.name)


def test_valid_files_load(valid_dir: Path, simulator_file: Path) -> None:
    """The mutations start from files that load."""
    assert len(load_runset(valid_dir).runs) == 2
    assert read_manifest(valid_dir)["test_ids"] == ["t0", "t1"]
    assert load_simulator(simulator_file).name == "mean"
