"""Benchmark: featurized simulators on a recorded run set (held-out runs, feature kinds, and
test examples no run recorded).

    python benchmarks/bench_featurized.py DIR [--holdout H] [--methods ...]
        [--kinds gradients,embedding,activations] [--new-tests 10] [--out FILE.json]

* **held-out runs** (the paper's protocol): every method fitted on the training runs, rolled
  out on the held-out runs; with the features stored in DIR (computed with the default kind
  when missing and DIR was recorded by `simfluence record`). The metrics are also split by
  each held-out run's share of consumptions that no training run consumed (on a run set
  recorded with `--reserve`, the held-out runs are the only ones to draw the reserved 20%).
* **feature kinds** (`--kinds`): `featurized` and `hybrid` with each kind of workload features,
  computed in memory (DIR's stored features are left alone).
* **new test examples** (`--new-tests N`): N test examples (seeded) are removed from the fitted
  run set; the simulators learn from the others, then `extend` adds the N from their features
  and each held-out run's recorded loss before training. Baseline: the *average test example*,
  ``L_t = L_0 * mean over the fitted test examples and training runs of L_t / L_0``. Also the
  coverage of their 90% intervals (which borrow the recorded test examples' median scale).

The held-out table has every method's 90% interval coverage and width (`evaluate`'s intervals);
``featurized-static`` and ``hybrid-static`` in `--methods` are the models without the drift.

Prints markdown tables and writes everything as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from simfluence import metrics
from simfluence._atomic import write_json_atomic
from simfluence.evaluation import evaluate, format_table, format_unseen_table
from simfluence.runlog import load_runset
from simfluence.runlog.features import ExampleFeatures
from simfluence.runlog.layout import TRUTH_FILE
from simfluence.runlog.runs import Run, RunSet, default_holdout
from simfluence.simulators import configure_simulator

#: suffix of a method name that asks for its static variant (``time_varying=False``)
STATIC = "-static"


def _configure(name: str, defaults: dict[str, object]):  # type: ignore[no-untyped-def]
    """``featurized-static`` / ``hybrid-static``: the method without the drift over training;
    `defaults` reach the methods that take them."""
    if name.endswith(STATIC):
        return configure_simulator(name[: -len(STATIC)], defaults=defaults, time_varying=False)
    return configure_simulator(name, defaults=defaults)


def held_out(runs: RunSet, methods: list[str], holdout: int) -> dict:  # type: ignore[type-arg]
    truth = str(Path(runs.source or ".") / TRUTH_FILE)  # the oracle of synthetic run sets
    simulators = {name: _configure(name, {"unseen": "prior", "path": truth}) for name in methods}
    result = evaluate(runs, simulators, holdout)  # with 90% intervals: coverage and width
    print(format_table(result))
    split = format_unseen_table(result)
    if split:
        print(split)
    payload = result.to_json()
    for name, method in result.methods.items():
        sim = method.simulator
        payload["methods"][name]["learned"] = {
            key: getattr(sim, key)
            for key in ("l2_", "feature_l2_", "n_components_", "test_map_loo_")
            if hasattr(sim, key)
        }
    return payload


def workload_kinds(runs: RunSet, kinds: list[str]) -> dict[str, ExampleFeatures]:
    from simfluence.recording.features import workload_features
    from simfluence.recording.tasks import prepare_for_runset, task_for_runset

    task = task_for_runset(runs)
    pool, tests = prepare_for_runset(task, runs)
    model = task.make_model(runs.metadata["config"]["seed"])
    return {kind: workload_features(task, pool, tests, model, kind, 2048) for kind in kinds}


def compare_kinds(runs: RunSet, kinds: list[str], holdout: int) -> dict:  # type: ignore[type-arg]
    out = {}
    for kind, features in workload_kinds(runs, kinds).items():
        runs.features = features
        simulators = {name: configure_simulator(name) for name in ("featurized", "hybrid")}
        result = evaluate(runs, simulators, holdout, intervals=False)
        out[kind] = {
            "extraction_seconds": features.metadata["seconds"],
            "dim": features.metadata["dim"],
            **{name: m.scores for name, m in result.methods.items()},
        }
        print(f"kind {kind} ({features.metadata['seconds']:.1f} s to extract)")
        print(format_table(result))
    return out


def _columns(runs: RunSet, columns: np.ndarray) -> RunSet:
    """The run set restricted to some test examples (losses and features)."""
    kept = [
        Run(r.run_id, r.curriculum, r.losses[:, columns], r.seed, r.lr, r.metadata)
        for r in runs.runs
    ]
    features = None
    if runs.features is not None:
        features = ExampleFeatures(runs.features.train, runs.features.test[columns])
    return RunSet(
        runs.train_ids, [runs.test_ids[j] for j in columns], kept, runs.metadata, None, features
    )


def new_tests(runs: RunSet, count: int, holdout: int, seed: int = 0) -> dict:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    new = np.sort(rng.choice(len(runs.test_ids), size=count, replace=False))
    old = np.setdiff1d(np.arange(len(runs.test_ids)), new)
    train, held = runs.split(holdout)
    fitted = _columns(train, old)
    true = [r.losses[:, new] for r in held.runs]
    initial = np.stack([r.losses[0] for r in held.runs])
    ratio = np.mean([r.losses / r.losses[0] for r in fitted.runs], axis=(0, 2))  # (T + 1,)
    out = {"new_test_ids": [runs.test_ids[j] for j in new], "methods": {}}
    predictions = {"average test example": [r.losses[0, new] * ratio[:, None] for r in held.runs]}
    coverage = {}
    for name in ("featurized", "hybrid"):
        start = time.perf_counter()
        sim = configure_simulator(name, unseen="prior").fit(fitted).calibrate(fitted)
        grown = sim.extend(
            test_ids=[runs.test_ids[j] for j in new],
            test_features=runs.features.test[new],
            test_initial_loss=initial[0, new],
        )
        # columns of `grown`: the fitted tests, then the new ones, in the order of `new`
        simulated = grown.simulate_many(
            [r.curriculum for r in held.runs], initial[:, np.concatenate([old, new])]
        )
        predictions[name] = [s[:, len(old) :] for s in simulated]
        out["methods"][name] = {"test_map_loo": grown.test_map_loo_}
        out["methods"][name]["fit_seconds"] = time.perf_counter() - start
        # their intervals borrow the recorded test examples' median scale (not calibrated)
        bands = [grown.interval_of(s) for s in simulated]
        coverage[name] = metrics.interval_coverage(
            true, [b.lower[:, len(old) :] for b in bands], [b.upper[:, len(old) :] for b in bands]
        )
        out["methods"][name]["coverage_90"] = coverage[name]
    lines = [
        "| method (new test examples) | all-steps MSE | final-step MSE | final Spearman | "
        "coverage 90% |"
    ]
    lines.append("|---|---|---|---|---|")
    for name, pred in predictions.items():
        scores = {
            "all_steps_mse": metrics.all_steps_mse(true, pred).mean,
            "final_step_mse": metrics.final_step_mse(true, pred).mean,
            "final_step_spearman": metrics.final_step_spearman(true, pred).mean,
        }
        out["methods"].setdefault(name, {}).update(scores)
        cover = f"{coverage[name]:.3f}" if name in coverage else "-"
        lines.append(
            f"| `{name}` | {scores['all_steps_mse']:.4g} | {scores['final_step_mse']:.4g} | "
            f"{scores['final_step_spearman']:.3f} | {cover} |"
        )
    print("\n".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--holdout", type=int, default=None, help="default: about 5 in 32")
    parser.add_argument(
        "--methods",
        default="linear,featurized,hybrid,mean",
        help="comma-separated; featurized-static, hybrid-static: without the drift over training",
    )
    parser.add_argument(
        "--kinds",
        default="",
        help="feature kinds to compare (run sets recorded by `simfluence record` only)",
    )
    parser.add_argument("--new-tests", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs = load_runset(args.directory)
    holdout = args.holdout or default_holdout(len(runs.runs))
    if runs.features is None:
        from simfluence.recording.features import write_features

        runs.features = write_features(args.directory)
    payload = {
        "directory": args.directory,
        "features": runs.features.metadata,
        "held_out": held_out(runs, args.methods.split(","), holdout),
    }
    if args.new_tests:
        payload["new_tests"] = new_tests(runs, args.new_tests, holdout)
    if args.kinds:
        payload["kinds"] = compare_kinds(runs, args.kinds.split(","), holdout)
    payload |= {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "command": "python " + " ".join(sys.argv),
    }
    if args.out:
        write_json_atomic(Path(args.out), json.loads(json.dumps(payload, default=float)))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
