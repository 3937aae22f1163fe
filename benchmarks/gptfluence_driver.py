"""Run GPTfluence's own Simfluence (``--sim_name original``) on exported run directories.

This script runs inside GPTfluence's environment (torch, transformers, tensorboardX, fire,
datasets, captum: see benchmarks/README.md), never simfluence's; `bench_gptfluence.py` calls it.
It uses the peer's code as published (github.com/ernie-research/gptfluence): its `train()` loop,
`SimfluenceDataset` reader, `Simulator` and `eval_simulator` rollout, with the hyperparameters of
its `run_original.sh` (Adam, lr 1e-3, weight decay 1e-5, 300 epochs, batch 128, linear warm-up of
200 steps, 2 validation runs drawn by its seeded shuffle, the checkpoint of least validation
all-steps MSE, early stop after 10 rises). Three things stop that code from running as published,
and each is bridged here without touching its arithmetic:

1. `train()` reads run directories from a dictionary hard-coded inside the function
   (``data_paths = data_paths_dict[task]``); that one line is replaced, in memory, by the list
   given here. Nothing else in train.py changes.
2. `train()` and `eval_simulator()` call every simulator with ``kwargs=...``, which
   `model.Simulator.forward` does not accept (TypeError); a subclass accepts and drops it.
3. `run_original.sh` omits `train()`'s required arguments (dataset_name, metric,
   test_example_start_id, test_example_end_id); they are passed here.

Output: JSON ``{"fit_seconds", "rollout_seconds", "epochs", "best_epoch", "early_stop",
"rollouts": {run_id: [[loss at step 0..T] per test id 0..M-1]}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
import types
from pathlib import Path

PATCHED_LINE = "data_paths = data_paths_dict[task]"


def load_peer_train(repo: Path, train_paths: list[str]) -> types.ModuleType:
    """The peer's train.py as a module, its hard-coded run list replaced by `train_paths`."""
    source = (repo / "train.py").read_text()
    if source.count(PATCHED_LINE) != 1:
        raise SystemExit(f"{repo / 'train.py'}: expected one line {PATCHED_LINE!r}")
    source = source.replace(PATCHED_LINE, "data_paths = list(SIMFLUENCE_TRAIN_PATHS)")
    module = types.ModuleType("gptfluence_train")
    module.__file__ = str(repo / "train.py")
    module.SIMFLUENCE_TRAIN_PATHS = train_paths
    exec(compile(source, str(repo / "train.py"), "exec"), module.__dict__)
    return module


def simulator_class() -> type:
    from model.Simulator import Simulator

    class KwargsSimulator(Simulator):
        """The peer's Simulator, accepting the ``kwargs=`` its own train/eval loops pass."""

        def forward(self, *args, kwargs=None, **named):
            return super().forward(*args, **named)

    return KwargsSimulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="GPTfluence checkout")
    parser.add_argument("--export", type=Path, required=True, help="export-gptfluence output")
    parser.add_argument("--train", required=True, help="comma-separated training run ids")
    parser.add_argument("--heldout", required=True, help="comma-separated held-out run ids")
    parser.add_argument("--n-train", type=int, required=True, help="pool size P")
    parser.add_argument("--n-test", type=int, required=True, help="test examples M")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--valid", type=int, default=2, help="validation runs (valid_num)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (outputs, logs)")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = parser.parse_args()

    repo, export, work = args.repo.resolve(), args.export.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    sys.path.insert(0, str(repo))
    os.chdir(work)  # tb-logs/ and output/ land here
    train_paths = [str(export / r) for r in args.train.split(",")]
    heldout = args.heldout.split(",")
    peer = load_peer_train(repo, train_paths)
    peer.SIMULATORS["original"] = simulator_class()

    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        peer.train(
            sim_name="original",
            dataset_name="",
            metric="loss",
            task="simfluence",
            test_example_start_id=0,
            test_example_end_id=args.n_test - 1,
            max_epoch=args.epochs,
            train_bs=128,
            train_example_nums=args.n_train,
            test_example_nums=args.n_test,
            seed=args.seed,
            hyper_parameter=0.0,
            lr=0.001,
            valid_epoch_interval=1,
            save_epoch_interval=1,
            output_dir=str(work / "output"),
            valid_num=args.valid,
            test_num=0,
            weight_decay=1e-5,
        )
    fit_seconds = time.perf_counter() - start
    text = log.getvalue()
    (work / f"train-seed-{args.seed}.log").write_text(text)
    best = [int(m) for m in re.findall(r"save best checkpoint at epoch: (\d+)", text)]
    epochs = len(re.findall(r"valid mse loss", text))

    import torch
    from dataset.simfluence_dataset import SimfluenceDataset
    from utils.eval import eval_simulator

    checkpoints = sorted((work / "output").rglob("best-checkpoint.pt"))
    checkpoint = max(checkpoints, key=lambda p: p.stat().st_mtime)
    model = peer.SIMULATORS["original"](
        train_example_nums=args.n_train, test_example_nums=args.n_test, hyper_parameter=0.0
    )
    model.load_state_dict(torch.load(checkpoint))
    dataset = SimfluenceDataset(
        [str(export / r) for r in heldout],
        is_train=False,
        test_example_nums=args.n_test,
        test_example_start_id=0,
        test_example_end_id=args.n_test - 1,
        metric="loss",
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = eval_simulator(dataset, model, torch.device("cpu"), set())
    rollout_seconds = time.perf_counter() - start
    predicted = result["pred_loss_dict"]  # test id -> one {"pred_loss", ...} per held-out run
    rollouts = {
        run_id: [predicted[j][k]["pred_loss"] for j in range(args.n_test)]
        for k, run_id in enumerate(heldout)
    }
    document = {
        "seed": args.seed,
        "fit_seconds": fit_seconds,
        "rollout_seconds": rollout_seconds,
        "epochs": epochs,
        "best_epoch": best[-1] if best else None,
        "early_stop": "early stop" in text,
        "torch_threads": torch.get_num_threads(),
        "rollouts": rollouts,
    }
    out.write_text(json.dumps(document) + "\n")


if __name__ == "__main__":
    main()
