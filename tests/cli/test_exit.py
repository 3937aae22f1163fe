"""The program's exit (`simfluence.cli.main.exit_now`): a normal exit's effects, without the
interpreter's teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def _python(code: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,  # buffered streams, as a user's usually are
    )


def test_exit_now_keeps_status_atexit_threads_and_buffered_output() -> None:
    done = _python(
        """
        import atexit, sys, threading, time
        from simfluence.cli.main import exit_now
        atexit.register(lambda: print("atexit ran"))
        def late():
            time.sleep(0.2)
            print("thread finished")
        threading.Thread(target=late).start()
        sys.stdout.write("buffered " * 2000)
        sys.stderr.write("to stderr")
        exit_now(3)
        """
    )
    assert done.returncode == 3
    assert done.stdout.startswith("buffered " * 2000)
    assert done.stdout.index("thread finished") < done.stdout.index("atexit ran")
    assert done.stderr == "to stderr"


def test_the_program_exits_with_its_status() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "simfluence", "--help"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0 and ok.stdout.startswith("usage: simfluence")
    bad = subprocess.run(
        [sys.executable, "-m", "simfluence", "fit", "/no/such/runs", "-o", "/tmp/x.npz"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("simfluence fit: error:") and "Traceback" not in bad.stderr
