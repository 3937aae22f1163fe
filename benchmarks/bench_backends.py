"""Benchmark: recording and validating on the execution backends (serial, processes, Ray).

    python benchmarks/bench_backends.py OUT --workload newsgroups-minilm --runs 8 \
        --record serial,workers:2 [--validate serial,workers:2 --curricula 4 --kinds random]

Every variant runs the command line as a user would (``python -m simfluence record DIR ...``,
one fresh process each, start-up included) into ``OUT/<variant>``, with one torch thread per
training process (``--threads 1``; serial is ``--workers 1``), and the workload's default
protocol otherwise. After the recordings, every run file is compared with the first variant's
(losses, curricula, learning rates, checkpoints: bit for bit). ``--validate`` retrains
``--curricula`` curricula of each of ``--kinds`` on the first variant's run set, once per
backend, and compares the JSON (timings aside); ``--validate-extra`` adds options, e.g.
``--kinds loo,loo-weight0 --curricula 2 --validate-extra '--methods mean'`` for
leave-one-out. ``--repeat N`` runs every variant N times, back to back and alternating (the
machine may be shared: its load drifts), and reports the median. Prints wall-clock seconds,
the speed-up of the medians over the first variant and the 1-minute load average before and
after each command.

    python benchmarks/bench_backends.py OUT --runs 400 --repeat 3 --record serial,workers:2 \
        --validate serial,workers:2 --kinds loo,loo-weight0 --curricula 2 \
        --validate-extra '--methods mean'
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simfluence.runlog import load_runset
from simfluence.runlog.layout import checkpoint_path


def backend_flags(variant: str) -> list[str]:
    """``serial`` -> --workers 1; ``workers:N`` -> --workers N; ``ray`` -> --ray."""
    if variant == "serial":
        return ["--workers", "1", "--threads", "1"]
    if variant.startswith("workers:"):
        return ["--workers", variant.split(":")[1], "--threads", "1"]
    if variant == "ray":
        return ["--ray", "--threads", "1"]
    raise SystemExit(f"unknown variant {variant!r}")


def _become_subreaper() -> bool:
    """Linux: orphaned descendants (a fork server and its workers) are reparented to this
    process, so their CPU time is counted in ``RUSAGE_CHILDREN`` once reaped."""
    try:
        import ctypes

        return ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap() -> None:
    """Wait for the command's orphaned descendants (they exit with their parent)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def timed(argv: list[str]) -> dict[str, float]:
    """Wall-clock seconds of the command, the CPU seconds of all its processes (user and
    system; with `_become_subreaper`) and the 1-minute load average before and after."""
    before = os.getloadavg()[0]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "simfluence", *argv], check=True, env=env)
    seconds = time.perf_counter() - start
    _reap()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "load_before": before,
        "load_after": os.getloadavg()[0],
    }


def same_run_sets(a: Path, b: Path) -> bool:
    x, y = load_runset(a), load_runset(b)
    if x.run_ids != y.run_ids or x.metadata != y.metadata:
        return False
    for rx, ry in zip(x.runs, y.runs, strict=True):
        if rx.curriculum != ry.curriculum or not np.array_equal(rx.losses, ry.losses):
            return False
        if not np.array_equal(rx.lr, ry.lr):
            return False
        for step in rx.metadata.get("checkpoint_steps", []):
            sx = torch.load(checkpoint_path(a, rx.run_id, step), weights_only=True)
            sy = torch.load(checkpoint_path(b, ry.run_id, step), weights_only=True)
            if sx.keys() != sy.keys() or not all(torch.equal(sx[k], sy[k]) for k in sx):
                return False
    return True


def summarize(block: dict[str, dict[str, object]], variants: list[str]) -> None:
    """Median seconds of every variant, its speed-up over the first variant's median, and
    whether every repeat matched the first variant."""
    for variant in variants:
        repeats = block[variant]["repeats"]
        if not repeats:
            continue
        block[variant]["seconds"] = statistics.median(r["seconds"] for r in repeats)
        block[variant]["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in repeats)
        key = "identical_to_" + variants[0]
        if variant != variants[0]:
            block[variant][key] = all(r[key] for r in repeats)
    for variant in variants:
        if "seconds" in block[variant]:
            base = block[variants[0]]["seconds"]
            block[variant]["speedup"] = base / block[variant]["seconds"]
            print(
                f"{variant}: median {block[variant]['seconds']:.1f} s, "
                f"{block[variant]['speedup']:.2f}x",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--workload", default="digits-mlp")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--record", default="serial,workers:2")
    parser.add_argument("--extra", default="", help="more record options, e.g. '--warmup 5'")
    parser.add_argument("--validate", default="")
    parser.add_argument("--curricula", type=int, default=4)
    parser.add_argument("--kinds", default="random")
    parser.add_argument("--methods", default="linear,mean")
    parser.add_argument("--validate-extra", default="", help="more validate options")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (median)")
    parser.add_argument("--out-json", default=None, help="also write the results here")
    args = parser.parse_args()
    _become_subreaper()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "workload": args.workload,
        "runs": args.runs,
        "cpus": os.cpu_count(),
    }
    variants = [v for v in args.record.split(",") if v]
    record: dict[str, dict[str, object]] = {v: {"repeats": []} for v in variants}
    for repeat in range(args.repeat):
        for variant in variants:
            target = out / variant.replace(":", "-")
            shutil.rmtree(target, ignore_errors=True)
            argv = ["record", str(target), "--workload", args.workload, "--no-progress"]
            argv += ["--runs", str(args.runs)] if args.runs else []
            argv += args.extra.split() + backend_flags(variant)
            one = timed(argv)
            if variant != variants[0]:
                first = out / variants[0].replace(":", "-")
                one["identical_to_" + variants[0]] = same_run_sets(first, target)
            record[variant]["repeats"].append(one)
            print(f"record {variant} #{repeat}: {json.dumps(one)}", flush=True)
    summarize(record, variants)
    results["record"] = record
    checks = [v for v in args.validate.split(",") if v]
    validation: dict[str, dict[str, object]] = {v: {"repeats": []} for v in checks}
    runs_dir = out / variants[0].replace(":", "-")
    if checks:
        results["validate_command"] = ["--curricula", str(args.curricula), "--kinds", args.kinds]
        results["validate_command"] += ["--methods", args.methods, *args.validate_extra.split()]
    for repeat in range(args.repeat if checks else 0):
        for variant in checks:
            target = out / f"validation-{variant.replace(':', '-')}.json"
            argv = ["validate", str(runs_dir), *results["validate_command"], "--json", str(target)]
            one = timed(argv + backend_flags(variant))
            if variant != checks[0]:
                first = json.loads(
                    (out / f"validation-{checks[0].replace(':', '-')}.json").read_text()
                )
                mine = json.loads(target.read_text())
                first.pop("timing", None), first.pop("seconds", None)
                mine.pop("timing", None), mine.pop("seconds", None)
                one["identical_to_" + checks[0]] = first == mine
            validation[variant]["repeats"].append(one)
            print(f"validate {variant} #{repeat}: {json.dumps(one)}", flush=True)
    summarize(validation, checks)
    results["validate"] = validation
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench_backends.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'bench_backends.json'}")


if __name__ == "__main__":
    main()
