"""Execution backends: serial, a local process pool and Ray give the same recordings,
validations and sharded fits, bit for bit; a parallel recording killed with -9 resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_module

from simfluence.backends import (
    BackendError,
    ProcessBackend,
    RayBackend,
    SerialBackend,
    close_backend,
    make_backend,
)
from simfluence.cli.main import main
from simfluence.errors import SimfluenceError
from simfluence.recording import RecordingProtocol, record_runs
from simfluence.recording.workloads import get_workload
from simfluence.runlog import Run, RunSet, load_runset
from simfluence.runlog.layout import checkpoint_path
from simfluence.runlog.store import list_run_files
from simfluence.simulators import AdditiveSimulator, LinearSimulator
from simfluence.simulators.sharded import combine_curves, shard_columns
from simfluence.synth import SynthConfig, generate

DIGITS = {"runs": 6, "pool": 40, "per_run": 16, "tests": 6, "batch": 4, "epochs": 2, "lr": 0.1}


def _digits(directory: Path, backend: object = None, **overrides: object):
    protocol = RecordingProtocol(**{**DIGITS, "seed": 0, "checkpoints": [0, 4], **overrides})
    return record_runs(
        get_workload("digits-mlp"), directory, protocol, backend=backend, progress=False
    )


def _assert_same_recordings(a: Path, b: Path) -> None:
    """Run files and checkpoints of two run-set directories hold identical values (the
    manifests may name the task differently: a subclass that only sleeps)."""
    x, y = load_runset(a), load_runset(b)
    assert x.run_ids == y.run_ids
    assert {**x.metadata, "task_spec": None} == {**y.metadata, "task_spec": None}
    for run_x, run_y in zip(x.runs, y.runs, strict=True):
        assert run_x.curriculum == run_y.curriculum
        assert np.array_equal(run_x.losses, run_y.losses)  # bit-identical
        assert np.array_equal(run_x.lr, run_y.lr) and run_x.metadata == run_y.metadata
        for step in run_x.metadata["checkpoint_steps"]:
            sx = torch.load(checkpoint_path(a, run_x.run_id, step), weights_only=True)
            sy = torch.load(checkpoint_path(b, run_y.run_id, step), weights_only=True)
            assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


# -- the backends themselves ------------------------------------------------------------------
def _describe_worker(value: int) -> tuple[int, str | None, str | None]:
    """Work unit of the pool tests (module level: workers import it by name)."""
    return (
        value * value,
        os.environ.get("OMP_NUM_THREADS"),
        os.environ.get("SIMFLUENCE_WORKER_SLOT"),
    )


def _die(value: int) -> int:
    if value == 2:
        os._exit(3)  # a worker killed mid-unit (out of memory, kill -9)
    return value


def _refuse(value: int) -> int:
    raise SimfluenceError(f"unit {value}: refused")


def test_make_backend_parses_specs() -> None:
    assert isinstance(make_backend(None), SerialBackend)
    assert isinstance(make_backend("serial"), SerialBackend)
    assert make_backend("process:1", threads=2) == SerialBackend(2)
    pool = make_backend("process:3", threads=2)
    assert isinstance(pool, ProcessBackend) and (pool.workers, pool.threads) == (3, 2)
    assert pool.name == "process:3" and pool.parallelism == 3
    ray = make_backend("ray:auto", gpus=1)
    assert isinstance(ray, RayBackend) and ray.address == "auto" and ray.gpus == 1
    assert make_backend("ray").address is None
    for bad in ("process", "process:0", "process:x", "threads:2", "serial:2"):
        with pytest.raises(BackendError, match=r"backend|unknown"):
            make_backend(bad)


def test_ray_backend_without_ray_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(BackendError, match=r"pip install 'simfluence\[ray\]'"):
        make_backend("ray")
    options = "--runs 1 --pool 20 --per-run 8 --tests 5 --batch 4 --epochs 1 --no-progress"
    assert main(["record", str(tmp_path / "d"), *options.split(), "--ray"]) == 2
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_serial_backend_keeps_order() -> None:
    out = list(SerialBackend().map_unordered(lambda v: v + 1, [3, 1, 2]))
    assert out == [(0, 4), (1, 2), (2, 3)]


@pytest.fixture(scope="module")
def pool():  # type: ignore[no-untyped-def]
    """Two warm worker processes shared by the tests of this module (starting one costs
    seconds: a fresh interpreter imports torch)."""
    with ProcessBackend(2, threads=1) as backend:
        yield backend


@pytest.mark.workers
def test_process_backend_runs_units_in_other_processes(pool: ProcessBackend) -> None:
    results = dict(pool.map_unordered(_describe_worker, list(range(6))))
    assert sorted(results) == list(range(6))
    assert [results[k][0] for k in range(6)] == [k * k for k in range(6)]
    assert {r[1] for r in results.values()} == {"1"}  # one thread per worker
    assert {r[2] for r in results.values()} <= {"0", "1"}  # slots 0..N-1
    # errors of the user's input come back as they are
    with pytest.raises(SimfluenceError, match="unit 0: refused"):
        list(pool.map_unordered(_refuse, [0]))
    with ProcessBackend(2) as backend, pytest.raises(BackendError, match="worker process died"):
        list(backend.map_unordered(_die, [0, 1, 2, 3]))


def _in_a_fresh_process(code: str) -> str:
    """The standard output of `code` run by a new interpreter (its own cold fork server), with
    the tests folder on its path (`backend_tasks`); the test fails on a non-zero exit."""
    tests = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.workers
def test_process_backend_runs_units_here_while_its_workers_start() -> None:
    """In a fresh process (a cold fork server: seconds to import torch) the units the workers
    cannot take yet run here, from the back of the queue. In a process whose fork server is
    already up, workers start in milliseconds and whether any unit runs here is a race."""
    code = textwrap.dedent(
        """
        import json
        from simfluence.backends import PRELOAD, ProcessBackend
        import backend_tasks
        with ProcessBackend(2, threads=1) as backend:
            backend.start(preload=PRELOAD)
            units = backend.map_unordered(
                backend_tasks.square_where, list(range(40)), backend_tasks.square_here
            )
            print(json.dumps(list(units)))
        """
    )
    results = [(k, tuple(r)) for k, r in json.loads(_in_a_fresh_process(code))]
    assert sorted(k for k, _ in results) == list(range(40))  # each unit once
    assert all(value == k * k for k, (value, _) in results)
    where = [r[1] for _, r in results]
    assert where.count("here") >= 1 and where.count("worker") >= 1  # both ran units
    # units run here are taken from the back: the workers' share is a prefix
    assert min(k for k, r in results if r[1] == "here") > max(
        k for k, r in results if r[1] != "here"
    )


# -- recording ---------------------------------------------------------------------------------
@pytest.mark.workers
def test_parallel_recording_equals_serial(tmp_path: Path, pool: ProcessBackend) -> None:
    serial = _digits(tmp_path / "serial")
    parallel = _digits(tmp_path / "parallel", pool)
    assert parallel.run_ids == serial.run_ids
    _assert_same_recordings(tmp_path / "serial", tmp_path / "parallel")
    # resuming with more runs on the same (warm) pool extends the recording identically
    _digits(tmp_path / "parallel", pool, runs=8)
    _digits(tmp_path / "serial", runs=8)
    _assert_same_recordings(tmp_path / "serial", tmp_path / "parallel")
    assert serial.runs[0].metadata["device"] == "cpu"


@pytest.mark.workers
def test_parallel_recording_needs_a_rebuildable_task(tmp_path: Path) -> None:
    from tiny_task import SMALL, TinyTask

    class Local(TinyTask):  # defined in a function: no worker can import it
        pass

    with (
        pytest.warns(UserWarning, match="defined inside a function"),
        pytest.raises(SimfluenceError, match="cannot be rebuilt in a worker"),
    ):
        protocol = RecordingProtocol(**SMALL)
        record_runs(Local(), tmp_path / "d", protocol, progress=False, backend="process:2")
    assert not (tmp_path / "d").exists()  # refused before anything was written


@pytest.mark.workers
def test_parallel_recording_resumes_after_kill_9(tmp_path: Path) -> None:
    """kill -9 of the whole process group (parent and workers) during a recording on 2
    workers, then `record --workers 2` again: the same run set as a serial recording."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from test_backends import DIGITS, SlowDigits
        from simfluence.recording import RecordingProtocol, record_runs

        protocol = RecordingProtocol(**{{**DIGITS, "runs": 8}}, seed=0, checkpoints=[0, 4])
        record_runs(SlowDigits(), sys.argv[1], protocol, progress=False, backend="process:2")
        """
    )
    target = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list_run_files(target)) < 2:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list_run_files(target))
    assert 2 <= done < 8, "the recording should have been killed mid-way"
    options = "--runs 8 --pool 40 --per-run 16 --tests 6 --batch 4 --epochs 2 --checkpoints 0,4"
    argv = [*options.split(), "--no-progress"]
    assert main(["record", str(target), *argv, "--workers", "2"]) == 0
    assert main(["record", str(tmp_path / "serial"), *argv]) == 0
    _assert_same_recordings(tmp_path / "serial", target)
    assert not list((target / "runs").glob(".*"))
    assert len(list_run_files(target)) == 8


def _kill_a_worker_when(target: Path, pid_dir: Path, killed: list[int]) -> None:
    """SIGKILL one worker process (not this one) once 2 runs of `target` are written."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = [int(p.name) for p in pid_dir.iterdir() if int(p.name) != os.getpid()]
        if workers and len(list_run_files(target)) >= 2:
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])
            return
        time.sleep(0.01)


@pytest.mark.workers
@pytest.mark.parametrize("where", ["process", "ray"])
def test_a_worker_killed_mid_recording_is_replaced(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    """SIGKILL of one worker process while a recording runs on 2 workers (a pool, or Ray):
    the backend reruns the lost run on a new worker and the recording finishes, identical to
    a serial one, each run once, no temporary file left."""
    import threading

    from backend_tasks import PidDigits

    from simfluence.recording.workloads.digits_mlp import HIDDEN

    if where == "ray":
        request.getfixturevalue("local_ray")
    backend = ProcessBackend(2) if where == "process" else make_backend("ray")
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    target, killed = tmp_path / "killed", []
    killer = threading.Thread(target=_kill_a_worker_when, args=(target, pid_dir, killed))
    killer.start()
    protocol = RecordingProtocol(**{**DIGITS, "runs": 8}, seed=0, checkpoints=[0, 4])
    try:
        task = PidDigits(str(pid_dir), HIDDEN)  # Ray's workers import it from its file
        ref = f"{Path(__file__).parents[1] / 'backend_tasks.py'}:PidDigits"
        record_runs(task, target, protocol, task_ref=ref, backend=backend, progress=False)
    finally:
        killer.join()
        close_backend(backend)
    assert killed, "no worker was killed"
    if where == "process":
        assert backend.restarts == 1
    _digits(tmp_path / "serial", runs=8)
    _assert_same_recordings(tmp_path / "serial", target)
    assert len(list_run_files(target)) == 8
    assert not list((target / "runs").glob(".*")) and not list(target.glob("**/.*.tmp"))


class SlowDigits(type(get_workload("digits-mlp"))):  # type: ignore[misc]
    """digits-mlp, 20 ms slower per loss call (so a recording can be killed mid-way)."""

    def example_losses(self, model, inputs):  # type: ignore[no-untyped-def]
        time.sleep(0.02)
        return super().example_losses(model, inputs)


# -- validation --------------------------------------------------------------------------------
@pytest.mark.workers
def test_validate_with_workers_equals_serial(tmp_path: Path, pool: ProcessBackend) -> None:
    _digits(tmp_path / "runs", checkpoints=[])
    from simfluence.recording.validation import validate

    runs = load_runset(tmp_path / "runs")
    task = get_workload("digits-mlp")
    kinds = ["random", "reorder"]

    def sims():  # type: ignore[no-untyped-def]
        return {"linear": LinearSimulator(l2=1.0, unseen="prior")}

    serial = validate(task, runs, sims(), kinds, count=3)
    parallel = validate(task, runs, sims(), kinds, count=3, backend=pool)
    assert serial.pop("timing") and parallel.pop("timing")  # wall-clock: apart, as documented
    assert json.dumps(serial, sort_keys=True) == json.dumps(parallel, sort_keys=True)
    assert serial["kinds"]["random"]["curricula"] == 3
    # leave-one-out: the removals of both kinds and both held-out runs spread over the pool
    # (and the smoothness retrains with them)
    loo = {"count": 2, "max_examples": 3, "groups": 3, "smoothness_directions": 2}
    serial = validate(task, runs, sims(), ["loo", "loo-weight0"], **loo)
    parallel = validate(task, runs, sims(), ["loo", "loo-weight0"], **loo, backend=pool)
    assert serial.pop("timing").keys() == parallel.pop("timing").keys() == {"loo", "loo-weight0"}
    assert json.dumps(serial, sort_keys=True) == json.dumps(parallel, sort_keys=True)
    assert serial["kinds"]["loo"]["retrains"] == 2 * (3 + 3 + 1)
    smooth = serial["kinds"]["loo"]["smoothness"]
    assert len(smooth) == 2 and all(len(s["nonlinearity"]) == 2 for s in smooth.values())


# -- sharded fits ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():  # type: ignore[no-untyped-def]
    runs, _ = generate(SynthConfig(pool=80, tests=30, runs=10, per_run=40, batch=4, epochs=2))
    return runs


def test_sharded_fit_matches_the_whole_fit(synthetic) -> None:  # type: ignore[no-untyped-def]
    whole = LinearSimulator().fit(synthetic)
    shards = LinearSimulator(test_shards=4).fit(synthetic)
    assert shards.l2_ == whole.l2_
    # a shard stops walking the l2 grid by itself: the curves agree where both went
    common = min(len(shards.cv_mse_), len(whole.cv_mse_))
    assert common >= 3
    np.testing.assert_allclose(
        np.array(shards.cv_mse_[:common]), np.array(whole.cv_mse_[:common]), rtol=1e-4
    )
    np.testing.assert_allclose(shards.A_, whole.A_, rtol=0, atol=1e-7)
    np.testing.assert_allclose(shards.B_, whole.B_, rtol=0, atol=1e-7)
    assert np.array_equal(shards.seen_, whole.seen_)
    with pytest.raises(SimfluenceError, match="test_shards"):
        LinearSimulator(test_shards=0).fit(synthetic)


def test_shard_columns_are_contiguous_nearly_equal_blocks() -> None:
    assert [b.tolist() for b in shard_columns(10, 3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [b.tolist() for b in shard_columns(4, 1)] == [[0, 1, 2, 3]]
    assert [b.tolist() for b in shard_columns(2, 5)] == [[0], [1]]  # never an empty shard
    assert len(shard_columns(10, np.int64(2))) == 2  # what the simulator's check accepts
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(SimfluenceError, match="test_shards"):
            shard_columns(10, bad)


def test_combine_curves_weights_shards_by_their_test_examples() -> None:
    """The full data's CV error is a mean over test examples: a shard of 3 counts 3 times
    one of 1; only the l2 values every shard reached are compared."""
    curves = [[[3.0, 1.0], [0.3, 0.5], [0.03, 0.7]], [[3.0, 2.0], [0.3, 4.5]]]
    assert combine_curves(curves, [3, 1]) == [[3.0, 1.25], [0.3, 1.5]]
    np.testing.assert_allclose(combine_curves(curves[:1], [3]), curves[0], rtol=1e-15)
    with pytest.raises(ValueError):  # a weight per curve, or it is not the data's mean
        combine_curves(curves, [3])


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # the losses are made to overflow
def test_fit_takes_the_smoothest_l2_when_every_cv_error_is_infinite() -> None:
    """Losses near 1e160: every held-out squared error overflows, so no l2 is better than
    another and the fit falls back on the first (strongest) l2 of the grid."""
    runs, _ = generate(SynthConfig(pool=20, tests=6, runs=6, per_run=12, batch=4, epochs=1))
    for run in runs.runs:
        run.losses = run.losses * 1e160
    for shards in (None, 2):
        sim = LinearSimulator(l2_grid=[3.0, 0.3, 0.03], test_shards=shards).fit(runs)
        assert sim.l2_ == 3.0 and sim.cv_mse_ and all(np.isinf(m) for _, m in sim.cv_mse_)


def test_sharded_fit_reports_its_worst_shard(synthetic) -> None:  # type: ignore[no-untyped-def]
    """With ``l2`` given there is no cross-validation; each shard is solved like an unsharded
    fit of its test examples, and the fit reports the most iterations and the largest
    residual of any shard."""
    sharded = LinearSimulator(l2=0.5, test_shards=np.int64(3)).fit(synthetic)
    assert sharded.cv_mse_ is None and sharded.l2_ == 0.5
    blocks = np.arange(30).reshape(3, 10)  # 30 test examples in 3 contiguous shards
    alone = [LinearSimulator(l2=0.5).fit(synthetic.select_tests(c)) for c in blocks]
    assert sharded.cg_iterations_ == max(s.cg_iterations_ for s in alone)
    assert sharded.cg_residual_ == max(s.cg_residual_ for s in alone)
    np.testing.assert_array_equal(sharded.A_, np.vstack([s.A_ for s in alone]))
    np.testing.assert_array_equal(sharded.B_, np.vstack([s.B_ for s in alone]))


def test_one_shard_and_a_two_value_grid_match_the_whole_fit() -> None:
    runs, _ = generate(SynthConfig(pool=20, tests=6, runs=6, per_run=12, batch=4, epochs=1))
    grid = [3.0, 0.3]
    whole = LinearSimulator(l2_grid=grid).fit(runs)
    assert len(whole.cv_mse_) == 2
    for shards in (1, 2):
        sharded = LinearSimulator(l2_grid=grid, test_shards=shards).fit(runs)
        assert sharded.l2_ == whole.l2_
        np.testing.assert_allclose(sharded.cv_mse_, whole.cv_mse_, rtol=1e-4)  # CV's own tol
        np.testing.assert_allclose(sharded.A_, whole.A_, rtol=0, atol=1e-7)


def test_sharded_additive_fit_matches_the_whole_fit() -> None:
    """The additive model has no multiplicative part and no conjugate-gradient statistics."""
    runs, _ = generate(SynthConfig(pool=20, tests=6, runs=4, per_run=12, batch=4, epochs=1))
    whole = AdditiveSimulator(l2=0.5).fit(runs)
    sharded = AdditiveSimulator(l2=0.5, test_shards=3).fit(runs)
    assert sharded.A_ is None and not hasattr(sharded, "cg_iterations_")
    np.testing.assert_allclose(sharded.B_, whole.B_, rtol=0, atol=1e-9)


def test_sharded_fit_knows_which_examples_were_seen() -> None:
    """``seen_``: consumed at least once (here "a" twice, "b" once, "c" never)."""
    runs = RunSet(
        ["a", "b", "c"],
        ["t0", "t1"],
        [
            Run("r0", [["a"], ["b"]], [[2.0, 1.0], [1.5, 0.9], [1.2, 0.8]]),
            Run("r1", [["a"]], [[2.0, 1.0], [1.6, 0.95]]),
        ],
    )
    for shards in (None, 2):
        sim = LinearSimulator(l2=1.0, test_shards=shards).fit(runs)
        assert sim.seen_.tolist() == [True, True, False]


class RecordingBackend(SerialBackend):
    """The serial backend, keeping every unit it ran: ``(phase, grid, test ids)``, and
    claiming `parallelism` units at a time."""

    def __init__(self, parallelism: int = 1) -> None:
        super().__init__()
        self.parallelism = parallelism
        self.units: list[tuple[str, list[float], list[str]]] = []

    def map_unordered(self, work, items):  # type: ignore[no-untyped-def]
        self.units += [(phase, grid, runs.test_ids) for phase, grid, runs in items]
        return super().map_unordered(work, items)


def test_sharded_fit_runs_its_units_on_the_backend_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The simulator's backend spec picks the backend; cross-validation runs on the
    `cv_tests` subset, then the solve at the chosen l2, each in `test_shards` contiguous
    blocks of test examples (else one per unit the backend runs at once); the result is the
    unsharded fit's, ``seen_`` included (id "f" is never consumed)."""
    import simfluence.simulators.sharded as sharded_module

    asked: list[str] = []
    backends: list[RecordingBackend] = []

    def recording_backend(spec: str, threads: int = 1) -> RecordingBackend:
        asked.append(spec)
        backends.append(RecordingBackend(parallelism=3))
        return backends[-1]

    monkeypatch.setattr(sharded_module, "shared_backend", recording_backend)
    batches = [["ab", "c", "de"], ["cd", "a", "eb"], ["e", "ba", "dc"]]
    runs = RunSet(
        list("abcdef"),
        [f"t{j}" for j in range(5)],
        [
            Run(
                f"r{k}",
                [list(b) for b in steps],
                np.linspace(2.0 + k, 1.5, 4)[:, None] * [1.0, 0.8, 1.2, 0.9, 1.1],
            )
            for k, steps in enumerate(batches)
        ],
    )
    params = {"l2_grid": [1.0, 0.1], "cv_folds": 3, "cv_tests": 4}
    whole = AdditiveSimulator(**params).fit(runs)
    assert not asked  # serial and unsharded: no backend
    sharded = AdditiveSimulator(**params, test_shards=2).fit(runs)
    cv_ids = whole._cv_runs(runs).test_ids
    assert asked == ["serial"] and backends[0].units == [
        ("cv", [1.0, 0.1], cv_ids[:2]),
        ("cv", [1.0, 0.1], cv_ids[2:]),
        ("solve", [whole.l2_], ["t0", "t1", "t2"]),
        ("solve", [whole.l2_], ["t3", "t4"]),
    ]
    np.testing.assert_allclose(sharded.cv_mse_, whole.cv_mse_, rtol=1e-10)
    assert sharded.l2_ == whole.l2_ and sharded.seen_.tolist() == [True] * 5 + [False]
    np.testing.assert_allclose(sharded.B_, whole.B_, rtol=0, atol=1e-12)
    AdditiveSimulator(l2=0.5, backend="process:3").fit(runs)
    assert asked[1] == "process:3"
    assert [ids for _, _, ids in backends[1].units] == [["t0", "t1"], ["t2", "t3"], ["t4"]]


def test_sharded_cross_validation_scores_with_the_fitted_floors() -> None:
    """Each shard's CV rollouts are floored like the whole fit's: a loss that can be negative
    keeps its lowest recorded value as floor. (The shards once scored with the class default,
    a hard clip at 0: on these runs their CV errors were 8 times the whole fit's.)"""
    runs = RunSet(
        ["a", "b", "c"],
        ["t0", "t1"],
        [
            Run(
                f"r{k}",
                [["a", "b"], ["c"], ["b", "c"]],
                [[1.0, -0.5], [0.8, -0.9], [0.7, -1.4], [0.5, -2.0 - k]],
            )
            for k in range(3)
        ],
    )
    params = {"l2_grid": [1.0, 0.1], "cv_folds": 3}
    whole = AdditiveSimulator(**params).fit(runs)
    sharded = AdditiveSimulator(**params, test_shards=2).fit(runs)
    np.testing.assert_allclose(sharded.cv_mse_, whole.cv_mse_, rtol=1e-10)


@pytest.mark.workers
def test_sharded_fit_on_workers_is_bit_identical(synthetic) -> None:  # type: ignore[no-untyped-def]
    from simfluence.simulators import AdditiveSimulator

    for cls in (LinearSimulator, AdditiveSimulator):
        here = cls(test_shards=3).fit(synthetic)
        pool = cls(test_shards=3, backend="process:2").fit(synthetic)
        assert here.l2_ == pool.l2_ and here.cv_mse_ == pool.cv_mse_
        assert np.array_equal(here.B_, pool.B_)
        assert (here.A_ is None and pool.A_ is None) or np.array_equal(here.A_, pool.A_)


def test_cv_on_a_subset_of_tests(synthetic) -> None:  # type: ignore[no-untyped-def]

    sub = LinearSimulator(cv_tests=10).fit(synthetic)
    cols = np.sort(np.random.default_rng(0).choice(30, 10, replace=False))
    expected = LinearSimulator().fit(synthetic.select_tests(cols))
    assert sub.cv_mse_ == expected.cv_mse_ and sub.l2_ == expected.l2_
    assert sub.A_.shape == (30, 80)  # the final solve covers every test example
    fixed = LinearSimulator(l2=sub.l2_).fit(synthetic)
    np.testing.assert_allclose(sub.A_, fixed.A_, rtol=0, atol=1e-9)


@pytest.mark.workers
def test_fit_cli_shards_and_workers(tmp_path: Path, synthetic) -> None:  # type: ignore[no-untyped-def]
    from simfluence.runlog import save_runset
    from simfluence.simulators.registry import load_simulator

    save_runset(synthetic, tmp_path / "runs")
    out = tmp_path / "linear.npz"
    argv = ["fit", str(tmp_path / "runs"), "--method", "linear", "-o", str(out)]
    assert main([*argv, "--shards", "3", "--workers", "2", "--cv-tests", "12"]) == 0
    fitted = load_simulator(out)
    assert fitted.test_shards == 3 and fitted.backend == "process:2" and fitted.cv_tests == 12
    reference = LinearSimulator(cv_tests=12, test_shards=3).fit(synthetic)
    assert np.array_equal(fitted.A_, reference.A_)


# -- Ray -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray = require_module("ray", "pip install 'simfluence[ray]'")  # CI installs it: fails there
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.workers
def test_ray_records_validates_and_fits_like_serial(tmp_path: Path, local_ray, synthetic) -> None:  # type: ignore[no-untyped-def]
    _digits(tmp_path / "serial")
    _digits(tmp_path / "ray", "ray")
    _assert_same_recordings(tmp_path / "serial", tmp_path / "ray")

    from simfluence.recording.validation import validate

    runs = load_runset(tmp_path / "serial")
    task = get_workload("digits-mlp")
    serial = validate(
        task, runs, {"linear": LinearSimulator(l2=1.0, unseen="prior")}, ["random"], 3
    )
    on_ray = validate(
        task,
        runs,
        {"linear": LinearSimulator(l2=1.0, unseen="prior")},
        ["random"],
        3,
        backend="ray",
    )
    assert serial.pop("timing") and on_ray.pop("timing")  # wall-clock: apart, as documented
    assert json.dumps(serial, sort_keys=True) == json.dumps(on_ray, sort_keys=True)

    here = LinearSimulator(test_shards=3).fit(synthetic)
    there = LinearSimulator(test_shards=3, backend="ray").fit(synthetic)
    assert here.l2_ == there.l2_ and np.array_equal(here.A_, there.A_)
    assert np.array_equal(here.B_, there.B_)


@pytest.mark.workers
def test_warm_start_returns_at_once_and_the_workers_then_serve() -> None:
    """`ProcessBackend.start` hands the pool's seconds-long start (resource tracker, fork
    server importing torch, workers) to a thread, so a command prepares its task meanwhile
    (`record --workers 2` on 1 digits-mlp run: 7.7 s -> 6.1 s); the first units then run on
    those workers, and `close` waits for the start before shutting the pool down."""
    from simfluence.backends import ProcessBackend

    backend = ProcessBackend(2)
    began = time.perf_counter()
    backend.start()
    assert time.perf_counter() - began < 0.5
    try:
        assert sorted(backend.map_unordered(abs, [-3, -1, -2])) == [(0, 3), (1, 1), (2, 2)]
    finally:
        backend.close()
    assert backend._pool is None and backend._warming is None
    closed_while_starting = ProcessBackend(1)
    closed_while_starting.start()
    closed_while_starting.close()  # joins the starting thread, then shuts the pool down
    assert closed_while_starting._pool is None


@pytest.mark.workers
def test_workers_are_forked_with_what_an_optimizer_imports() -> None:
    """The fork server preloads ``torch._dynamo``: a worker's first ``torch.optim`` optimizer
    would import it, 0.8 s in every worker (`record --workers 2` on 400 digits-mlp runs: each
    worker's CPU 11.7 s -> 10.4 s)."""
    code = textwrap.dedent(
        """
        from simfluence.backends import PRELOAD, ProcessBackend
        import backend_tasks
        backend = ProcessBackend(1)
        backend.start(preload=PRELOAD)
        try:
            print([x for _, x in backend.map_unordered(backend_tasks.loaded, ["torch._dynamo"])])
        finally:
            backend.close()
        """
    )
    assert _in_a_fresh_process(code).strip() == "[True]"


@pytest.mark.workers
def test_a_library_pool_preloads_what_training_imports_when_torch_is_loaded() -> None:
    """A pool started without a preload list (``record_runs(..., backend="process:2")`` from a
    script) preloads ``torch._dynamo`` too when this process has torch."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        from simfluence.backends import ProcessBackend
        import backend_tasks
        assert "torch._dynamo" not in sys.modules
        with ProcessBackend(1) as backend:
            print([x for _, x in backend.map_unordered(backend_tasks.loaded, ["torch._dynamo"])])
        """
    )
    assert _in_a_fresh_process(code).strip() == "[True]"
