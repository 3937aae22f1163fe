"""Recording: the recorder for hand loops, the Trainer callback, the resumable runner, the CLI."""

from __future__ import annotations

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
from tiny_task import SMALL, STEPS, FailingTask, TinyTask, _HFModel, _record
from torch import nn

from simfluence.cli.main import main
from simfluence.curricula import random_curriculum
from simfluence.errors import CurriculumError, RunLogError, SimfluenceError
from simfluence.recording import (
    Recorder,
    RecordingProtocol,
    Task,
    load_checkpoint,
    run_seed,
)
from simfluence.recording.protocol import ProtocolError, checkpoint_steps
from simfluence.recording.recorder import RecordingError
from simfluence.runlog import load_runset
from simfluence.runlog.layout import run_path
from simfluence.runlog.runs import default_holdout
from simfluence.runlog.store import list_run_files


def _hand_loop(task: Task, curriculum, lr: float, seed: int = 0):
    """Train with plain SGD over `curriculum`; returns losses (T + 1, M) computed by hand."""
    pool, tests = task.prepare(SMALL["pool"], SMALL["tests"], seed)
    rows = {i: r for r, i in enumerate(pool.ids)}
    model = task.make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    with torch.no_grad():
        out.append(task.example_losses(model, tests.tensors).numpy().copy())
    for batch in curriculum:
        opt.zero_grad()
        task.example_losses(model, pool.take([rows[i] for i in batch])).mean().backward()
        opt.step()
        with torch.no_grad():
            out.append(task.example_losses(model, tests.tensors).numpy().copy())
    return np.array(out)


# -- Recorder ---------------------------------------------------------------------------------
def test_recorder_hand_loop(tmp_path: Path) -> None:
    task = TinyTask()
    pool, tests = task.prepare(12, 4, 0)
    curriculum = [["ex-0", "ex-3"], ["ex-5", "ex-5"], ["ex-11", "ex-2"]]
    expected = _hand_loop(task, curriculum, lr=0.05)

    model = task.make_model(0)
    model.train()
    modes = []

    def loss_fn(m: nn.Module, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        modes.append(m.training)
        return task.example_losses(m, chunk)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder(
        model, tests, loss_fn, pool=pool.ids, directory=tmp_path, run_id="a", chunk_size=3
    )
    rows = {i: r for r, i in enumerate(pool.ids)}
    for batch in curriculum:
        opt.zero_grad()
        task.example_losses(model, pool.take([rows[i] for i in batch])).mean().backward()
        opt.step()
        rec.step(batch, lr=0.05)
        assert model.training  # mode restored after scoring
    run = rec.finish()
    assert not any(modes)  # scored in eval mode, in chunks of 3 (2 per step)
    assert len(modes) == 2 * (len(curriculum) + 1)
    assert run.losses.dtype == np.float64 and run.losses.shape == (4, 4)
    np.testing.assert_allclose(run.losses, expected, rtol=0, atol=1e-12)
    assert run.curriculum == curriculum and np.all(run.lr == 0.05)
    loaded = load_runset(tmp_path)
    assert loaded.test_ids == tests.ids and loaded.train_ids == pool.ids
    np.testing.assert_array_equal(loaded.run("a").losses, run.losses)

    # a second run into the same set: the manifest's pool is used
    rec2 = Recorder.from_task(task, task.make_model(0), tests, directory=tmp_path, run_id="b")
    assert rec2.pool == pool.ids
    rec2.step(["ex-7"])
    rec2.finish()
    assert load_runset(tmp_path).run_ids == ["a", "b"]


def test_recorder_int_ids_outside_pool(tmp_path: Path) -> None:
    task = TinyTask()
    pool, tests = task.prepare(12, 4, 0)
    rec = Recorder.from_task(task, task.make_model(0), tests, pool=pool.ids)
    with pytest.raises(CurriculumError, match=r"step 1: training id '1' is not in the pool"):
        rec.step([1, 2])
    assert rec.n_steps == 0


def test_recorder_bad_input_keeps_what_was_recorded(tmp_path: Path) -> None:
    task = TinyTask()
    pool, tests = task.prepare(12, 4, 0)
    first = Recorder.from_task(
        task, task.make_model(0), tests, pool=pool.ids, directory=tmp_path, run_id="first"
    )
    first.step(["ex-1", "ex-2"])
    first.finish()
    on_disk = run_path(tmp_path, "first").read_bytes()

    calls = {"n": 0}

    def flaky(m: nn.Module, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        losses = task.example_losses(m, chunk)
        if calls["n"] == 3:
            return losses[:2]  # wrong shape at step 2
        if calls["n"] == 4:
            return losses * float("nan")  # NaN at step 2 (retry)
        return losses

    rec = Recorder(task.make_model(0), tests, flaky, directory=tmp_path, run_id="second")
    rec.step(["ex-0"])
    with pytest.raises(CurriculumError, match=r"run 'second': step 2: training id 'nope'"):
        rec.step(["ex-1", "nope"])
    with pytest.raises(SimfluenceError, match=r"step 2: the loss function returned shape \(2,\)"):
        rec.step(["ex-1"])
    with pytest.raises(SimfluenceError, match=r"step 2: loss of test example 'ex-12' is nan"):
        rec.step(["ex-1"])
    assert rec.n_steps == 1 and rec.losses.shape == (2, 4)
    assert np.isfinite(rec.losses).all()
    assert rec.run().curriculum == [["ex-0"]]
    assert run_path(tmp_path, "first").read_bytes() == on_disk
    assert load_runset(tmp_path).run_ids == ["first"]

    with pytest.raises(SimfluenceError, match="test ids differ"):
        Recorder.from_task(task, task.make_model(0), tests.subset([0, 1]), directory=tmp_path)
    with pytest.raises(SimfluenceError, match="give the pool"):
        Recorder.from_task(task, task.make_model(0), tests, directory=tmp_path / "new")


# -- Hugging Face Trainer ---------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_callback_matches_hand_loop(tmp_path: Path) -> None:
    transformers = require_module("transformers", "pip install transformers")
    from simfluence.recording.hf import IdCollator, SimfluenceCallback

    task = TinyTask()
    pool, tests = task.prepare(12, 4, 0)
    items = [
        {"x": pool.tensors["x"][r], "labels": pool.tensors["y"][r], "simfluence_id": pool.ids[r]}
        for r in range(len(pool))
    ]

    def loss_fn(m: nn.Module, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        return (m.linear(chunk["x"]).squeeze(-1) - chunk["y"]) ** 2

    collator = IdCollator(transformers.default_data_collator)
    callback = SimfluenceCallback(
        collator, tests, loss_fn, pool=pool.ids, directory=tmp_path, run_id="hf"
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=3,
        num_train_epochs=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=0.0,
        gradient_accumulation_steps=1,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=7,
    )
    model = _HFModel(0)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=items, data_collator=collator, callbacks=[callback]
    )
    trainer.train()
    run = callback.run
    assert run is not None and run.n_steps == 8  # 2 epochs x 12 / 3
    assert sorted(i for b in run.curriculum[:4] for i in b) == sorted(pool.ids)  # one epoch
    assert np.all(run.lr == 0.05)
    assert not collator.queue  # every collated batch was consumed by a step

    # the same batches in the same order, by hand, from the same initial model
    expected = _hand_loop(task, run.curriculum, lr=0.05)
    np.testing.assert_allclose(run.losses, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(run.losses, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(load_runset(tmp_path).run("hf").losses, run.losses)

    bad = transformers.TrainingArguments(
        output_dir=str(tmp_path / "t2"),
        gradient_accumulation_steps=2,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
    )
    trainer = transformers.Trainer(
        model=_HFModel(0),
        args=bad,
        train_dataset=items,
        data_collator=collator,
        callbacks=[SimfluenceCallback(collator, tests, loss_fn, pool=pool.ids)],
    )
    with pytest.raises(SimfluenceError, match="gradient_accumulation_steps=1"):
        trainer.train()
    bad = transformers.TrainingArguments(
        output_dir=str(tmp_path / "t3"), use_cpu=True, report_to=[], remove_unused_columns=True
    )
    trainer = transformers.Trainer(
        model=_HFModel(0),
        args=bad,
        train_dataset=items,
        data_collator=collator,
        callbacks=[SimfluenceCallback(collator, tests, loss_fn, pool=pool.ids)],
    )
    with pytest.raises(SimfluenceError, match="remove_unused_columns=False"):
        trainer.train()


# -- the runner -------------------------------------------------------------------------------
def test_runner_is_deterministic_and_follows_the_protocol(tmp_path: Path) -> None:
    a = _record(tmp_path / "a")
    b = _record(tmp_path / "b")
    c = _record(tmp_path / "c", seed=1)
    assert a.run_ids == [f"run-{r:04d}" for r in range(4)]
    for run_a, run_b in zip(a.runs, b.runs, strict=True):
        assert run_a.curriculum == run_b.curriculum
        assert np.array_equal(run_a.losses, run_b.losses)  # bit-identical
    assert [r.curriculum for r in a.runs] != [r.curriculum for r in c.runs]
    # every run starts from the same model; curricula differ between runs
    for run in a.runs[1:]:
        assert np.array_equal(run.losses[0], a.runs[0].losses[0])
    assert len({str(r.curriculum) for r in a.runs}) == 4
    # the stored seed redraws the curriculum; the losses equal a plain SGD loop's
    task = TinyTask()
    pool, _ = task.prepare(12, 4, 0)
    run = a.runs[2]
    assert run.seed == run_seed(0, 2)
    assert run.curriculum == random_curriculum(pool.ids, 8, 2, 2, np.random.default_rng(run.seed))
    np.testing.assert_allclose(
        run.losses, _hand_loop(task, run.curriculum, 0.05), rtol=0, atol=1e-12
    )
    assert run.losses.shape == (STEPS + 1, 4) and np.all(run.lr == 0.05)
    meta = load_runset(tmp_path / "a").metadata
    assert meta["config"]["per_run"] == 8 and meta["task"] == {"workload": "tiny-test"}


def test_runner_resumes_after_a_crash(tmp_path: Path) -> None:
    full = _record(tmp_path / "full")
    # each run calls example_losses 1 (step 0) + 8 x 2 (train + score) = 17 times
    with pytest.raises(RuntimeError, match="simulated crash"):
        _record(tmp_path / "crash", task=FailingTask(fail_after=17 * 2 + 5))
    assert [p.stem for p in list_run_files(tmp_path / "crash")] == ["run-0000", "run-0001"]
    first = run_path(tmp_path / "crash", "run-0000").stat().st_mtime_ns
    resumed = _record(tmp_path / "crash")
    assert run_path(tmp_path / "crash", "run-0000").stat().st_mtime_ns == first  # skipped
    assert resumed.run_ids == full.run_ids
    for x, y in zip(full.runs, resumed.runs, strict=True):
        assert x.curriculum == y.curriculum and np.array_equal(x.losses, y.losses)
    # more runs extend the recording
    more = _record(tmp_path / "crash", runs=5)
    assert more.run_ids[-1] == "run-0004" and len(more.runs) == 5
    # a different configuration is refused
    with pytest.raises(SimfluenceError, match="choose another directory"):
        _record(tmp_path / "crash", lr=0.1)


@pytest.mark.slow
@pytest.mark.workers
def test_runner_resumes_after_kill_9(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from tiny_task import TinyTask, SMALL
        from simfluence.recording import RecordingProtocol, record_runs

        class Slow(TinyTask):
            def example_losses(self, model, inputs):
                time.sleep(0.01)
                return super().example_losses(model, inputs)

        protocol = RecordingProtocol(**{{**SMALL, "runs": 6}}, seed=0, checkpoints=[0, 4])
        record_runs(Slow(), sys.argv[1], protocol, progress=False)
        """
    )
    target = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list_run_files(target)) < 2:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list_run_files(target))
    assert 2 <= done < 6, "the recording should have been killed mid-way"
    (target / "runs" / ".run-0005.parquet.stale.tmp").write_bytes(b"half")  # a kill mid-write
    resumed = _record(target, runs=6, checkpoints=[0, 4])
    full = _record(tmp_path / "full", runs=6, checkpoints=[0, 4])
    assert resumed.run_ids == full.run_ids
    for x, y in zip(full.runs, resumed.runs, strict=True):
        assert np.array_equal(x.losses, y.losses) and x.curriculum == y.curriculum
    assert not list((target / "runs").glob(".*"))  # stale temporaries removed
    assert len(list_run_files(target)) == 6


def test_checkpoints(tmp_path: Path) -> None:
    task = TinyTask()
    runs = _record(tmp_path, checkpoints=[0, 4, STEPS])
    initial = task.make_model(0).state_dict()
    for run in runs.runs:
        assert run.metadata["checkpoint_steps"] == [0, 4, STEPS]
        state0 = load_checkpoint(tmp_path, run.run_id, 0)
        assert state0.keys() == initial.keys()
        assert all(torch.equal(state0[k], initial[k]) for k in initial)
        _, tests = task.prepare(12, 4, 0)
        for step in (4, STEPS):
            model = task.make_model(0)
            model.load_state_dict(load_checkpoint(tmp_path, run.run_id, step))
            with torch.no_grad():
                losses = task.example_losses(model, tests.tensors).numpy()
            np.testing.assert_array_equal(losses, run.losses[step])
    with pytest.raises(
        SimfluenceError, match=r"run 'run-0001' at step 5 \(saved steps: \[0, 4, 8\]"
    ):
        load_checkpoint(tmp_path, "run-0001", 5)
    with pytest.raises(SimfluenceError, match=r"run 'run-0009' at step 0"):
        load_checkpoint(tmp_path, "run-0009", 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"per_run": 13}, "^per_run 13: must not exceed the pool size 12"),
        ({"checkpoints": [9]}, r"^checkpoints \[9\]: step 9 is outside 0\.\.8"),
        ({"runs": 0}, "^runs 0: must be a whole number of at least 1"),
        ({"lr": float("nan")}, "^lr nan: must be a positive number"),
        ({"pool": 10_000}, "tiny-test|pool"),
    ],
)
def test_runner_validates_options(tmp_path: Path, overrides: dict, message: str) -> None:
    class Strict(TinyTask):
        def prepare(self, pool: int, tests: int, seed: int):
            if pool > 100:
                raise ValueError(f"only 100 examples, pool={pool} asked for")
            return super().prepare(pool, tests, seed)

    with pytest.raises(SimfluenceError, match=message):
        _record(tmp_path / "x", task=Strict(), **overrides)
    assert not list_run_files(tmp_path / "x")


def test_protocol_names_the_field_and_fills_what_was_left_out() -> None:
    with pytest.raises(ProtocolError, match=r"^batch 9: must not exceed per_run 8") as info:
        RecordingProtocol(per_run=8, batch=9)
    assert info.value.field == "batch" and info.value.value == 9
    assert info.value.with_name("--batch") == "--batch 9: must not exceed per_run 8"
    with pytest.raises(ProtocolError, match=r"^seed -1: must be a whole number >= 0"):
        RecordingProtocol(seed=-1)
    with pytest.raises(ProtocolError, match=r"^reserve 1\.0: must be a share of the pool"):
        RecordingProtocol(reserve=1)
    with pytest.raises(ProtocolError, match=r"^checkpoints \[0, 'x'\]: 'x' is not a step"):
        RecordingProtocol(checkpoints=[0, "x"])
    task = TinyTask()
    d = task.defaults
    filled = RecordingProtocol(runs=5).resolve(task)
    assert (filled.runs, filled.pool, filled.per_run, filled.lr) == (5, d.pool, d.per_run, d.lr)
    assert filled.seed == 0 and filled.checkpoints == tuple(checkpoint_steps(STEPS))
    assert filled.reserve == 0 and filled.reserve_from is None
    # resuming: what was left out is what the directory was recorded with
    recorded = {**filled.to_config(task), "runs": 5}
    assert RecordingProtocol().resolve(task, recorded).to_config(task) == recorded
    assert RecordingProtocol(runs=7).resolve(task, recorded).runs == 7
    # the never-seen protocol: by default the runs `evaluate` holds out draw the reserve
    reserved = RecordingProtocol(runs=32, pool=12, per_run=4, reserve=0.25).resolve(task)
    assert reserved.reserve_from == 32 - default_holdout(32) == 27
    with pytest.raises(ProtocolError, match=r"^reserve_from 2: needs a reserve above 0"):
        RecordingProtocol(reserve_from=2).resolve(task)


def test_runner_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SimfluenceError, match="not empty"):
        _record(tmp_path)


# -- the digits-mlp workload and the CLI -----------------------------------------------------
def _has_digits() -> bool:
    try:
        from simfluence.recording.workloads import get_workload

        get_workload("digits-mlp")
        import sklearn  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_digits(), reason="digits-mlp needs scikit-learn")
def test_record_cli_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = "--task digits-mlp --runs 2 --pool 20 --per-run 8 --tests 5 --batch 4 --epochs 2"
    argv = [
        "record",
        str(tmp_path / "d"),
        *options.split(),
        "--checkpoints",
        "0,2",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recorded 2 runs x 4 steps of digits-mlp" in out and str(tmp_path / "d") in out
    runs = load_runset(tmp_path / "d")
    assert len(runs.runs) == 2 and runs.runs[0].losses.shape == (5, 5)
    assert load_checkpoint(tmp_path / "d", "run-0001", 2)
    assert main(argv) == 0  # nothing left to do: resumes, records nothing
    assert main([*argv[:-3], "--checkpoints", "0,99", "--no-progress"]) == 2
    assert "--checkpoints [0, 99]: step 99 is outside 0..4" in capsys.readouterr().err
    assert main(["record", str(tmp_path / "e"), "--workload", "nope"]) == 2  # the older name
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main([*argv[:2], *options.split(), "--lr", "0.5", "--no-progress"]) == 2
    assert "choose another directory" in capsys.readouterr().err


def test_recorder_rejects_bad_arguments_by_name(tmp_path: Path) -> None:
    task = TinyTask()
    pool, tests = task.prepare(12, 4, 0)
    model = task.make_model(0)
    loss = task.example_losses
    cases = [
        (lambda: Recorder(model, tests, loss, chunk_size=0), "chunk_size must be at least 1"),
        (lambda: Recorder(model, tests, loss, test_ids=["a"]), "1 test ids for 4 test examples"),
        (lambda: Recorder(model, tests.subset([]), loss), "no test examples to score"),
        (lambda: Recorder(model, tests, loss, test_ids=["a", "a", "b", "c"]), "must be unique"),
        (
            lambda: Recorder(model, {"x": torch.zeros(3, 5), "y": torch.zeros(2)}, loss),
            "share their first dimension",
        ),
        (lambda: Recorder(model, 42, loss), "got int"),
        (
            lambda: Recorder(model, tests, loss, pool=["a", "a"], directory=tmp_path / "d"),
            "pool of training ids has duplicates",
        ),
    ]
    for make, message in cases:
        with pytest.raises(RecordingError, match=message):
            make()
    first = Recorder.from_task(task, model, tests, pool=pool.ids, directory=tmp_path / "set")
    first.step(["ex-0"])
    first.finish()
    with pytest.raises(RunLogError, match="training id 'zz' of the given pool is not in"):
        Recorder.from_task(task, model, tests, pool=["ex-0", "zz"], directory=tmp_path / "set")


def test_recorder_rejects_bad_steps_and_keeps_the_rest() -> None:
    task = TinyTask()
    pool, tests = task.prepare(12, 4, 0)
    rec = Recorder.from_task(task, task.make_model(0), tests, pool=pool.ids, run_id="r")
    with pytest.raises(RecordingError, match="run 'r': no training step was recorded"):
        rec.run()
    with pytest.raises(CurriculumError, match="step 1: the batch must be a list of training ids"):
        rec.step("ex-0")
    with pytest.raises(CurriculumError, match="step 1: empty batch"):
        rec.step([])
    with pytest.raises(RecordingError, match="step 1: learning rate is inf"):
        rec.step(["ex-0"], lr=float("inf"))
    rec.step(["ex-0"], lr=0.1)
    rec.step(np.array(["ex-1", "ex-2"]))  # numpy ids, no learning rate
    run = rec.run()
    assert run.curriculum == [["ex-0"], ["ex-1", "ex-2"]]
    np.testing.assert_array_equal(run.lr, [0.1, np.nan])  # a missing rate is NaN, not dropped


def test_recorder_scores_dicts_and_sequences_of_test_examples() -> None:
    """Test examples may be a dict of tensors or any sliceable sequence, scored in chunks; the
    loss function may return a list; integer ids (tensors, numpy) become strings."""
    task = TinyTask()
    _, tests = task.prepare(12, 4, 0)
    model = task.make_model(0)
    with torch.no_grad():
        expected = task.example_losses(model, tests.tensors).numpy()
    as_dict = Recorder(model, tests.tensors, task.example_losses, chunk_size=3)
    np.testing.assert_allclose(as_dict.losses[0], expected, rtol=1e-12)
    assert as_dict.test_ids == ["0", "1", "2", "3"]
    rows = [{k: v[r] for k, v in tests.tensors.items()} for r in range(len(tests))]

    def list_loss(m: nn.Module, chunk: list[dict]) -> list[float]:
        batch = {k: torch.stack([row[k] for row in chunk]) for k in chunk[0]}
        return task.example_losses(m, batch).tolist()

    as_list = Recorder(model, rows, list_loss, test_ids=tests.ids, chunk_size=3)
    np.testing.assert_allclose(as_list.losses[0], expected, rtol=1e-12)
    as_list.step([torch.tensor(3), np.int64(4), 5])
    assert as_list.curriculum == [["3", "4", "5"]]
