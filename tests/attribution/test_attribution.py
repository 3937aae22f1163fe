"""Tests for `simfluence.attribution`: per-example gradients, TracIn-CP, influence functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_module
from torch import nn

from simfluence.attribution import (
    CheckpointError,
    RandomProjection,
    grad_dot_scores,
    influence_scores,
    per_example_gradients,
    tracin_cp_scores,
)
from simfluence.recording.task import Examples, Task

# torch 2.13 loads its forward-AD (jvp) decompositions, and captum some helpers, through the
# deprecated torch.jit.script: a DeprecationWarning from torch itself, not from our code.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

N_IN, N_HIDDEN, N_CLASSES = 5, 7, 3
BATCH = 4


class TinyMLP(nn.Module):
    """Two-layer tanh MLP with a (non-trainable) input-scaling buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(N_IN, N_HIDDEN)
        self.out = nn.Linear(N_HIDDEN, N_CLASSES)
        self.register_buffer("scale", torch.full((N_IN,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x * self.scale)))


class TinyTask(Task):
    name = "tiny-mlp"

    def prepare(self, pool: int, tests: int, seed: int) -> tuple[Examples, Examples]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(pool + tests, N_IN, generator=gen)
        y = torch.randint(0, N_CLASSES, (pool + tests,), generator=gen)
        ids = [f"ex{i}" for i in range(pool + tests)]
        return (
            Examples(ids[:pool], {"x": x[:pool], "y": y[:pool]}),
            Examples(ids[pool:], {"x": x[pool:], "y": y[pool:]}),
        )

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TinyMLP()

    def example_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs["x"]), inputs["y"], reduction="none")


@pytest.fixture(scope="module")
def setup() -> dict:
    torch.set_num_threads(1)
    task = TinyTask()
    pool, tests = task.prepare(pool=24, tests=6, seed=0)
    model = task.make_model(seed=1)
    lrs = [0.5, 0.3, 0.2]
    checkpoints = []
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0])
    gen = torch.Generator().manual_seed(2)
    for lr in lrs:
        checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(5):
            rows = torch.randint(0, len(pool), (BATCH,), generator=gen)
            opt.zero_grad()
            task.example_losses(model, pool.take(rows)).mean().backward()
            opt.step()
    fresh = task.make_model(seed=99)  # architecture only; weights differ from the checkpoints
    return {
        "task": task,
        "pool": pool,
        "tests": tests,
        "model": fresh,
        "ckpts": checkpoints,
        "lrs": lrs,
    }


def _loop_grads(task: Task, checkpoint: dict, examples: Examples, dtype=torch.float32):
    model = TinyMLP().to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in checkpoint.items()})
    rows = []
    for i in range(len(examples)):
        inputs = {
            k: (v.to(dtype) if v.is_floating_point() else v) for k, v in examples.take([i]).items()
        }
        model.zero_grad()
        task.example_losses(model, inputs).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_per_example_gradients_match_autograd_loop(setup: dict) -> None:
    task, pool, ckpt = setup["task"], setup["pool"], setup["ckpts"][1]
    got = per_example_gradients(task, setup["model"], ckpt, pool, chunk_size=7)
    want = _loop_grads(task, ckpt, pool)
    assert got.shape == (len(pool), sum(p.numel() for p in TinyMLP().parameters()))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    got64 = per_example_gradients(task, setup["model"], ckpt, pool, dtype=torch.float64)
    want64 = _loop_grads(task, ckpt, pool, torch.float64)
    torch.testing.assert_close(got64, want64, atol=1e-12, rtol=1e-10)
    # the architecture instance is left untouched
    assert not torch.equal(setup["model"].hidden.weight, ckpt["hidden.weight"])


def test_tracin_cp_matches_brute_force(setup: dict) -> None:
    task, pool, tests = setup["task"], setup["pool"], setup["tests"]
    ckpts, lrs = setup["ckpts"], setup["lrs"]
    got = tracin_cp_scores(
        task, setup["model"], ckpts, lrs, pool, tests, BATCH, chunk_size=5, dtype=torch.float64
    )
    want = np.zeros((len(tests), len(pool)))
    for ckpt, lr in zip(ckpts, lrs, strict=True):
        gtr = _loop_grads(task, ckpt, pool, torch.float64)
        gte = _loop_grads(task, ckpt, tests, torch.float64)
        for j in range(len(tests)):
            for i in range(len(pool)):
                want[j, i] -= lr / BATCH * float(gte[j] @ gtr[i])
    assert got.shape == (len(tests), len(pool))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    weighted = tracin_cp_scores(
        task,
        setup["model"],
        ckpts,
        lrs,
        pool,
        tests,
        BATCH,
        checkpoint_weights=[2.0, 2.0, 2.0],
        dtype=torch.float64,
    )
    np.testing.assert_allclose(weighted, 2 * want, rtol=1e-10, atol=1e-14)
    last = grad_dot_scores(
        task, setup["model"], ckpts[-1], lrs[-1], pool, tests, BATCH, dtype=torch.float64
    )
    gtr = _loop_grads(task, ckpts[-1], pool, torch.float64).numpy()
    gte = _loop_grads(task, ckpts[-1], tests, torch.float64).numpy()
    np.testing.assert_allclose(last, -lrs[-1] / BATCH * gte @ gtr.T, rtol=1e-10, atol=1e-14)


def test_sign_one_step_lowers_loss(setup: dict) -> None:
    """A tiny SGD step on example i changes test losses by about B_i(z) * (step / (eta/b))."""
    task, pool, tests = setup["task"], setup["pool"], setup["tests"]
    ckpt, lr = setup["ckpts"][-1], 1e-4
    scores = grad_dot_scores(
        task, setup["model"], ckpt, lr, pool, tests, BATCH, dtype=torch.float64
    )
    model = TinyMLP().double()
    model.load_state_dict({k: v.double() for k, v in ckpt.items()})
    cast = {"x": tests.tensors["x"].double(), "y": tests.tensors["y"]}
    before = task.example_losses(model, cast).detach()
    row = pool.take([3])
    loss = task.example_losses(model, {"x": row["x"].double(), "y": row["y"]}).sum() / BATCH
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    after = task.example_losses(model, cast).detach()
    np.testing.assert_allclose((after - before).numpy(), scores[:, 3], rtol=1e-3, atol=1e-12)


def test_matches_captum_tracincp(setup: dict) -> None:
    captum_tracin = require_module("captum.influence", "pip install captum")
    task, pool, tests = setup["task"], setup["pool"], setup["tests"]
    ckpts, lrs = setup["ckpts"], setup["lrs"]
    model = TinyMLP()
    by_name = {f"ckpt{k}": (c, lr) for k, (c, lr) in enumerate(zip(ckpts, lrs, strict=True))}

    def load(m: nn.Module, name: str) -> float:
        state, lr = by_name[name]
        m.load_state_dict(state)
        return lr

    train_ds = torch.utils.data.TensorDataset(pool.tensors["x"], pool.tensors["y"])
    tracin = captum_tracin.TracInCP(
        model,
        train_ds,
        checkpoints=list(by_name),
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=8,
        sample_wise_grads_per_batch=False,
    )
    theirs = tracin.influence((tests.tensors["x"], tests.tensors["y"])).detach().numpy()
    ours = tracin_cp_scores(task, setup["model"], ckpts, lrs, pool, tests, BATCH)
    # Captum: sum_k lr_k g_test . g_train, positive = proponent, no 1/b
    np.testing.assert_allclose(
        ours,
        -theirs.astype(np.float64) / BATCH,
        rtol=1e-4,
        atol=1e-4 * np.abs(theirs).max() / BATCH,
    )


def test_influence_cg_matches_dense_and_exact_hessian(setup: dict) -> None:
    task, pool, tests = setup["task"], setup["pool"], setup["tests"]
    ckpt, lr, damping = setup["ckpts"][-1], 0.2, 0.5
    kwargs = {"damping": damping, "dtype": torch.float64}
    dense = influence_scores(
        task, setup["model"], ckpt, lr, pool, tests, BATCH, method="dense", **kwargs
    )
    cg = influence_scores(
        task,
        setup["model"],
        ckpt,
        lr,
        pool,
        tests,
        BATCH,
        method="cg",
        tol=1e-12,
        chunk_size=10,
        vector_chunk=4,
        **kwargs,
    )
    np.testing.assert_allclose(cg, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())
    minres = influence_scores(
        task, setup["model"], ckpt, lr, pool, tests, BATCH, method="minres", tol=1e-12, **kwargs
    )
    np.testing.assert_allclose(minres, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())

    # independent reference: torch.autograd.functional.hessian on the flat parameters
    model = TinyMLP().double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([ckpt[n].double().reshape(-1) for n in names])
    x, y = pool.tensors["x"].double(), pool.tensors["y"]

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, [int(np.prod(s)) for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        params["scale"] = ckpt["scale"].double()
        out = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(out, y)

    hess = torch.autograd.functional.hessian(mean_loss, theta0)
    eigmin = float(torch.linalg.eigvalsh(hess)[0])
    assert eigmin + damping > 0  # so CG applies
    gtr = _loop_grads(task, ckpt, pool, torch.float64)
    gte = _loop_grads(task, ckpt, tests, torch.float64)
    inv = torch.linalg.inv(hess + damping * torch.eye(len(theta0), dtype=torch.float64))
    want = (-(lr / BATCH) * gte @ inv @ gtr.T).numpy()
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    fisher_dense = influence_scores(
        task,
        setup["model"],
        ckpt,
        lr,
        pool,
        tests,
        BATCH,
        curvature="fisher",
        method="dense",
        **kwargs,
    )
    fisher_cg = influence_scores(
        task,
        setup["model"],
        ckpt,
        lr,
        pool,
        tests,
        BATCH,
        curvature="fisher",
        method="cg",
        tol=1e-12,
        **kwargs,
    )
    fmat = gtr.T @ gtr / len(pool) + damping * torch.eye(len(theta0), dtype=torch.float64)
    fwant = (-(lr / BATCH) * gte @ torch.linalg.solve(fmat, gtr.T)).numpy()
    for got in (fisher_dense, fisher_cg):
        np.testing.assert_allclose(got, fwant, rtol=1e-5, atol=1e-5 * np.abs(fwant).max())


def test_random_projection(setup: dict) -> None:
    task, pool, tests = setup["task"], setup["pool"], setup["tests"]
    ckpts, lrs = setup["ckpts"], setup["lrs"]
    exact = tracin_cp_scores(task, setup["model"], ckpts, lrs, pool, tests, BATCH)
    proj = RandomProjection(k=2048, seed=7, block_rows=20)  # several blocks for D = 80
    approx = tracin_cp_scores(task, setup["model"], ckpts, lrs, pool, tests, BATCH, proj)
    assert approx.shape == exact.shape
    assert np.corrcoef(exact.ravel(), approx.ravel())[0, 1] > 0.95
    again = tracin_cp_scores(
        task,
        setup["model"],
        ckpts,
        lrs,
        pool,
        tests,
        BATCH,
        RandomProjection(k=2048, seed=7, block_rows=20),
    )
    np.testing.assert_array_equal(approx, again)
    other = tracin_cp_scores(
        task,
        setup["model"],
        ckpts,
        lrs,
        pool,
        tests,
        BATCH,
        RandomProjection(k=2048, seed=8, block_rows=20),
    )
    assert not np.array_equal(approx, other)
    rad = RandomProjection(k=2048, seed=7, kind="rademacher")
    approx_rad = tracin_cp_scores(task, setup["model"], ckpts, lrs, pool, tests, BATCH, rad)
    assert np.corrcoef(exact.ravel(), approx_rad.ravel())[0, 1] > 0.95
    # chunking does not change the projection, and no cache gives the same matrix
    g = torch.randn(5, 50, dtype=torch.float64)
    p1 = RandomProjection(k=16, seed=3, block_rows=8)
    p2 = RandomProjection(k=16, seed=3, block_rows=8, max_cache_bytes=0)
    torch.testing.assert_close(p1(g), p2(g))
    torch.testing.assert_close(torch.cat([p1(g[:2]), p1(g[2:])]), p1(g))


def test_bad_checkpoints_raise(setup: dict) -> None:
    task, pool, tests = setup["task"], setup["pool"], setup["tests"]
    good = setup["ckpts"][0]
    missing = {k: v for k, v in good.items() if k != "out.bias"}
    with pytest.raises(ValueError, match=r"out\.bias"):
        tracin_cp_scores(task, setup["model"], [good, missing], [0.1, 0.1], pool, tests, BATCH)
    wrong = dict(good, **{"hidden.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"hidden\.weight"):
        influence_scores(task, setup["model"], wrong, 0.1, pool, tests, BATCH)
    extra = dict(good, **{"nonsense.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"nonsense\.weight"):
        per_example_gradients(task, setup["model"], extra, pool)
    with pytest.raises(ValueError, match="learning rates"):
        tracin_cp_scores(task, setup["model"], [good, good], [0.1], pool, tests, BATCH)


def test_influence_minres_on_indefinite_hessian(setup: dict) -> None:
    """At initialisation the Hessian is indefinite: MINRES still matches the dense solve."""
    task, pool, tests = setup["task"], setup["pool"], setup["tests"]
    ckpt = setup["ckpts"][0]
    kwargs = {"damping": 1e-3, "dtype": torch.float64}
    dense = influence_scores(
        task, setup["model"], ckpt, 0.5, pool, tests, BATCH, method="dense", **kwargs
    )
    minres = influence_scores(
        task,
        setup["model"],
        ckpt,
        0.5,
        pool,
        tests,
        BATCH,
        method="minres",
        tol=1e-13,
        max_iter=2000,
        **kwargs,
    )
    np.testing.assert_allclose(minres, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_random_projection_preserves_norms_and_dot_products_in_expectation() -> None:
    """The scale, not just the direction: entries of P have variance 1/k, so squared norms and
    dot products of projected vectors are unbiased (correlation alone would miss a factor)."""
    k, dim = 64, 40
    eye = torch.eye(dim, dtype=torch.float64)
    rad = RandomProjection(k, seed=1, kind="rademacher", block_rows=16)(eye)  # = P itself
    np.testing.assert_allclose(np.abs(rad.numpy()), 1 / np.sqrt(k), rtol=1e-12)
    gauss = np.stack(
        [RandomProjection(k, seed=s, block_rows=16)(eye).numpy() for s in range(50)]
    )  # 50 independent P, (50, dim, k)
    assert (gauss**2).sum(axis=2).mean() == pytest.approx(1.0, abs=0.02)  # E ||e_j P||^2 = 1
    g = torch.randn(2, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    projected = np.stack([g.numpy() @ p for p in gauss])  # (50, 2, k)
    dots = (projected[:, 0] * projected[:, 1]).sum(axis=1)
    norms = (projected**2).sum(axis=2).mean(axis=0)
    true_norms = (g.numpy() ** 2).sum(axis=1)
    np.testing.assert_allclose(norms, true_norms, rtol=0.05)
    spread = np.sqrt(true_norms.prod() / k)  # std of one projected dot product, about
    assert abs(dots.mean() - float(g[0] @ g[1])) < 3 * spread / np.sqrt(50)
