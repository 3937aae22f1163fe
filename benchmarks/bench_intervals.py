"""Benchmark: which predictive-interval construction is calibrated? (issue 9)

    python benchmarks/bench_intervals.py RUNSET [RUNSET ...] [--splits 4] [--level 0.9]
        [--bootstrap 20] [--json out.json]

For every run set, `--splits` disjoint held-out sets of about 5 in 32 runs (the evaluation's
split, rotated); per split, Simfluence-Linear is fitted on the other runs (l2 by cross-
validation) and every construction below builds `--level` intervals for the held-out runs'
free-running rollouts from their recorded step-0 loss. Reported per construction (mean over
splits): coverage of held-out (run, step >= 1, test example) points, mean width, mean interval
score (Winkler: width + (2 / (1 - level)) * distance outside; lower is better: it rewards
narrow intervals and punishes misses), the share of test examples whose own coverage is below
level - 0.15 (conditional calibration), and the seconds of the interval's learning next to the
point fit's.

Constructions (all use the same cross-fitted residuals of 5 run-wise folds, except bootstrap):

* ``scaled`` (the library's default): per-step conformal quantiles of residuals normalized by
  a scale per test example and step (the mean absolute residual over runs, smoothed over about
  9 steps), pooled over runs and test examples;
* ``per-example``: the same with one scale per test example (over all steps);
* ``step``: the same without the per-example scale (one additive band per step);
* ``log``: the same in log space, ``log(L + d) - log(L_sim + d)``, ``d`` = 1% of the mean loss
  before training (multiplicative bands);
* ``pointwise``: per step *and* test example, conformal quantiles over the runs alone;
* ``cv+``: CV+ (Barber et al. 2021) with signed residuals: per point, quantiles over runs ``i``
  of ``fold model k(i)'s rollout + residual_i``, so the bands widen where fold models disagree;
* ``bootstrap+noise``: `--bootstrap` refits on runs resampled with replacement (parameter
  uncertainty) times 10 rollouts each with Gaussian one-step process noise whose per-example
  variance is the teacher-forced residual variance on the training runs; quantiles of the
  samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from simfluence.runlog import load_runset
from simfluence.runlog.runs import RunSet, default_holdout
from simfluence.simulators import LinearSimulator
from simfluence.simulators.encoding import encode_runs
from simfluence.simulators.intervals import (
    bounds,
    conformal_quantile,
    residual_table,
    run_folds,
    scales,
    test_scales,
)


def _held_out_splits(runs: RunSet, splits: int) -> list[list[str]]:
    ids = sorted(runs.run_ids)
    size = default_holdout(len(ids))
    stride = len(ids) // size
    return [[ids[(k + j * stride) % len(ids)] for j in range(size)] for k in range(splits)]


def _rollouts(sim: LinearSimulator, runs: RunSet) -> list[np.ndarray]:
    return sim.simulate_many(
        [r.curriculum for r in runs.runs], np.stack([r.initial_loss for r in runs.runs])
    )


def _scores(true: list[np.ndarray], lower: list[np.ndarray], upper: list[np.ndarray], level):
    alpha = 1 - level
    inside, width, score, per_test = [], [], [], []
    for y, lo, hi in zip(true, lower, upper, strict=True):
        y, lo, hi = y[1:], lo[1:], hi[1:]
        hit = (y >= lo) & (y <= hi)
        inside.append(hit.ravel())
        per_test.append(hit.mean(axis=0))
        w = hi - lo
        width.append(w.ravel())
        miss = np.maximum(lo - y, 0) + np.maximum(y - hi, 0)
        score.append((w + 2 / alpha * miss).ravel())
    per_test_cov = np.mean(per_test, axis=0)
    return {
        "coverage": float(np.mean(np.concatenate(inside))),
        "width": float(np.mean(np.concatenate(width))),
        "interval_score": float(np.mean(np.concatenate(score))),
        "tests_undercovered": float(np.mean(per_test_cov < level - 0.15)),
    }


def _one_step_noise(sim: LinearSimulator, runs: RunSet) -> np.ndarray:
    """Per test example, the std of teacher-forced one-step residuals on `runs`."""
    counts = encode_runs(runs, sim.batch_size_, sim.batch_weighting)
    res = []
    for c, run in zip(counts, runs.runs, strict=True):
        alpha = np.asarray(c @ sim.A_.T)
        beta = np.asarray(c @ sim.B_.T)
        res.append(run.losses[1:] - (alpha * run.losses[:-1] + beta))
    return np.concatenate(res).std(axis=0)


def _noisy_rollout(sim, counts, initial, noise, rng, draws):
    alpha = np.asarray(counts @ sim.A_.T)
    beta = np.asarray(counts @ sim.B_.T)
    out = np.empty((draws, alpha.shape[0] + 1, alpha.shape[1]))
    out[:, 0] = initial
    floor = np.asarray(sim.floor_)
    for t in range(alpha.shape[0]):
        step = alpha[t] * out[:, t] + beta[t] + noise * rng.standard_normal(out[:, t].shape)
        out[:, t + 1] = np.maximum(step, floor)
    return out


def evaluate_split(runs: RunSet, held_ids: list[str], level: float, n_boot: int) -> dict:
    train, held = runs.split(held_ids)
    true = [r.losses for r in held.runs]
    start = time.perf_counter()
    sim = LinearSimulator(unseen="prior").fit(train)
    fit_s = time.perf_counter() - start
    pred = _rollouts(sim, held)
    start = time.perf_counter()
    folds = run_folds(train, 5)
    fold_models, cal_true, cal_pred, owner = [], [], [], []
    for k, (tr, va) in enumerate(folds):
        m = LinearSimulator(l2=sim.l2_, unseen="prior").fit(tr)
        fold_models.append(m)
        cal_pred += _rollouts(m, va)
        cal_true += [r.losses for r in va.runs]
        owner += [k] * len(va.runs)
    residuals = residual_table(cal_true, cal_pred)
    cal_s = time.perf_counter() - start
    out: dict[str, dict] = {}
    floor = np.asarray(sim.floor_)

    def record(name, lower, upper, seconds):
        out[name] = _scores(true, lower, upper, level) | {"seconds": seconds, "fit_seconds": fit_s}

    scale = test_scales(residuals)
    t0 = time.perf_counter()
    lo_hi = [bounds(p, residuals, scales(residuals), level, floor) for p in pred]
    record("scaled", [a for a, _ in lo_hi], [b for _, b in lo_hi], cal_s + time.perf_counter() - t0)
    lo_hi = [bounds(p, residuals, scale, level, floor) for p in pred]
    record("per-example", [a for a, _ in lo_hi], [b for _, b in lo_hi], cal_s)
    ones = np.ones_like(scale)
    lo_hi = [bounds(p, residuals, ones, level, floor) for p in pred]
    record("step", [a for a, _ in lo_hi], [b for _, b in lo_hi], cal_s)
    d = 0.01 * float(np.mean([r.initial_loss.mean() for r in train.runs]))
    log_res = residual_table(
        [np.log(np.maximum(t, 0) + d) for t in cal_true],
        [np.log(np.maximum(p, 0) + d) for p in cal_pred],
    )
    lo_hi = [bounds(np.log(np.maximum(p, 0) + d), log_res, ones, level, -np.inf) for p in pred]
    record(
        "log",
        [np.maximum(np.exp(a) - d, floor) for a, _ in lo_hi],
        [np.exp(b) - d for _, b in lo_hi],
        cal_s,
    )
    alpha = (1 - level) / 2
    rows = [np.minimum(np.arange(p.shape[0]), residuals.shape[1] - 1) for p in pred]
    lower = [
        np.maximum(p + conformal_quantile(residuals[:, r], alpha, 0), floor)
        for p, r in zip(pred, rows, strict=True)
    ]
    upper = [
        p + conformal_quantile(residuals[:, r], 1 - alpha, 0)
        for p, r in zip(pred, rows, strict=True)
    ]
    record("pointwise", lower, upper, cal_s)
    # CV+: per held-out curriculum, fold models' rollouts + the residuals of their own runs
    fold_pred = [_rollouts(m, held) for m in fold_models]
    lower, upper = [], []
    for h, p in enumerate(pred):
        r = rows[h]
        values = np.stack([fold_pred[owner[i]][h] + residuals[i, r] for i in range(len(owner))])
        values[:, 0] = p[0]
        lower.append(np.maximum(conformal_quantile(values, alpha, 0), floor))
        upper.append(conformal_quantile(values, 1 - alpha, 0))
    record("cv+", lower, upper, cal_s)
    if n_boot:
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        ids = train.run_ids
        noise = _one_step_noise(sim, train)
        samples = [[] for _ in pred]
        for _ in range(n_boot):
            pick = rng.choice(len(ids), len(ids), replace=True)
            boot = RunSet(
                train.train_ids,
                train.test_ids,
                [train.runs[i] for i in pick],
                train.metadata,
            )
            m = LinearSimulator(l2=sim.l2_, unseen="prior").fit(boot)
            counts = m.encode([r.curriculum for r in held.runs])
            for h, (c, run) in enumerate(zip(counts, held.runs, strict=True)):
                samples[h].append(_noisy_rollout(m, c, run.initial_loss, noise, rng, 10))
        stacked = [np.concatenate(s) for s in samples]
        lower = [np.quantile(s, alpha, axis=0) for s in stacked]
        upper = [np.quantile(s, 1 - alpha, axis=0) for s in stacked]
        record("bootstrap+noise", lower, upper, time.perf_counter() - start)
    out["_point"] = {"l2": sim.l2_, "fit_seconds": fit_s}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runsets", nargs="+")
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--bootstrap", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {"command": " ".join(sys.argv), "level": args.level, "runsets": {}}
    for path in args.runsets:
        runs = load_runset(path)
        name = Path(path).name
        per_split = [
            evaluate_split(runs, held, args.level, args.bootstrap)
            for held in _held_out_splits(runs, args.splits)
        ]
        methods = [k for k in per_split[0] if not k.startswith("_")]
        summary = {
            m: {key: float(np.mean([s[m][key] for s in per_split])) for key in per_split[0][m]}
            for m in methods
        }
        for m in methods:
            summary[m]["coverage_min_split"] = float(min(s[m]["coverage"] for s in per_split))
            summary[m]["coverage_max_split"] = float(max(s[m]["coverage"] for s in per_split))
        report["runsets"][name] = summary
        print(f"\n{name} ({len(runs.runs)} runs, {args.splits} held-out splits)")
        print(
            f"  {'construction':<16} {'coverage':>9} {'(min-max)':>13} {'width':>8} "
            f"{'int.score':>9} {'tests<cov-.15':>13} {'interval s':>10} {'fit s':>6}"
        )
        for m in methods:
            s = summary[m]
            print(
                f"  {m:<16} {s['coverage']:>9.3f} {s['coverage_min_split']:>6.3f}-"
                f"{s['coverage_max_split']:.3f} {s['width']:>8.4f} {s['interval_score']:>9.4f} "
                f"{s['tests_undercovered']:>13.2f} {s['seconds']:>10.2f} {s['fit_seconds']:>6.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
