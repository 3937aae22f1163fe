"""Static TDA methods (dattri's TRAK, LoGra, EK-FAC influence) against simfluence's methods on
the same retrains: one table per workload (docs/static-methods.md).

    PYTHONPATH=src python benchmarks/bench_static.py [--workloads digits-mlp,digits-logreg]

Per workload: records 16 runs (the task's protocol), then `validate` with every method on
``random``, ``leave-out``, ``reorder``, ``repeat`` (10 curricula each), ``subsets`` (20
random halves of the pool, 1 seed: dattri's LDS protocol) and the leave-one-out kinds (last
recorded run held out, 50 single removals (``--loo-examples``), 10 group removals).
``unrolled`` averages over 8 recorded runs (``--unrolled-runs``: fewer on large models, where
each run's reverse pass takes minutes), probing in each the examples it did not consume
(`simfluence.attribution.probes`); the static methods ensemble the final checkpoints of as
many runs (``--static-runs``, default 8). TracIn-CP's checkpoints: 4
evenly spaced steps of the task's protocol. ``--backend process:2`` retrains on two worker
processes (same results). Writes
``benchmarks/results/static-WORKLOAD.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CURRICULUM = ["random", "leave-out", "reorder", "repeat", "subsets"]
OURS = ["linear", "additive", "unrolled", "tracin-cp-scaled", "influence-scaled"]
STATIC = ["trak", "logra", "if-ekfac"]
#: final checkpoints per static method (TRAK-8): the library's default `max_runs`, the same
#: number of runs `unrolled` averages, so both sides see as many trained models
STATIC_RUNS = 8


def bench(
    workload: str,
    curricula: int,
    subsets: int,
    runs_n: int,
    backend: str | None = None,
    loo_examples: int = 50,
    unrolled_runs: int = 8,
    static_runs: int = STATIC_RUNS,
) -> dict:
    from simfluence.recording.protocol import RecordingProtocol, checkpoint_steps, steps_per_run
    from simfluence.recording.record import record_runs
    from simfluence.recording.validation import validate
    from simfluence.recording.workloads import get_workload
    from simfluence.simulators.registry import make_simulator

    task = get_workload(workload)
    d = task.defaults
    checkpoints = checkpoint_steps(steps_per_run(d.per_run, d.batch, d.epochs))

    def methods() -> dict:
        out = {}
        for name in OURS + STATIC:
            # examples no fitted run (or no unrolled run) consumed have no effect: "prior"
            opts = {"unseen": "prior"} if name in ("linear", "additive", "unrolled") else {}
            if name == "unrolled":
                opts["max_runs"] = unrolled_runs
            if name in STATIC:
                opts["max_runs"] = static_runs
            out[name] = make_simulator(name, **opts)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        runs = record_runs(
            task,
            Path(tmp) / "runs",
            RecordingProtocol(runs=runs_n, checkpoints=checkpoints),
            progress=False,
            backend=backend,
        )
        record_seconds = time.perf_counter() - started
        main = validate(
            task, runs, methods(), CURRICULUM, curricula, subsets=subsets, backend=backend
        )
        loo = {"kinds": {}}
        if loo_examples > 0:
            loo = validate(
                task, runs, methods(), ["loo", "loo-weight0"], 1, max_examples=loo_examples,
                groups=10, backend=backend,
            )  # fmt: skip
    retrain = main["timing"]["retrain"]
    per_training = retrain["seconds"] / retrain["trainings"]
    cost = {
        name: {
            **c,
            "training_runs": c["seconds"] / per_training,
        }
        for name, c in main["timing"]["fit"].items()
    }
    table = {}
    failed = {**main.get("failed", {}), **loo.get("failed", {})}
    for name in OURS + STATIC:
        if name in failed:  # reported beside the table, not scored
            continue
        scored = {k: main["kinds"][k]["methods"].get(name, {}) for k in CURRICULUM}
        row = {k: scored[k].get("lds") for k in CURRICULUM}  # None: no answer on that kind
        row["reorder_order_blind"] = bool(scored["reorder"].get("order_blind"))
        for k in ("loo", "loo-weight0"):
            if k not in loo["kinds"]:
                continue
            m = loo["kinds"][k]["methods"][name]
            row[f"{k}_spearman"] = m.get("loo_spearman")
            row[f"{k}_lds"] = m.get("lds")
        row |= {f"cost_{k}": v for k, v in cost[name].items()}
        table[name] = row
    return {
        "workload": workload,
        "recorded_runs": runs_n,
        "curricula_per_kind": curricula,
        "subsets": subsets,
        "subset_seeds": 1,
        "static_runs": static_runs,
        "seconds_per_training": per_training,
        "record_seconds": record_seconds,
        "checkpoints": checkpoints,
        "loo_examples": loo_examples,
        "unrolled_runs": unrolled_runs,
        "backend": backend or "serial",
        "methods": table,
        "failed": failed,
        "unanswered": main.get("unanswered", {}),
        "validate": {k: v for k, v in main.items() if k != "timing"},
        "loo": {k: v for k, v in loo.items() if k != "timing"},
    }


def format_table(result: dict) -> str:
    cols = [
        *CURRICULUM,
        "loo_spearman",
        "loo-weight0_spearman",
        "cost_seconds",
        "cost_training_runs",
        "cost_peak_rss_mb",
    ]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in result["methods"].items():
        cells = []
        for c in cols:
            v = row.get(c)
            text = "-" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
            if c == "reorder" and row["reorder_order_blind"]:
                text += " (blind)"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="digits-mlp,digits-logreg")
    p.add_argument("--curricula", type=int, default=10)
    p.add_argument("--subsets", type=int, default=20)
    p.add_argument("--runs", type=int, default=16)
    p.add_argument(
        "--backend", default=None, help="retrain on this backend (process:2, ray; default serial)"
    )
    p.add_argument(
        "--loo-examples", type=int, default=50, help="single removals (default 50; 0: no loo)"
    )
    p.add_argument("--static-runs", type=int, default=STATIC_RUNS, help="checkpoints per static")
    p.add_argument(
        "--unrolled-runs", type=int, default=8, help="runs unrolled averages (default 8)"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    for workload in args.workloads.split(","):
        result = bench(
            workload, args.curricula, args.subsets, args.runs, args.backend,
            args.loo_examples, args.unrolled_runs, args.static_runs,
        )  # fmt: skip
        path = Path(args.out) / f"static-{workload}.json"
        path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"## {workload}\n\n{format_table(result)}\n\nwrote {path}", flush=True)


if __name__ == "__main__":
    main()
