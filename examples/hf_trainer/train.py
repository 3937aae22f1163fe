"""Record training runs from a Hugging Face `Trainer`: simfluence's callback in your own loop.

Keep your `Trainer`; add two things: an `IdCollator` around your data collator (each training
item carries its id in the field ``"simfluence_id"``) and a `SimfluenceCallback` that scores the
test examples before training and after every optimizer step. Each call of `trainer.train()`
writes one run into the run-set directory; here every run trains the same initial model on its
own random subset of the pool, in the order the `Trainer` shuffles it (its ``seed``). The data:
scikit-learn's bundled wine set (178 x 13, 3 classes; nothing is downloaded), a small MLP.

    python examples/hf_trainer/train.py runs-hf --runs 16
    python examples/hf_trainer/train.py runs-hf-adamw --runs 16 --trainer-defaults  # AdamW
    simfluence evaluate runs-hf --methods linear,additive,mean --json eval.json
    simfluence report runs-hf --methods linear,additive,mean -o report.html

The learned simulators (`linear`, `additive`, `mean`) need only the recorded losses. The gradient
methods rebuild the model from a `Task` and its checkpoints, which `simfluence record` stores and
a hand-made loop does not: for them, write a `Task` (see ``examples/own_model/task.py``).
Rerunning the script resumes: runs already on disk are skipped.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from simfluence.recording import Examples, IdCollator, SimfluenceCallback
from simfluence.runlog.layout import run_path


class WineMLP(nn.Module):
    """``x (n, 13) -> logits (n, 3)``; `forward` returns the batch-mean loss as `Trainer` wants."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(13, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


def test_losses(model: nn.Module, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-example loss the callback records, shape ``(n,)``: the same cross-entropy."""
    return nn.functional.cross_entropy(model.net(chunk["x"]), chunk["y"], reduction="none")


def load_wine(pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
    from sklearn.datasets import load_wine as sklearn_wine

    data = sklearn_wine()
    x = torch.tensor((data.data - data.data.mean(0)) / data.data.std(0), dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    rows = np.random.default_rng(seed).permutation(len(x))
    every = Examples([f"wine-{r}" for r in range(len(x))], {"x": x, "y": y})
    return every.subset(rows[:pool].tolist()), every.subset(rows[len(x) - tests :].tolist())


def record_one(
    directory: Path, run: int, pool: Examples, tests: Examples, args: argparse.Namespace, work: str
) -> None:
    seed = int(np.random.SeedSequence([args.seed, run]).generate_state(1)[0] % 2**31)
    chosen = np.random.default_rng(seed).choice(len(pool), args.per_run, replace=False)
    items = [
        {"x": pool.tensors["x"][r], "labels": pool.tensors["y"][r], "simfluence_id": pool.ids[r]}
        for r in chosen
    ]
    torch.manual_seed(args.seed)  # every run starts from the same model
    model = WineMLP()
    collator = IdCollator(transformers.default_data_collator)
    run_id = f"run-{run:04d}"
    callback = SimfluenceCallback(
        collator, tests, test_losses, pool=pool.ids, directory=directory, run_id=run_id, seed=seed
    )
    # plain SGD at a constant rate, unclipped (what the gradient methods model), or, with
    # --trainer-defaults, Trainer's own recipe: AdamW, linear decay to 0, clipping at norm 1.0
    recipe: dict[str, object] = (
        {}
        if args.trainer_defaults
        else dict(optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)
    )
    training = transformers.TrainingArguments(
        output_dir=work,  # Trainer's own files: not in the run set
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        **recipe,  # type: ignore[arg-type]
        seed=seed,  # the order in which Trainer shuffles this run's examples
        # what the callback needs: one batch per step, ids kept, collated in this process
        gradient_accumulation_steps=1,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=training,
        train_dataset=items,
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its metrics line per run
    trainer.train()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="run-set directory to write (or resume)")
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--pool", type=int, default=120)
    p.add_argument("--per-run", type=int, default=64)
    p.add_argument("--tests", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="default 0.05 (SGD), 0.01 (AdamW)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trainer-defaults",
        action="store_true",
        help="train with Trainer's defaults (AdamW, linear decay, gradient clipping at 1.0) "
        "instead of plain SGD at a constant rate",
    )
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.01 if args.trainer_defaults else 0.05
    directory = Path(args.directory)
    pool, tests = load_wine(args.pool, args.tests, args.seed)
    with tempfile.TemporaryDirectory() as work:
        for run in range(args.runs):
            if not run_path(directory, f"run-{run:04d}").is_file():
                record_one(directory, run, pool, tests, args, work)
    print(f"{args.runs} runs in {directory}; next: simfluence evaluate {directory}")


if __name__ == "__main__":
    main()
