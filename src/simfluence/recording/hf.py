"""Record a run from a Hugging Face `transformers.Trainer`: a collator wrapper + a callback.

`Trainer` does not tell callbacks which examples a step consumed, so each training item carries
its id in a field (default ``"simfluence_id"``); `IdCollator` strips that field, remembers the
ids of every batch it collates in a FIFO queue, and calls the real collator. At every
``on_step_end`` the callback pops the oldest batch of ids (the data loader may collate a batch
ahead of the step that uses it, hence the queue), scores every test example and appends the
step. Step 0 is scored at ``on_train_begin``.

Example::

    collator = IdCollator(default_data_collator)          # items: {..., "simfluence_id": id}
    callback = SimfluenceCallback(collator, test_examples, loss_fn, pool=pool_ids,
                                  directory="runs/", run_id="run-0000")
    args = TrainingArguments(..., remove_unused_columns=False, gradient_accumulation_steps=1)
    trainer = Trainer(model, args, train_dataset=items, data_collator=collator,
                      callbacks=[callback])
    trainer.train()
    run = callback.run  # a simfluence.runlog.Run (written to runs/ as well)

Requirements (checked, with a clear error): ``gradient_accumulation_steps=1``,
``dataloader_num_workers=0`` (the queue lives in this process), ``remove_unused_columns=False``
(else Trainer drops the id field), and the collator passed to `Trainer` is the `IdCollator`
given to the callback. An evaluation dataset must not carry the id field (its batches would be
taken for training batches).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from simfluence.errors import SimfluenceError
from simfluence.recording.recorder import LossFn, Recorder, RecordingError
from simfluence.runlog import Run

DEFAULT_ID_FIELD = "simfluence_id"


class IdCollator:
    """Wraps a data collator: strips the id field of every item and queues each batch's ids.

    Args:
        collator: the real collator, ``list[dict] -> batch``.
        id_field: the key of the training id in every dataset item.
    """

    def __init__(
        self, collator: Callable[[list[Any]], Any], id_field: str = DEFAULT_ID_FIELD
    ) -> None:
        self.collator = collator
        self.id_field = id_field
        #: ids of collated batches not yet consumed by a step, oldest first
        self.queue: deque[list[str]] = deque()

    def __call__(self, features: list[Mapping[str, Any]]) -> Any:
        has_id = [isinstance(f, Mapping) and self.id_field in f for f in features]
        if any(has_id):
            if not all(has_id):
                raise SimfluenceError(
                    f"a batch mixes items with and without the {self.id_field!r} field"
                )
            self.queue.append([_scalar_str(f[self.id_field]) for f in features])
            features = [{k: v for k, v in f.items() if k != self.id_field} for f in features]
        return self.collator(features)


class SimfluenceCallback(TrainerCallback):
    """Records a `simfluence.runlog.Run` from `Trainer.train` (see the module docstring).

    Args:
        collator: the `IdCollator` that the `Trainer` uses.
        test_examples, loss_fn, test_ids, pool, directory, run_id, seed, metadata, chunk_size,
            device: as for `Recorder` (``loss_fn(model, chunk) -> Tensor (n,)``; by default
            the test tensors go to the device the `Trainer` put the model on). A PEFT model
            (LoRA adapters) is recorded like any other: ``loss_fn`` receives it.

    After training, `run` holds the recorded run (losses shape ``(T + 1, M)``), also written
    into `directory` when one was given. `recorder` gives the steps so far during training.
    """

    def __init__(
        self,
        collator: IdCollator,
        test_examples: Any,
        loss_fn: LossFn,
        *,
        test_ids: Sequence[Any] | None = None,
        pool: Sequence[Any] | None = None,
        directory: str | os.PathLike[str] | None = None,
        run_id: str = "run-0000",
        seed: int | None = None,
        metadata: dict[str, Any] | None = None,
        chunk_size: int = 256,
        device: str | None = None,
    ) -> None:
        if not isinstance(collator, IdCollator):
            raise SimfluenceError(
                "SimfluenceCallback needs the IdCollator that the Trainer uses as data_collator"
            )
        self.collator = collator
        self._recorder_kwargs: dict[str, Any] = {
            "test_ids": test_ids,
            "pool": pool,
            "directory": directory,
            "run_id": run_id,
            "seed": seed,
            "metadata": metadata,
            "chunk_size": chunk_size,
            "device": device,
        }
        self.test_examples = test_examples
        self.loss_fn = loss_fn
        self.recorder: Recorder | None = None
        self.run: Run | None = None
        self._lr: float | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if args.gradient_accumulation_steps != 1:
            raise SimfluenceError(
                f"SimfluenceCallback supports gradient_accumulation_steps=1 only, got "
                f"{args.gradient_accumulation_steps} (a step must consume exactly one batch)"
            )
        if args.dataloader_num_workers:
            raise SimfluenceError(
                "SimfluenceCallback needs dataloader_num_workers=0 (the collator records batch "
                f"ids in this process), got {args.dataloader_num_workers}"
            )
        if args.remove_unused_columns:
            raise SimfluenceError(
                "SimfluenceCallback needs TrainingArguments(remove_unused_columns=False): "
                f"otherwise Trainer drops the {self.collator.id_field!r} field of the items"
            )
        if state.global_step:
            raise SimfluenceError(
                "SimfluenceCallback cannot record a resumed training (global step "
                f"{state.global_step} at start); record from the start"
            )
        if model is None:
            raise SimfluenceError("the Trainer passed no model to the callback")
        self.collator.queue.clear()
        self.run = None
        self.recorder = Recorder(model, self.test_examples, self.loss_fn, **self._recorder_kwargs)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")
        self._lr = None if optimizer is None else float(optimizer.param_groups[0]["lr"])

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.recorder is None:
            raise SimfluenceError("SimfluenceCallback: on_step_end before on_train_begin")
        step = self.recorder.n_steps + 1
        if not self.collator.queue:
            raise RecordingError(
                f"step {step}: no batch ids were collated for this step; the training items "
                f"must carry the field {self.collator.id_field!r}, the Trainer must keep it "
                "(TrainingArguments(remove_unused_columns=False)) and use the IdCollator given "
                "to the callback as its data_collator"
            )
        ids = self.collator.queue.popleft()
        self.recorder.step(ids, lr=self._lr)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.recorder is not None and self.recorder.n_steps:
            self.run = self.recorder.finish()


def _scalar_str(value: Any) -> str:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    return str(value)
