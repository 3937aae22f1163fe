"""Benchmark: the effect of a random projection of the gradients on TracIn-CP scores.

    python benchmarks/bench_projection.py DIR [--dims 512,2048,8192] [--runs 2] [--seed 0]

DIR is a run set recorded with checkpoints (e.g. by bench_workloads.py). Prints, for each
projection dimension k, the seconds to compute the `tracin-cp` parameters ``B`` (M, P) and their
agreement with the exact (unprojected) ones: Pearson correlation over all entries, the mean
per-test-example Spearman correlation, and the relative error of the norm.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

from simfluence.runlog import load_runset
from simfluence.simulators import configure_simulator


def fit_b(runs, dim: int | None, max_runs: int, seed: int) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    sim = configure_simulator(
        "tracin-cp", max_runs=max_runs, projection_dim=dim, projection_seed=seed
    ).fit(runs)
    return sim.B_, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--dims", default="512,2048,8192")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = load_runset(args.directory)
    exact, seconds = fit_b(runs, None, args.runs, args.seed)
    print(f"exact: {seconds:.1f} s, B shape {exact.shape}")
    print("| k | seconds | Pearson (all entries) | mean Spearman per test | norm ratio |")
    print("|---|---|---|---|---|")
    for dim in (int(d) for d in args.dims.split(",")):
        approx, seconds = fit_b(runs, dim, args.runs, args.seed)
        pearson = float(np.corrcoef(exact.ravel(), approx.ravel())[0, 1])
        spearman = float(
            np.mean([stats.spearmanr(e, a).statistic for e, a in zip(exact, approx, strict=True)])
        )
        ratio = float(np.linalg.norm(approx) / np.linalg.norm(exact))
        print(f"| {dim} | {seconds:.1f} | {pearson:.4f} | {spearman:.4f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
