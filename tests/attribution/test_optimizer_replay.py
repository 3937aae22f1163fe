"""Exact replay and metagradients through stateful optimizers (AdamW, Adam, SGD with momentum),
learning-rate schedules and gradient clipping: the differentiable copies in
`simfluence.attribution.optimizers` against torch's own optimizers and against retraining."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from simfluence.attribution.optimizers import (  # noqa: E402
    clip_gradients,
    functional_optimizer,
)
from simfluence.attribution.replay import ReplayError, check_plain_sgd  # noqa: E402
from simfluence.attribution.unrolled import unrolled_metagradients  # noqa: E402
from simfluence.recording.loop import final_test_losses, train_on_curriculum  # noqa: E402
from simfluence.recording.optim import OptimizerSpec, optimizer_spec  # noqa: E402
from simfluence.recording.workloads.digits_mlp import DigitsMLPTask  # noqa: E402

LR = {"adamw": 0.01, "sgd": 0.1}  # by the name given to OptimizerSpec


@pytest.fixture(scope="module")
def setting():  # type: ignore[no-untyped-def]
    task = DigitsMLPTask(hidden=8)
    pool, tests = task.prepare(pool=24, tests=5, seed=3)
    rng = np.random.default_rng(0)
    curriculum = [list(rng.choice(pool.ids, 4, replace=False)) for _ in range(8)]
    return task, task.make_model(3), pool, tests, curriculum


def _description(task, model, name, weight_decay=None, **extra):  # type: ignore[no-untyped-def]
    spec = OptimizerSpec(name, weight_decay, **extra)
    return optimizer_spec(spec.make(task, copy.deepcopy(model), LR[name]))


def _record(setting, description, schedule=None):  # type: ignore[no-untyped-def]
    """Train once with checkpoints after every step: (run, {step: state_dict})."""
    task, model, pool, tests, curriculum = setting
    saved = {}

    def keep(step, m):  # type: ignore[no-untyped-def]
        saved[step] = {k: v.detach().clone() for k, v in m.state_dict().items()}

    lr = 0.1 if description["name"] == "SGD" else 0.01
    run = train_on_curriculum(
        task,
        model,
        pool,
        tests,
        curriculum,
        lr,
        seed=3,
        on_step=keep,
        optimizer=description,
        schedule=schedule,
    )
    return run, saved


def _metagradients(setting, description, run, saved, **kw):  # type: ignore[no-untyped-def]
    task, model, pool, tests, curriculum = setting
    return unrolled_metagradients(
        task,
        model,
        saved[0],
        pool,
        tests,
        curriculum,
        list(run.lr),
        recorded_final_loss=run.losses[-1],
        saved={t: saved[t] for t in (3, 8)},
        seed=3,
        optimizer=description,
        **kw,
    )


def _retrain(setting, description, weights, schedule=None):  # type: ignore[no-untyped-def]
    task, model, pool, tests, curriculum = setting
    lr = 0.1 if description["name"] == "SGD" else 0.01
    return final_test_losses(
        task,
        model,
        pool,
        tests,
        curriculum,
        lr,
        3,
        weights=weights,
        optimizer=description,
        schedule=schedule,
    )


def _assert_matches_finite_differences(setting, description, schedule, mg, slots) -> None:  # type: ignore[no-untyped-def]
    """Each metagradient of `slots` ``(step, slot)`` equals the central difference of
    retraining with that consumption's loss weight moved by +-1e-5 (batches of 4, 8 steps)."""
    ones = [[1.0] * 4 for _ in range(8)]
    eps = 1e-5
    for step, slot in slots:
        plus = [list(b) for b in ones]
        minus = [list(b) for b in ones]
        plus[step - 1][slot] += eps
        minus[step - 1][slot] -= eps
        numeric = (
            _retrain(setting, description, plus, schedule)
            - _retrain(setting, description, minus, schedule)
        ) / (2 * eps)
        np.testing.assert_allclose(
            mg.grads[:, 4 * (step - 1) + slot], numeric, rtol=1e-4, atol=1e-9
        )


@pytest.mark.parametrize(
    "name, extra",
    [("adamw", {}), ("adamw", {"weight_decay": 0.1, "schedule": "linear", "warmup": 2})],
)
def test_adamw_runs_replay_bit_for_bit_and_metagradients_match_retraining(
    setting, name, extra
) -> None:  # type: ignore[no-untyped-def]
    from simfluence.recording.optim import Schedule

    task, model, *_ = setting
    schedule_args = {k: extra.pop(k) for k in ("schedule", "warmup") if k in extra}
    description = _description(task, model, name, **extra)
    schedule = Schedule(schedule_args.get("schedule", "constant"), schedule_args.get("warmup", 0))
    run, saved = _record(setting, description, schedule)
    mg = _metagradients(setting, description, run, saved)
    assert mg.replay_error == 0.0  # every checked checkpoint and the final losses, bit for bit
    assert mg.info["optimizer"] == "AdamW"
    assert np.isfinite(mg.grads).all() and np.abs(mg.grads).max() > 0
    _assert_matches_finite_differences(setting, description, schedule, mg, [(1, 0), (4, 2), (8, 3)])


def test_segments_carry_the_adam_moments(setting) -> None:  # type: ignore[no-untyped-def]
    task, model, *_ = setting
    description = _description(task, model, "adamw", 0.05)
    run, saved = _record(setting, description)
    whole = _metagradients(setting, description, run, saved)
    for segment in (1, 3):
        parts = _metagradients(setting, description, run, saved, segment=segment, test_chunk=2)
        np.testing.assert_allclose(parts.grads, whole.grads, rtol=1e-9, atol=1e-13)
        assert parts.replay_error == 0.0


class MomentumDigits(DigitsMLPTask):
    def make_optimizer(self, model, lr):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01
        )


def test_sgd_with_momentum_is_replayed_and_dvemb_still_refuses_it() -> None:
    task = MomentumDigits(hidden=8)
    pool, tests = task.prepare(pool=24, tests=5, seed=3)
    rng = np.random.default_rng(1)
    curriculum = [list(rng.choice(pool.ids, 4, replace=False)) for _ in range(6)]
    model = task.make_model(3)
    setting = (task, model, pool, tests, curriculum)
    description = optimizer_spec(task.make_optimizer(copy.deepcopy(model), 0.1))
    run, saved = _record(setting, description)
    mg = unrolled_metagradients(
        task, model, saved[0], pool, tests, curriculum, list(run.lr),
        recorded_final_loss=run.losses[-1], saved={3: saved[3]}, seed=3,
    )  # fmt: skip
    assert mg.replay_error == 0.0 and mg.info["optimizer"] == "SGD"
    ones = [[1.0] * 4 for _ in range(6)]
    plus, minus = [list(b) for b in ones], [list(b) for b in ones]
    plus[1][1] += 1e-5
    minus[1][1] -= 1e-5
    numeric = (_retrain(setting, description, plus) - _retrain(setting, description, minus)) / 2e-5
    np.testing.assert_allclose(mg.grads[:, 5], numeric, rtol=1e-4, atol=1e-9)
    with pytest.raises(ReplayError, match="DVEmb assumes plain SGD"):
        check_plain_sgd(task, model, 0.1)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipping active / the norm below it
def test_clipping_and_adamw_steps_equal_torch_bit_for_bit(max_norm: float) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5, dtype=torch.float64), torch.nn.Linear(5, 2, dtype=torch.float64)
    )
    model[1].bias.requires_grad_(False)  # frozen: not replayed, not updated
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1
    )
    copy_of = functional_optimizer(opt, reference, max_grad_norm=max_norm)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = copy_of.initial_state(params)
    x = torch.randn(16, 6, dtype=torch.float64)
    for step in range(1, 6):
        opt.zero_grad()
        reference(x).pow(2).sum().backward()
        big = torch.nn.utils.clip_grad_norm_(
            [p for p in reference.parameters() if p.requires_grad], max_norm
        )
        opt.step()
        leaves = {n: p.requires_grad_(True) for n, p in params.items()}
        out = torch.func.functional_call(model, leaves, (x,)).pow(2).sum()
        grads = dict(zip(params, torch.autograd.grad(out, list(leaves.values())), strict=True))
        clipped = clip_gradients(grads, max_norm)
        assert (float(big) > max_norm) == (max_norm == 0.5)  # the clipping active or not
        with torch.no_grad():
            params, state = copy_of.step(params, grads, state, step, 0.05)
        for name, p in reference.named_parameters():
            if p.requires_grad:
                assert torch.equal(params[name], p.detach()), (step, name)
        assert all(torch.linalg.vector_norm(g) <= max_norm for g in clipped.values())
    assert "1.bias" not in params


def test_amsgrad_is_refused_by_name() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters(), amsgrad=True)
    with pytest.raises(Exception, match=r"amsgrad=True"):
        functional_optimizer(opt, model)


def test_a_recorded_adamw_run_with_clipping_is_attributed_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from simfluence.attribution.unrolled import run_metagradients
    from simfluence.recording.optim import OptimizerSpec
    from simfluence.recording.protocol import RecordingProtocol
    from simfluence.recording.record import record_runs
    from simfluence.runlog import load_runset

    spec = OptimizerSpec("adamw", schedule="linear", warmup=2, max_grad_norm=0.5)
    protocol = RecordingProtocol(
        runs=2, pool=20, per_run=8, tests=4, batch=4, epochs=2, lr=0.01, seed=0,
        checkpoints=[0, 2, 4], optimizer=spec,
    )  # fmt: skip
    record_runs(DigitsMLPTask(hidden=8), tmp_path / "runs", protocol, progress=False)
    runs = load_runset(tmp_path / "runs")
    config = runs.metadata["config"]
    assert config["max_grad_norm"] == 0.5 and config["optimizer"]["name"] == "AdamW"
    mg = run_metagradients(runs, "run-0001")
    assert mg.replay_error == 0.0 and mg.info["optimizer"] == "AdamW"
    # without clipping the same replay is another run, and the checks say so
    runs.metadata["config"] = {k: v for k, v in config.items() if k != "max_grad_norm"}
    with pytest.raises(ReplayError, match="away from the saved checkpoint"):
        run_metagradients(runs, "run-0001")


def _lora_setting():  # type: ignore[no-untyped-def]
    """The setting's task with PEFT LoRA adapters (rank 2) on both layers of its MLP: the
    adapters are the only trainable parameters (base layers frozen)."""
    peft = pytest.importorskip("peft")
    task = DigitsMLPTask(hidden=8)
    pool, tests = task.prepare(pool=24, tests=5, seed=3)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["hidden", "out"], init_lora_weights="gaussian"
    )
    torch.manual_seed(4)
    model = peft.get_peft_model(task.make_model(3), config)
    rng = np.random.default_rng(0)
    curriculum = [list(rng.choice(pool.ids, 4, replace=False)) for _ in range(8)]
    return task, model, pool, tests, curriculum


def test_lora_adapter_runs_replay_bit_for_bit_and_metagradients_match_retraining() -> None:
    """AdamW with warm-up and decay on LoRA adapters: the replay reproduces every checked
    checkpoint (adapters only; the frozen base layers are not parameters of the replay) and the
    final losses bit for bit, and the metagradients equal finite differences of retraining."""
    from simfluence.recording.optim import Schedule

    setting = _lora_setting()
    task, model, *_ = setting
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    description = _description(task, model, "adamw", weight_decay=0.01)
    schedule = Schedule("linear", 2)
    run, saved = _record(setting, description, schedule)
    assert set(trainable) < set(saved[3])  # the checkpoints hold the adapters (and the base)
    mg = _metagradients(setting, description, run, saved)
    assert mg.replay_error == 0.0 and mg.info["optimizer"] == "AdamW"
    assert np.isfinite(mg.grads).all() and np.abs(mg.grads).max() > 0
    _assert_matches_finite_differences(setting, description, schedule, mg, [(1, 0), (5, 3), (8, 1)])
