"""Faults a recording survives: a second writer on the same directory, a full disk, a read-only
directory. Each is refused with one line (`SimfluenceError`, exit status 2 on the command line)
naming what is at fault, leaves no half-written file, and the next call finishes with the files
an uninterrupted recording writes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_task import SMALL, TinyTask

from simfluence._lock import LockedError, exclusive_lock
from simfluence.cli.main import main
from simfluence.errors import SimfluenceError
from simfluence.recording import RecordingProtocol, record_runs
from simfluence.runlog.layout import LOCK_FILE, lock_path

TESTS = Path(__file__).resolve().parents[1]  # tiny_task.py, importable by a task file
CHECKPOINTS = [0, 4]


def _record(directory: Path, runs: int = 4):
    protocol = RecordingProtocol(**{**SMALL, "runs": runs}, seed=0, checkpoints=CHECKPOINTS)
    return record_runs(TinyTask(), directory, protocol, progress=False)


def _files(directory: Path) -> dict[str, bytes]:
    """Every file of a run set (the lock file aside) and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def _assert_clean(directory: Path) -> None:
    """No temporary file of an interrupted write is left anywhere."""
    assert not [p for p in directory.rglob(".*") if p.name != LOCK_FILE]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of an uninterrupted recording."""
    folder = tmp_path_factory.mktemp("reference") / "runs"
    _record(folder)
    return _files(folder)


# -- two writers on one directory ----------------------------------------------------------------
GATED_TASK = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from tiny_task import TinyTask

GATE = Path({gate!r})


class Gated(TinyTask):
    '''TinyTask that waits (holding the directory's lock) until GATE exists.'''

    def example_losses(self, model, inputs):
        deadline = time.monotonic() + 120
        while not GATE.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return super().example_losses(model, inputs)
"""


@pytest.mark.slow
@pytest.mark.workers
def test_a_second_writer_is_refused_while_the_first_records(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    task_file = tmp_path / "gated_task.py"
    task_file.write_text(GATED_TASK.format(tests=str(TESTS), gate=str(gate)))
    target = tmp_path / "runs"
    argv = ["record", str(target), "--task", f"{task_file}:Gated", "--seed", "0"]
    argv += ["--checkpoints", ",".join(map(str, CHECKPOINTS)), "--no-progress"]
    for key, value in SMALL.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    first = subprocess.Popen(
        [sys.executable, "-m", "simfluence", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (target / "manifest.json").exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        assert lock_path(target).read_text().strip() == str(first.pid)
        # a second process (the command line) is refused at once, with one line
        second = subprocess.run(
            [sys.executable, "-m", "simfluence", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"another process (pid {first.pid}) is writing" in lines[0]
        assert str(target) in lines[0]
        # and so is this one (the library), without touching the files
        before = _files(target)
        with pytest.raises(LockedError, match=f"pid {first.pid}"):
            _record(target)
        assert _files(target) == before
        assert first.poll() is None  # the first held the lock all along
    finally:
        gate.touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    # nothing corrupted: the same files as the same command run alone
    alone = tmp_path / "alone"
    assert main([str(alone) if a == str(target) else a for a in argv]) == 0
    assert _files(target) == _files(alone)
    _assert_clean(target)


HOLDER = """
import os, sys, time
from simfluence._lock import exclusive_lock
with exclusive_lock(sys.argv[1], "held"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.workers
def test_a_dead_writer_leaves_no_lock_behind(tmp_path: Path) -> None:
    """The lock dies with its process (kill -9 too): the lock file left behind blocks nobody."""
    path = lock_path(tmp_path / "runs")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused = rf"^here: another process \(pid {holder.pid}\)"
        with pytest.raises(LockedError, match=refused), exclusive_lock(path, "here"):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert path.exists()
    started = time.monotonic()
    with exclusive_lock(path, "here"):
        assert path.read_text().strip() == str(os.getpid())
    assert time.monotonic() - started < 1
    _record(tmp_path / "runs", runs=1)  # a lock file alone does not make the directory "used"


# -- a full disk, a read-only directory ------------------------------------------------------
def _failing_replace(monkeypatch: pytest.MonkeyPatch, code: int, when) -> list[str]:
    """Make the atomic writer fail with `code` for the files `when(target)` picks: the temporary
    file is cut to half its size first (the disk filled up while it was being written), then
    the write raises ``OSError(code)``. Returns the names of the files that failed."""
    real = os.replace
    failed: list[str] = []

    def replace(src, dst, *args, **kwargs):
        if when(Path(dst)):
            failed.append(Path(dst).name)
            size = Path(src).stat().st_size
            with open(src, "r+b") as handle:
                handle.truncate(size // 2)
            raise OSError(code, os.strerror(code), str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return failed


def test_a_full_disk_is_one_line_and_the_next_run_resumes(
    tmp_path: Path, reference, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The command line on a disk that fills up mid-write (simulated in the atomic writer)."""
    target = tmp_path / "runs"
    argv = ["record", str(target), "--task", f"{TESTS / 'tiny_task.py'}:TinyTask"]
    argv += ["--seed", "0", "--checkpoints", ",".join(map(str, CHECKPOINTS)), "--no-progress"]
    for key, value in SMALL.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    # the disk fills up while run-0002's file is written (after its checkpoints)
    failed = _failing_replace(monkeypatch, errno.ENOSPC, lambda p: p.name == "run-0002.parquet")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert failed == ["run-0002.parquet"]
    assert len(err) == 1, err
    assert "run-0002.parquet: cannot write: No space left on device" in err[0]
    _assert_clean(target)  # no half-written file, not even a temporary one
    assert sorted(p.name for p in (target / "runs").iterdir()) == [
        "run-0000.parquet",
        "run-0001.parquet",
    ]
    monkeypatch.undo()  # room again: the same command finishes the recording
    assert main(argv) == 0
    alone = tmp_path / "alone"  # the same command, never interrupted
    assert main([str(alone) if a == str(target) else a for a in argv]) == 0
    assert _files(target) == _files(alone)
    assert {k: v for k, v in _files(target).items() if k != "manifest.json"} == {
        k: v
        for k, v in reference.items()
        if k != "manifest.json"  # the library's, too
    }
    _assert_clean(target)


def _mount_read_only(folder: Path) -> bool:
    """Bind-mount `folder` read-only onto itself (root on Linux); False where that is refused."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        return False
    ro = subprocess.run(
        ["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True, check=False
    )
    if ro.returncode != 0:
        subprocess.run(["umount", str(folder)], check=True)
        return False
    return True


def test_a_read_only_directory_is_one_line_and_the_next_run_resumes(
    tmp_path: Path, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "runs"
    _record(target, runs=2)
    before = _files(target)
    # Tests run as root, which chmod does not stop: a read-only bind mount where the system
    # allows it (a real EROFS), chmod for other users, else EROFS simulated in the writer.
    if _mount_read_only(target):
        how, undo = "mount", lambda: subprocess.run(["umount", str(target)], check=True)
    elif os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [target, *target.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        how = "chmod"

        def undo() -> None:
            for p, mode in modes.items():
                p.chmod(mode)
    else:  # simulated: every write into the run set fails as on a read-only file system
        _failing_replace(monkeypatch, errno.EROFS, lambda p: target in p.parents)
        how, undo = "simulated", monkeypatch.undo
    try:
        with pytest.raises(SimfluenceError) as caught:
            _record(target)
    finally:
        undo()
    message = str(caught.value)
    assert "\n" not in message and str(target) in message, (how, message)
    assert "cannot write" in message, (how, message)
    assert _files(target) == before  # nothing changed, nothing half-written
    _assert_clean(target)
    _record(target)  # writable again: the recording grows to the full four runs
    assert _files(target) == reference
