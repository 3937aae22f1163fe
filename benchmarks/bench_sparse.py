"""Benchmark: sparse scoring (issue 25). What does recording cost, and what does scoring less lose?

    python benchmarks/bench_sparse.py [--workload digits-mlp] [--runs 32] [--timing-runs 4]
        [--repeats 3] [--reference DIR] [--json benchmarks/results/sparse-digits-mlp.json]

1. Records the workload's default protocol with full scoring (every test example after every
   step): the reference run set.
2. Timing: trains `--timing-runs` of its curricula again, back to back, under four loops: no
   scoring at all (plain training, scored once at the end), full scoring, ``--score-every 10``
   and ``--score-fraction 0.1``; `--repeats` rounds, the variants interleaved inside each
   round; per-run medians. The CPU is shared with other work, so single timings are noisy:
   compare the medians of the same round structure.
3. Accuracy: the sparse run sets are the reference run set's training runs with exactly the
   masks the recorder's `Scoring` would produce (scoring never changes training, checked by
   recording one sparse run for real), and the held-out runs (the last round(5 * runs / 32),
   what ``--score-full-from`` keeps whole) scored in full in every variant, so every method's
   held-out all-steps MSE is on the same, fully scored, held-out runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from simfluence.metrics import all_steps_mse
from simfluence.protocol import default_holdout
from simfluence.recording import Scoring, record_runs, train_on_curriculum
from simfluence.recording.loop import final_test_losses, torch_threads
from simfluence.recording.optim import Schedule
from simfluence.recording.protocol import RecordingProtocol, steps_per_run
from simfluence.recording.record import _prepared_examples
from simfluence.recording.workloads import get_workload
from simfluence.runlog import Run, RunSet, load_runset
from simfluence.simulators.registry import make_simulator

VARIANTS: dict[str, Scoring | None] = {
    "full": None,
    **{f"every-{k}": Scoring(every=k) for k in (2, 5, 10, 20)},
    **{f"fraction-{f}": Scoring(fraction=f) for f in (0.5, 0.2, 0.1)},
}
#: score steps at gaps 1, 2, 3, 5, 8 (growing by about 1.6) up to every K, then every K: a denser
#: start where the losses move fastest. Accuracy only (masks; the recorder has no such
#: schedule): its time is estimated from the per-step costs (`time_vs_full_estimated`).
GEOMETRIC = {"geometric-10": 10}


def geometric_steps(n_steps: int, every: int) -> np.ndarray:
    """The steps a geometric schedule scores (besides 0 and the last)."""
    steps, step, gap = [], 0, 1
    while step < n_steps:
        step += min(gap, every)
        steps.append(min(step, n_steps))
        gap = max(gap + 1, round(gap * 1.6))
    return np.array(steps)


def masked(runs: RunSet, scoring: Scoring | int | None, full_from: int) -> RunSet:
    """The runs as a sparse recording would have them: runs before `full_from` masked (an
    int: the geometric schedule up to every that many steps)."""
    out = []
    for index, run in enumerate(runs.runs):
        observed = None
        if isinstance(scoring, int) and index < full_from:
            keep = np.zeros(run.n_steps + 1, dtype=bool)
            keep[[0, run.n_steps]] = True
            keep[geometric_steps(run.n_steps, scoring)] = True
            observed = np.repeat(keep[:, None], run.losses.shape[1], axis=1)
        elif isinstance(scoring, Scoring) and index < full_from:
            sched = replace(scoring, n_steps=run.n_steps, seed=run.seed or 0)
            observed = np.ones(run.losses.shape, dtype=bool)
            for step in range(run.n_steps + 1):
                cols = sched.columns(step, run.losses.shape[1])
                if cols is not None:
                    observed[step] = False
                    observed[step, cols] = True
        out.append(
            Run(run.run_id, run.curriculum, run.losses, run.seed, run.lr, run.metadata, observed)
        )
    return RunSet(runs.train_ids, runs.test_ids, out, runs.metadata, runs.source, runs.features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="digits-mlp")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--timing-runs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--methods",
        default="linear,additive,mean",
        help="simulators by name (featurized and hybrid need the reference's features: "
        "`simfluence features DIR` first)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="a fully scored recording of the workload's default protocol to use instead of "
        "recording one (its recording time is then not reported)",
    )
    args = parser.parse_args()
    task = get_workload(args.workload)
    protocol = RecordingProtocol(runs=args.runs, checkpoints=[]).resolve(task)
    workdir = Path(tempfile.mkdtemp(prefix="bench-sparse-"))
    start = time.perf_counter()
    if args.reference is None:
        runs = record_runs(task, workdir / "full", protocol, progress=False)
        record_seconds: float | None = round(time.perf_counter() - start, 1)
    else:
        runs = load_runset(args.reference)
        record_seconds = None
        if not runs.complete or runs.metadata["config"]["steps"] != steps_per_run(
            protocol.per_run, protocol.batch, protocol.epochs
        ):
            raise SystemExit(f"{args.reference}: not a fully scored default-protocol recording")
    config = runs.metadata["config"]
    n_held = default_holdout(len(runs.runs))
    full_from = len(runs.runs) - n_held

    # a sparse recording for real: the same losses where scored
    real = record_runs(
        task,
        workdir / "every-10",
        replace(protocol, runs=1, score_every=10),
        progress=False,
    ).runs[0]
    reference = runs.runs[0]
    same = bool(
        np.array_equal(real.losses[real.mask], reference.losses[real.mask])
        and np.array_equal(real.mask, masked(runs, VARIANTS["every-10"], 1).runs[0].mask)
    )

    # timing, per run, variants interleaved
    pool, tests = _prepared_examples(task, protocol)
    initial = task.make_model(protocol.seed)
    schedule = Schedule.from_config(config.get("schedule"))
    timings: dict[str, list[float]] = {name: [] for name in ["none", *VARIANTS]}
    with torch_threads(initial):
        for _ in range(args.repeats):
            for run in runs.runs[: args.timing_runs]:
                kwargs = dict(optimizer=config.get("optimizer"), schedule=schedule)
                t0 = time.perf_counter()
                final_test_losses(task, initial, pool, tests, run.curriculum, config["lr"],
                                  run.seed, **kwargs)  # fmt: skip
                timings["none"].append(time.perf_counter() - t0)
                for name, scoring in VARIANTS.items():
                    t0 = time.perf_counter()
                    train_on_curriculum(task, initial, pool, tests, run.curriculum, config["lr"],
                                        run.seed, scoring=scoring, **kwargs)  # fmt: skip
                    timings[name].append(time.perf_counter() - t0)
    per_run = {name: statistics.median(values) for name, values in timings.items()}

    # accuracy on the same fully scored held-out runs
    methods = args.methods.split(",")
    held_ids = sorted(runs.run_ids)[-n_held:]
    variants = {}
    steps = runs.runs[0].n_steps
    scoring_per_step = (per_run["full"] - per_run["none"]) / steps  # one full scoring
    for name, scoring in {**VARIANTS, **GEOMETRIC}.items():
        sparse = masked(runs, scoring, full_from)
        train, held = sparse.split(held_ids)
        assert held.complete
        scores = {}
        for method in methods:
            t0 = time.perf_counter()
            sim = make_simulator(method).fit(train)
            fit_seconds = time.perf_counter() - t0
            rounds = getattr(sim, "gap_rounds_", None)
            initial_losses = np.stack([r.initial_loss for r in held.runs])
            simulated = sim.simulate_many([r.curriculum for r in held.runs], initial_losses)
            mse = all_steps_mse([r.losses for r in held.runs], simulated).mean
            scores[method] = {"all_steps_mse": mse, "fit_seconds": round(fit_seconds, 2),
                              "imputation_rounds": rounds}  # fmt: skip
        best = min(scores, key=lambda m: scores[m]["all_steps_mse"])
        observed = sum(int(r.mask[1:].sum()) for r in train.runs)
        total = sum(r.mask[1:].size for r in train.runs)
        share = observed / total
        # plain training plus one full scoring per scored step's worth of losses (and the last)
        estimate = per_run["none"] + scoring_per_step * (share * steps - 1)
        measured, plain = per_run.get(name), per_run["none"]
        variants[name] = {
            "seconds_per_run": None if measured is None else round(measured, 4),
            "time_vs_full": None if measured is None else round(measured / per_run["full"], 3),
            "time_vs_full_estimated": round(estimate / per_run["full"], 3),
            "overhead_over_plain": None if measured is None else round(measured / plain, 2),
            "observed_share": round(share, 4),
            "methods": scores,
            "best": best,
            "best_mse": scores[best]["all_steps_mse"],
        }
    full_best = variants["full"]["best_mse"]
    for v in variants.values():
        v["best_mse_vs_full"] = round(v["best_mse"] / full_best, 3)
    overhead = per_run["full"] / per_run["none"]
    result = {
        "benchmark": "sparse",
        "workload": args.workload,
        "config": {k: config[k] for k in ("pool", "per_run", "tests", "batch", "epochs", "steps")},
        "runs": len(runs.runs),
        "heldout_runs": n_held,
        "timing_runs": args.timing_runs,
        "repeats": args.repeats,
        "reference_record_seconds": record_seconds,
        "sparse_recording_matches_masked_full": same,
        "plain_training_seconds_per_run": round(per_run["none"], 4),
        "overhead_full_scoring": round(overhead, 2),
        "scoring_share_of_full_recording": round(1 - per_run["none"] / per_run["full"], 3),
        "variants": variants,
        "note": "timings are medians over runs x repeats on a CPU shared with other jobs",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
