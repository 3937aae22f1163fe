"""Benchmark: GPTfluence's own Simfluence beside ours, on the same runs and held-out split.

    python benchmarks/bench_gptfluence.py RUNS --gptfluence REPO --python PEER_PYTHON
        [--holdout 5] [--tests 50] [--seeds 42] [--epochs 300] [--methods linear,mean]
        [--loss-powers 1,2]
        [--work DIR] [--json OUT]

RUNS is a simfluence run set; REPO a checkout of github.com/ernie-research/gptfluence and
PEER_PYTHON the interpreter of an environment made for it (benchmarks/README.md says how; this
project does not vendor its code). The benchmark

1. exports RUNS with `export_gptfluence` (integer ids, step 0 as the starting point),
2. runs the peer's Simfluence (``--sim_name original``: Adam, 300 epochs, its own validation
   runs drawn from the training runs by its seeded shuffle, early stopping) through
   `gptfluence_driver.py` in the peer's environment, once per seed, and reads back its free-
   running rollouts of the held-out runs (its own `eval_simulator`),
3. fits our methods on the same training runs (all of them: cross-validation inside),
4. scores both sides' rollouts with the same `simfluence.evaluation.score` (`simfluence.metrics`)
   and prints one table.

The held-out runs are the last H by run id, as `simfluence evaluate --holdout H`. Peer results
are cached in WORK by seed, tests and epochs (delete them to rerun). Fit seconds: the peer's
are its `train()` call (validation rollouts included: its early stopping needs them), ours
`fit()` (cross-validation included).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from simfluence._atomic import write_json_atomic
from simfluence.evaluation import evaluate_simulator, score
from simfluence.runlog import RunSet, export_gptfluence, load_runset
from simfluence.simulators import configure_simulator

DRIVER = Path(__file__).with_name("gptfluence_driver.py")


def first_tests(runs: RunSet, n_tests: int) -> RunSet:
    """The run set restricted to its first `n_tests` test examples (the peer's id range 0..n-1)."""
    if n_tests >= len(runs.test_ids):
        return runs
    restricted = [replace(run, losses=run.losses[:, :n_tests]) for run in runs.runs]
    return RunSet(runs.train_ids, runs.test_ids[:n_tests], restricted, runs.metadata)


def run_peer(
    args: argparse.Namespace, runs: RunSet, train: RunSet, held: RunSet, seed: int
) -> dict:  # type: ignore[type-arg]
    """The driver's JSON for one seed, from the cache in WORK or by running it."""
    n_tests = len(runs.test_ids)
    work = args.work / f"peer-seed{seed}-tests{n_tests}-epochs{args.epochs}"
    out = work / "peer.json"
    if out.exists():
        print(f"GPTfluence seed {seed}: cached {out}", flush=True)
        return json.loads(out.read_text())
    work.mkdir(parents=True, exist_ok=True)
    command = [
        str(args.python),
        str(DRIVER),
        "--repo", str(args.gptfluence),
        "--export", str(args.work / "export"),
        "--train", ",".join(train.run_ids),
        "--heldout", ",".join(held.run_ids),
        "--n-train", str(len(runs.train_ids)),
        "--n-test", str(n_tests),
        "--seed", str(seed),
        "--epochs", str(args.epochs),
        "--work", str(work),
        "--out", str(out),
    ]  # fmt: skip
    print(f"GPTfluence seed {seed}: fitting ({args.epochs} epochs at most) ...", flush=True)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with open(work / "driver.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(
            f"GPTfluence driver failed (exit {done.returncode}); see {work}/driver.log"
        )
    return json.loads(out.read_text())


def peer_rollouts(peer: dict, held: RunSet) -> list[np.ndarray]:  # type: ignore[type-arg]
    """The peer's rollouts as ``(T + 1, M)`` arrays in held-out order, checked against the runs."""
    simulated = []
    for run in held.runs:
        traj = np.asarray(peer["rollouts"][run.run_id], dtype=np.float64).T
        if traj.shape != run.losses.shape:
            raise SystemExit(f"{run.run_id}: peer rollout {traj.shape} vs run {run.losses.shape}")
        if not np.allclose(traj[0], run.losses[0], rtol=1e-6):  # float32 on the peer's side
            raise SystemExit(f"{run.run_id}: the peer did not start from the recorded step 0")
        simulated.append(traj)
    return simulated


def markdown(rows: list[tuple[str, dict]]) -> str:  # type: ignore[type-arg]
    lines = [
        "| method | fit seconds | all-steps MSE | all-steps MAE | final-step MSE "
        "| final-step Spearman |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['fit_seconds']:.3g} | {s['all_steps_mse']:.4g} "
            f"| {s['all_steps_mae']:.3g} | {s['final_step_mse']:.4g} "
            f"| {s['final_step_spearman']:.3f} ± {s['final_step_spearman_std']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="run set directory")
    parser.add_argument("--gptfluence", type=Path, required=True, help="GPTfluence checkout")
    parser.add_argument("--python", type=Path, required=True, help="the peer's interpreter")
    parser.add_argument("--holdout", type=int, default=5)
    parser.add_argument("--tests", type=int, default=50, help="first N test examples")
    parser.add_argument("--seeds", default="42", help="the peer's seeds, comma-separated")
    parser.add_argument("--epochs", type=int, default=300, help="the peer's max_epoch")
    parser.add_argument("--methods", default="linear", help="our methods, comma-separated")
    parser.add_argument(
        "--loss-powers", default="", help="also `linear` with these loss_power values (e.g. 1,2)"
    )
    parser.add_argument("--work", type=Path, default=Path("gptfluence-bench"))
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    args.work = args.work.resolve()

    runs = first_tests(load_runset(args.runs), args.tests)
    train, held = runs.split(args.holdout)
    export_gptfluence(runs, args.work / "export")
    rows: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    peers = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        peer = run_peer(args, runs, train, held, seed)
        scores = score([r.losses for r in held.runs], peer_rollouts(peer, held))
        scores |= {k: peer[k] for k in ("fit_seconds", "epochs", "best_epoch", "early_stop")}
        peers[seed] = scores
        n_fit = len(train.runs) - 2
        rows.append((f"GPTfluence's Simfluence (seed {seed}, {n_fit} + 2 runs)", scores))
    ours = {}
    candidates = [(name, {}) for name in args.methods.split(",")]
    candidates += [("linear", {"loss_power": float(p)}) for p in args.loss_powers.split(",") if p]
    for name, options in candidates:
        label = name + "".join(f" {k}={v:g}" for k, v in options.items())
        simulator = configure_simulator(name, defaults={"unseen": "prior"}, **options)
        start = time.perf_counter()
        result = evaluate_simulator(simulator, train, held)
        ours[label] = result.scores
        rows.append((f"simfluence `{label}` ({len(train.runs)} runs)", result.scores))
        print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
    table = markdown(rows)
    print(f"\n{len(runs.test_ids)} test examples, held out: {', '.join(held.run_ids)}\n")
    print(table)
    if args.json:
        write_json_atomic(
            args.json,
            {
                "runs": str(args.runs),
                "tests": len(runs.test_ids),
                "train_runs": train.run_ids,
                "heldout_runs": held.run_ids,
                "gptfluence": {str(k): v for k, v in peers.items()},
                "simfluence": ours,
                "table": table,
                "command": " ".join(sys.argv),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                "date": dt.date.today().isoformat(),
            },
        )


if __name__ == "__main__":
    main()
