"""Issue 23 (AdamW first-class), items 2-4: the fused Adam step's backward, the smoothness
check, Adam-preconditioned TracIn, the CLI on AdamW runs, and a LoRA-adapter (PEFT) replay."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from simfluence.attribution import optimizers as fopt  # noqa: E402
from simfluence.attribution.smoothness import (  # noqa: E402
    NONLINEAR_THRESHOLD,
    measure_smoothness,
    random_directions,
    smoothness_from_retrains,
    smoothness_line,
    smoothness_weights,
)
from simfluence.recording.workloads.digits_mlp import DigitsMLPTask  # noqa: E402


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` with derivative 0 (not inf) where ``x == 0``: the fused step's rule."""
    positive = x > 0
    root = torch.where(positive, x, torch.ones_like(x)).sqrt()
    return torch.where(positive, root, torch.zeros_like(x))


def _chain(p, g, m, v, step, lr, rule):  # type: ignore[no-untyped-def]
    """torch's single-tensor Adam as plain autograd operations (the reference)."""
    b1, b2 = rule.betas
    if rule.weight_decay:
        if rule.decoupled:
            p = p.mul(1 - lr * rule.weight_decay)
        else:
            g = g.add(p, alpha=rule.weight_decay)
    m = m.lerp(g, 1 - b1)
    v = v.mul(b2).addcmul(g, g, value=1 - b2)
    denom = (_safe_sqrt(v) / (1 - b2**step) ** 0.5).add(rule.eps)
    return p.addcdiv(m, denom, value=-lr / (1 - b1**step)), m, v


@pytest.mark.parametrize("wd, decoupled", [(0.0, False), (0.1, True), (0.05, False)])
def test_fused_adam_step_equals_the_operation_chain_values_and_gradients(wd, decoupled) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (3, 4)
    leaves = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4)]
    leaves[3] = leaves[3].abs()
    leaves[3][0, 0] = 0.0  # a moment that is exactly 0 ...
    leaves[1][0, 0] = 0.0  # ... and stays 0: derivative 0, not inf
    rule = fopt.GroupRule("adam", weight_decay=wd, decoupled=decoupled, betas=(0.9, 0.99), eps=1e-6)
    cotangents = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    results = []
    for fn in (lambda *a: _chain(*a), lambda p, g, m, v, s, lr, r: _fused(p, g, m, v, s, lr, r)):
        xs = [x.clone().requires_grad_(True) for x in leaves]
        out = fn(*xs, 3, 0.05, rule)
        grads = torch.autograd.grad(out, xs, cotangents)
        results.append(([o.detach() for o in out], grads))
    (vals_a, grads_a), (vals_b, grads_b) = results
    for a, b in zip(vals_a, vals_b, strict=True):
        assert torch.equal(a, b)  # the forward is bit for bit torch's
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert torch.isfinite(b).all()


def _fused(p, g, m, v, step, lr, rule):  # type: ignore[no-untyped-def]
    new_p, (m2, v2) = fopt._adam(p, g, (m, v), step, lr, rule)
    return new_p, m2, v2


class AdamL2Digits(DigitsMLPTask):
    def make_optimizer(self, model, lr):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.05)


def test_adam_with_l2_metagradients_match_retraining() -> None:
    from simfluence.attribution.unrolled import unrolled_metagradients
    from simfluence.recording.loop import final_test_losses, train_on_curriculum
    from simfluence.recording.optim import optimizer_spec

    task = AdamL2Digits(hidden=6)
    pool, tests = task.prepare(pool=20, tests=4, seed=1)
    rng = np.random.default_rng(2)
    curriculum = [list(rng.choice(pool.ids, 4, replace=False)) for _ in range(6)]
    model = task.make_model(1)
    description = optimizer_spec(task.make_optimizer(copy.deepcopy(model), 0.02))
    assert description["name"] == "Adam"
    run = train_on_curriculum(task, model, pool, tests, curriculum, 0.02, 1, optimizer=description)
    mg = unrolled_metagradients(
        task, model, model.state_dict(), pool, tests, curriculum, list(run.lr),
        recorded_final_loss=run.losses[-1], seed=1, optimizer=description,
    )  # fmt: skip
    assert mg.replay_error == 0.0

    def retrain(weights):  # type: ignore[no-untyped-def]
        return final_test_losses(
            task, model, pool, tests, curriculum, 0.02, 1, weights=weights, optimizer=description
        )

    for step, slot in [(1, 1), (5, 3)]:
        plus = [[1.0] * 4 for _ in range(6)]
        minus = [[1.0] * 4 for _ in range(6)]
        plus[step - 1][slot] += 1e-5
        minus[step - 1][slot] -= 1e-5
        numeric = (retrain(plus) - retrain(minus)) / 2e-5
        np.testing.assert_allclose(
            mg.grads[:, 4 * (step - 1) + slot], numeric, rtol=1e-4, atol=1e-9
        )


# -- smoothness -------------------------------------------------------------------------------
def test_smoothness_ratios_are_zero_for_a_linear_loss_and_known_for_a_quadratic() -> None:
    gen = np.random.default_rng(0)
    a = gen.normal(size=(5, 30))  # (M, C)
    base = gen.normal(size=5)
    dirs = random_directions(30, 4, seed=1)
    assert dirs.shape == (4, 30) and set(np.unique(dirs)) == {-1.0, 0.0}
    assert (dirs == -1).sum(axis=1).tolist() == [3] * 4  # 10% of the consumptions
    linear = measure_smoothness(lambda w: base + a @ (w - 1), base, dirs, metagradients=a)
    np.testing.assert_allclose(linear.nonlinearity, 0.0, atol=1e-12)
    np.testing.assert_allclose(linear.first_order_error, 0.0, atol=1e-12)
    assert linear.close_to_linear and "NOT" not in linear.summary()
    # Delta(s) = s a.d + s^2 q (one test): nonlinearity |q| / 2 / |a.d + q|
    row = a[:1]
    d0 = dirs[0]
    q = 4.0 * float(a[0] @ d0)
    quad = measure_smoothness(
        lambda w: base[:1] + row @ (w - 1) + q * ((w - 1) @ d0 / (d0 @ d0)) ** 2,
        base[:1], dirs[:1], metagradients=row,
    )  # fmt: skip
    assert quad.nonlinearity[0] == pytest.approx(abs(q) / 2 / abs(float(a[0] @ d0) + q))
    assert quad.first_order_error[0] == pytest.approx(abs(q) / abs(float(a[0] @ d0) + q))
    assert not quad.close_to_linear and quad.mean_nonlinearity > NONLINEAR_THRESHOLD
    assert "NOT close to linear" in quad.summary()
    assert smoothness_line(quad.to_json()) == quad.summary()


def test_smoothness_from_retrains_done_elsewhere_is_the_same_measurement() -> None:
    gen = np.random.default_rng(3)
    a, base = gen.normal(size=(4, 20)), gen.normal(size=4)
    dirs = random_directions(20, 3, seed=2)

    def retrain(w: np.ndarray) -> np.ndarray:
        return base + a @ (w - 1) + 0.3 * ((w - 1) ** 2).sum()

    points = smoothness_weights(dirs)
    assert points.shape == (6, 20) and np.array_equal(points[1], 1.0 + dirs[0])
    losses = np.stack([retrain(w) for w in points], axis=1)  # (M, 2 D), as a backend returns
    direct = measure_smoothness(retrain, base, dirs, metagradients=a)
    assert smoothness_from_retrains(losses, base, dirs, a) == direct


# -- recorded AdamW runs: preconditioned TracIn, CLI -------------------------------------------
@pytest.fixture(scope="module")
def adamw_runs(tmp_path_factory):  # type: ignore[no-untyped-def]
    from simfluence.recording.optim import OptimizerSpec
    from simfluence.recording.protocol import RecordingProtocol
    from simfluence.recording.record import record_runs

    path = tmp_path_factory.mktemp("adamw") / "runs"
    spec = OptimizerSpec("adamw", schedule="linear", warmup=2)
    protocol = RecordingProtocol(
        runs=3, pool=20, per_run=8, tests=4, batch=4, epochs=2, lr=0.01, seed=0,
        checkpoints=[0, 2, 4], optimizer=spec,
    )  # fmt: skip
    record_runs(DigitsMLPTask(hidden=8), path, protocol, progress=False)
    return path


def test_tracin_uses_the_replayed_adam_second_moment(adamw_runs) -> None:  # type: ignore[no-untyped-def]
    from simfluence.attribution.replay import load_recorded_run
    from simfluence.attribution.simulators import TracInCPSimulator
    from simfluence.recording.loop import train_on_curriculum
    from simfluence.recording.optim import Schedule
    from simfluence.runlog import load_runset

    runs = load_runset(adamw_runs)
    config = runs.metadata["config"]
    run = runs.runs[0]
    sim = TracInCPSimulator()
    rec = load_recorded_run(runs, run.run_id)
    pre = sim._adam_preconditioners(runs, run, [0, 2, 4], rec.task)
    assert pre is not None and sim.preconditioned_ and sim.warnings_ == []
    # torch's own AdamW state after the step taken from each checkpoint
    states = {}

    class Spy(DigitsMLPTask):
        pass

    opt_box = {}
    real = torch.optim.AdamW.step

    def spy(self, *a, **k):  # type: ignore[no-untyped-def]
        out = real(self, *a, **k)
        opt_box["opt"] = self
        step = len(states) + 1
        states[step] = [
            (self.state[p]["exp_avg_sq"].clone(), g["eps"], g["betas"][1])
            for g in self.param_groups for p in g["params"]
        ]  # fmt: skip
        return out

    torch.optim.AdamW.step = spy
    try:
        train_on_curriculum(
            rec.task, rec.task.make_model(config["seed"]), rec.pool, rec.tests, run.curriculum,
            config["lr"], run.seed, optimizer=config["optimizer"],
            schedule=Schedule.from_config(config.get("schedule")),
        )  # fmt: skip
    finally:
        torch.optim.AdamW.step = real
    for k, t in [(0, 1), (2, 3), (4, 4)]:
        expected = torch.cat(
            [(1 / ((v.sqrt() / (1 - b2**t) ** 0.5) + eps)).reshape(-1) for v, eps, b2 in states[t]]
        )
        torch.testing.assert_close(pre[k], expected, rtol=1e-12, atol=0)
    fitted = TracInCPSimulator().fit(runs)
    assert fitted.preconditioned_ and np.isfinite(fitted.B_).all()
    assert fitted.warnings_ == []


def test_cli_validate_loo_and_attribute_unrolled_on_adamw(adamw_runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from simfluence.cli.main import main
    from simfluence.runlog import load_runset

    out = tmp_path / "val.json"
    code = main([
        "validate", str(adamw_runs), "--kinds", "loo,loo-weight0", "--curricula", "1",
        "--methods", "unrolled,tracin-cp", "--max-examples", "3", "--groups", "2",
        "--smoothness-directions", "1", "--json", str(out),
    ])  # fmt: skip
    assert code in (0, None)
    result = json.loads(out.read_text())
    for kind in ("loo", "loo-weight0"):
        block = result["kinds"][kind]
        for method in ("unrolled", "tracin-cp"):
            scores = block["methods"][method]
            assert "error" not in scores and np.isfinite(scores["loo_spearman"])
        (smooth,) = block["smoothness"].values()
        assert len(smooth["nonlinearity"]) == 1 and np.isfinite(smooth["nonlinearity"][0])
        assert np.isfinite(smooth["first_order_error"][0]) and smooth["tests"] == 4
    test_id = load_runset(adamw_runs).test_ids[0]
    attr = tmp_path / "attr.json"
    code = main([
        "attribute", "--runs", str(adamw_runs), "--run", "run-0002", "--test", test_id,
        "--method", "unrolled", "--smoothness-directions", "2", "--json", str(attr),
    ])  # fmt: skip
    assert code in (0, None)
    views = json.loads(attr.read_text())
    assert all(np.isfinite(e["effect"]) for e in views["leave_one_out"]["effects"])
    assert len(views["smoothness"]["nonlinearity"]) == 2 and views["smoothness"]["tests"] == 1
    assert all(np.isfinite(views["smoothness"]["first_order_error"]))


@pytest.fixture(scope="module")
def tiny_adamw_runs(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One AdamW run of two steps over 4 of 6 examples, checkpoints 0 and 1 (milliseconds
    once torch is warm)."""
    from simfluence.recording.optim import OptimizerSpec
    from simfluence.recording.protocol import RecordingProtocol
    from simfluence.recording.record import record_runs

    path = tmp_path_factory.mktemp("tiny-adamw") / "runs"
    protocol = RecordingProtocol(
        runs=1, pool=6, per_run=4, tests=2, batch=2, epochs=1, lr=0.01, seed=0,
        checkpoints=[0, 1], optimizer=OptimizerSpec("adamw", schedule="linear", warmup=2),
    )  # fmt: skip
    record_runs(DigitsMLPTask(hidden=4), path, protocol, progress=False)
    return path


def test_the_adam_preconditioner_changes_tracin_on_adam_and_adamw_runs(tiny_adamw_runs) -> None:  # type: ignore[no-untyped-def]
    """On AdamW runs TracIn-CP is preconditioned (and says so): its effects differ from the
    plain formula's on the same checkpoints, computed in the same process (no kernel cached
    for one is reused for the other); a run set recorded with Adam is preconditioned alike."""
    from simfluence.attribution.simulators import TracInCPSimulator
    from simfluence.runlog import load_runset

    class Plain(TracInCPSimulator):
        adam_aware = False

    runs = load_runset(tiny_adamw_runs)
    plain = Plain().fit(runs)
    aware = TracInCPSimulator().fit(runs)
    assert plain.preconditioned_ is False and aware.preconditioned_ is True
    assert not np.allclose(plain.B_, aware.B_, rtol=1e-3, atol=0)
    assert plain.warnings_ and aware.warnings_ == []
    adam = copy.deepcopy(runs)
    adam.metadata["config"]["optimizer"]["name"] = "Adam"
    as_adam = TracInCPSimulator().fit(adam)
    assert as_adam.preconditioned_ is True
    np.testing.assert_allclose(as_adam.B_, aware.B_, rtol=1e-12)
    projected = TracInCPSimulator(projection_dim=8).fit(runs)  # gradients projected to 8 dims
    assert projected.preconditioned_ and not np.allclose(projected.B_, aware.B_, rtol=1e-3)
