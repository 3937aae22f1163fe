"""Static methods (dattri) as scorers in `validate`, and the ``subsets`` kind (issue 26).

dattri's attributors themselves are stubbed here (`static_scores` returns a known matrix): the
tests check what simfluence does with the scores (the additive rule, the one global scale,
order-blindness, the cost) and the subsets protocol's LDS, on a tiny exact task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from exact_tasks import LinearLossTask
from scipy import stats

import simfluence.attribution.static as static
from simfluence.errors import SimfluenceError
from simfluence.metrics import linear_datamodeling_score
from simfluence.recording.protocol import RecordingProtocol
from simfluence.recording.record import record_runs
from simfluence.recording.subsets import mean_over_seeds, subset_curricula
from simfluence.recording.validation import _score_kind, validate
from simfluence.runlog import RunSet
from simfluence.simulators.registry import make_simulator

PROTOCOL = dict(runs=4, pool=12, per_run=8, tests=5, batch=4, epochs=2, lr=0.1, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> RunSet:
    root = tmp_path_factory.mktemp("static")
    protocol = RecordingProtocol(**PROTOCOL, checkpoints=[0, 4])
    return record_runs(LinearLossTask(), root / "runs", protocol, progress=False)


@pytest.fixture()
def scores(monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, list]:
    """dattri stubbed: a known ``(M, P)`` score matrix, positive = helpful."""
    known = np.random.default_rng(0).normal(size=(PROTOCOL["tests"], PROTOCOL["pool"]))
    calls = []

    def fake(method, task, model, checkpoints, pool, tests, **kw):  # type: ignore[no-untyped-def]
        calls.append((method, len(checkpoints)))
        return known.copy()

    monkeypatch.setattr(static, "static_scores", fake)
    return known, calls


def _totals(runs: RunSet, curricula) -> np.ndarray:  # type: ignore[no-untyped-def]
    index = runs.train_index
    out = np.zeros((len(curricula), len(runs.train_ids)))
    for k, c in enumerate(curricula):
        for batch in c:
            for i in batch:  # mean weighting: w_t = b / |c_t|
                out[k, index[i]] += PROTOCOL["batch"] / len(batch)
    return out


def test_scores_become_predictions_with_one_fitted_scale(runs: RunSet, scores: tuple) -> None:
    scores, calls = scores
    sim = make_simulator("trak", max_runs=2).fit(runs)
    assert calls == [("trak", 2)]  # the final checkpoints of the first 2 runs
    # the scale by hand: least squares of the final-loss deviations on the summed-score ones
    summed = _totals(runs, [r.curriculum for r in runs.runs]) @ (-scores).T
    change = np.stack([r.losses[-1] - r.losses[0] for r in runs.runs])
    dp, da = summed - summed.mean(0), change - change.mean(0)
    scale = (dp * da).sum() / (dp * dp).sum()
    assert sim.scale_ == pytest.approx(scale)
    offset = (change - scale * summed).mean(0)
    # any curriculum: step-0 loss + offset + scale * sum of the scores of what it consumed
    curricula = [runs.runs[0].curriculum, [b[:2] for b in runs.runs[1].curriculum]]
    initial = runs.runs[0].initial_loss
    predicted = sim.simulate_many(curricula, initial)
    expected = initial + offset + scale * (_totals(runs, curricula) @ (-scores).T)
    np.testing.assert_allclose([p[-1] for p in predicted], expected, rtol=1e-9, atol=1e-12)
    # removing examples changes the prediction by the sum of their scaled scores
    assert sim.cost_["seconds"] >= 0 and sim.cost_["peak_rss_mb"] >= 0


def test_reorder_is_marked_blind_and_scores_zero(runs: RunSet, scores: tuple) -> None:
    sims = {
        "trak": make_simulator("trak", max_runs=1),
        "persistence": make_simulator("persistence"),
    }
    result = validate(LinearLossTask(), runs, sims, ["reorder"], 3)
    block = result["kinds"]["reorder"]["methods"]
    assert block["trak"]["order_blind"] is True and block["trak"]["lds"] == 0.0
    assert "order_blind" not in block["persistence"]
    # cost beside every method: fit seconds and peak memory, and the retraining's
    for name in sims:
        assert set(result["timing"]["fit"][name]) == {"seconds", "peak_rss_mb"}
    assert result["timing"]["retrain"]["trainings"] == 3


def test_subsets_are_random_halves_trained_whole(runs: RunSet) -> None:
    curricula = subset_curricula(runs, 3, seeds=2, seed=0)
    assert len(curricula) == 6
    half = len(runs.train_ids) // 2
    for j in range(3):
        a, b = curricula[2 * j], curricula[2 * j + 1]
        members = sorted({i for batch in a for i in batch})
        assert len(members) == half and members == sorted({i for batch in b for i in batch})
        assert a != b  # another order per seed
        assert sum(len(batch) for batch in a) == half * PROTOCOL["epochs"]
    assert len({tuple(sorted({i for b in c for i in b})) for c in curricula[::2]}) > 1
    with pytest.raises(SimfluenceError, match="at least 2"):
        subset_curricula(runs, 1)


def test_subsets_lds_by_hand() -> None:
    rng = np.random.default_rng(1)
    true = [rng.normal(size=(3, 4)) for _ in range(10)]  # 5 subsets x 2 seeds, 4 tests
    pred = [rng.normal(size=(3, 4)) for _ in range(10)]
    t, p = mean_over_seeds(true, 2), mean_over_seeds(pred, 2)
    np.testing.assert_allclose(t[1], (true[2] + true[3]) / 2)
    by_hand = np.mean(
        [stats.spearmanr([x[-1, m] for x in t], [x[-1, m] for x in p]).statistic for m in range(4)]
    )
    assert _score_kind(t, {"m": p})["m"]["lds"] == pytest.approx(by_hand)
    assert linear_datamodeling_score(
        np.stack([x[-1] for x in t]), np.stack([x[-1] for x in p])
    ) == pytest.approx(by_hand)


def test_subsets_kind_in_validate(runs: RunSet, tmp_path: Path) -> None:
    truth = make_simulator("persistence")
    result = validate(
        LinearLossTask(), runs, {"p": truth}, ["subsets"], 2, subsets=3, subset_seeds=2
    )
    assert result["kinds"]["subsets"]["curricula"] == 6
    assert result["timing"]["retrain"]["trainings"] == 6


def test_unknown_methods_error() -> None:
    with pytest.raises(SimfluenceError, match="unknown method 'trak2'"):
        make_simulator("trak2")
    with pytest.raises(SimfluenceError, match="unknown static method"):
        static.static_scores("nope", None, None, [], None, None)  # type: ignore[arg-type]


def test_trak_projects_below_the_pool_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRAK inverts the pool's projected-gradient kernel (k x k from P rows): with k >= P it is
    singular and the scores are noise (LDS 0.05 -> 0.58 on digits-logreg once k < P)."""
    from simfluence.attribution import static
    from simfluence.recording.workloads import get_workload

    seen: dict = {}

    class FakeTRAK:
        def __init__(self, task, probability, projector_kwargs):  # type: ignore[no-untyped-def]
            seen.update(projector_kwargs)

        def cache(self, loader):  # type: ignore[no-untyped-def]
            pass

        def attribute(self, loader):  # type: ignore[no-untyped-def]
            return static.torch.zeros(40, 5)

    monkeypatch.setattr(static, "_import", lambda name: (FakeTRAK, lambda *a: None))
    task = get_workload("digits-logreg")
    pool, tests = task.prepare(pool=40, tests=5, seed=0)
    model = task.make_model(0)
    out = static.static_scores("trak", task, model, [model.state_dict()], pool, tests)
    assert out.shape == (5, 40) and seen["proj_dim"] == 20
    assert [static.trak_dim(n) for n in (1, 10, 200, 5000)] == [1, 5, 100, 512]


@pytest.mark.slow
def test_logra_writes_nothing_into_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dattri's LoGra keeps a ``batch_metadata.json`` in its cache folder, by default the
    current directory: a user's `validate --methods logra` left one in their project (and one
    was committed here). It now goes to a scratch folder that is removed afterwards."""
    from conftest import require_module

    from simfluence.recording.workloads import get_workload

    require_module("dattri", "pip install 'simfluence[dattri]'")
    monkeypatch.chdir(tmp_path)
    task = get_workload("digits-logreg")
    pool, tests = task.prepare(pool=24, tests=3, seed=0)
    model = task.make_model(0)
    out = static.static_scores("logra", task, model, [model.state_dict()], pool, tests)
    assert out.shape == (3, 24) and np.isfinite(out).all() and np.abs(out).max() > 0
    assert list(tmp_path.iterdir()) == []


class _TwoInputs(LinearLossTask):
    """A task whose model takes two inputs, as newsgroups-minilm's takes hidden states and a
    mask: ``forward(x, gate) = linear(x) * gate``."""

    def make_model(self, seed: int):  # type: ignore[no-untyped-def]
        import torch

        class Gated(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x, gate):  # type: ignore[no-untyped-def]
                return self.inner(x).squeeze(-1) * gate

        from exact_tasks import FEATURES

        torch.manual_seed(seed)
        return Gated(torch.nn.Linear(FEATURES, 1, dtype=torch.float64))

    def prepare(self, pool: int, tests: int, seed: int):  # type: ignore[no-untyped-def]
        import torch

        pool_examples, test_examples = super().prepare(pool, tests, seed)
        for examples in (pool_examples, test_examples):
            n = len(examples)
            examples.tensors["gate"] = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
        return pool_examples, test_examples

    def example_losses(self, model, inputs):  # type: ignore[no-untyped-def]
        return 0.5 * (model(inputs["x"], inputs["gate"]) - inputs["y"]) ** 2


@pytest.mark.parametrize("method", ["logra", "if-ekfac", "trak"])
def test_static_methods_run_on_a_model_of_several_inputs(method: str) -> None:
    """LoGra's set-up runs one forward of the batch's first tensor alone; a model with a
    second input (newsgroups-minilm's mask) got no mask and the method crashed (TypeError)."""
    from conftest import require_module

    require_module("dattri", "pip install 'simfluence[dattri]'")
    task = _TwoInputs()
    pool, tests = task.prepare(pool=24, tests=3, seed=0)
    model = task.make_model(0)
    out = static.static_scores(method, task, model, [model.state_dict()], pool, tests)
    assert out.shape == (3, 24) and np.isfinite(out).all() and np.abs(out).max() > 0


def test_a_dattri_crash_is_a_clear_error_naming_the_attributor(
    runs: RunSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dattri's EK-FAC raised UnboundLocalError on MiniLM's attention layers: the fit says
    which attributor failed on this model (a `SimfluenceError`, which `validate` reports while
    it validates the other methods)."""

    def crash(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise UnboundLocalError("cannot access local variable 'a_prev'")

    monkeypatch.setattr(static, "static_scores", crash)
    with pytest.raises(SimfluenceError, match=r"dattri's IFAttributorEKFAC failed on this model"):
        make_simulator("if-ekfac", max_runs=1).fit(runs)
