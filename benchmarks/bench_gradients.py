"""Time the gradient-based score computations on a synthetic MLP (not a test).

Usage::

    PYTHONPATH=src python benchmarks/bench_gradients.py --input 64 --hidden 256 --pool 200 \\
        --tests 50 --checkpoints 3 --proj-k 1024 --threads 1

Prints seconds for: per-example gradients of the pool, TracIn-CP (unprojected and projected),
and influence functions (MINRES on the exact Hessian; the dense solve too when D is small).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from simfluence.attribution import (
    DENSE_MAX_DIM,
    RandomProjection,
    influence_scores,
    per_example_gradients,
    tracin_cp_scores,
)
from simfluence.recording.task import Examples, Task


class SyntheticMLPTask(Task):
    """Random Gaussian inputs, random labels, a one-hidden-layer tanh MLP."""

    name = "synthetic-mlp"

    def __init__(self, n_in: int, hidden: int, classes: int) -> None:
        self.n_in, self.hidden, self.classes = n_in, hidden, classes

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        gen = torch.Generator().manual_seed(seed)
        n = pool + tests
        x = torch.randn(n, self.n_in, generator=gen)
        y = torch.randint(0, self.classes, (n,), generator=gen)
        ids = [str(i) for i in range(n)]
        return (
            Examples(ids[:pool], {"x": x[:pool], "y": y[:pool]}),
            Examples(ids[pool:], {"x": x[pool:], "y": y[pool:]}),
        )

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(self.n_in, self.hidden), nn.Tanh(), nn.Linear(self.hidden, self.classes)
        )

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs["x"]), inputs["y"], reduction="none")


def _timed(label: str, fn) -> object:
    start = time.perf_counter()
    out = fn()
    print(f"{label:<44s} {time.perf_counter() - start:8.3f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--pool", type=int, default=200)
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--proj-k", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--no-influence", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    task = SyntheticMLPTask(args.input, args.hidden, args.classes)
    pool, tests = task.prepare(args.pool, args.tests, seed=0)
    model = task.make_model(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = []
    for _ in range(args.checkpoints):
        checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        for _ in range(10):
            rows = torch.randint(0, len(pool), (args.batch,))
            opt.zero_grad()
            task.example_losses(model, pool.take(rows)).mean().backward()
            opt.step()
    dim = sum(p.numel() for p in model.parameters())
    print(
        f"D={dim} pool={args.pool} tests={args.tests} checkpoints={args.checkpoints} "
        f"threads={args.threads} torch={torch.__version__}"
    )
    lrs = [0.1] * args.checkpoints
    _timed(
        "per-example gradients (pool, 1 checkpoint)",
        lambda: per_example_gradients(task, model, checkpoints[-1], pool, chunk_size=args.chunk),
    )
    _timed(
        f"tracin-cp ({args.checkpoints} checkpoints)",
        lambda: tracin_cp_scores(
            task, model, checkpoints, lrs, pool, tests, args.batch, chunk_size=args.chunk
        ),
    )
    proj = RandomProjection(args.proj_k, seed=0)
    _timed(
        f"tracin-cp projected k={args.proj_k} (first, fills cache)",
        lambda: tracin_cp_scores(
            task, model, checkpoints, lrs, pool, tests, args.batch, proj, chunk_size=args.chunk
        ),
    )
    _timed(
        f"tracin-cp projected k={args.proj_k} (cached)",
        lambda: tracin_cp_scores(
            task, model, checkpoints, lrs, pool, tests, args.batch, proj, chunk_size=args.chunk
        ),
    )
    if args.no_influence:
        return
    _timed(
        f"influence minres (max_iter={args.max_iter})",
        lambda: influence_scores(
            task,
            model,
            checkpoints[-1],
            0.1,
            pool,
            tests,
            args.batch,
            damping=args.damping,
            method="minres",
            max_iter=args.max_iter,
            tol=1e-6,
        ),
    )
    _timed(
        "influence fisher cg",
        lambda: influence_scores(
            task,
            model,
            checkpoints[-1],
            0.1,
            pool,
            tests,
            args.batch,
            damping=args.damping,
            curvature="fisher",
            method="cg",
            max_iter=args.max_iter,
            tol=1e-6,
        ),
    )
    if dim <= DENSE_MAX_DIM:
        _timed(
            "influence dense",
            lambda: influence_scores(
                task,
                model,
                checkpoints[-1],
                0.1,
                pool,
                tests,
                args.batch,
                damping=args.damping,
                method="dense",
            ),
        )


if __name__ == "__main__":
    main()
