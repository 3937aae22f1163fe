"""`make_curricula`: the new curricula `validate` trains, kind by kind, on a stub run set (no
training: milliseconds), against the protocol written out with the curriculum primitives.

The protocol (docs and `make_curricula`'s docstring): random curricula in the recording
protocol; edits of ONE base curriculum (itself random) that leave out or repeat a tenth of its
distinct examples (rounded, one at least), or reorder it; every draw seeded from the seed and
the kind, apart from the recorded runs' seeds (``[seed, 7919, ...]``), so a validation is
reproducible from its seed alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import require_module

require_module("torch", "pip install -c constraints.txt torch")

from simfluence.curricula import random_curriculum, remove, reorder, repeat  # noqa: E402
from simfluence.errors import SimfluenceError  # noqa: E402
from simfluence.recording.validation import make_curricula  # noqa: E402

POOL = [f"ex{i}" for i in range(40)]


def _runs(per_run: int, batch: int = 4, epochs: int = 2) -> SimpleNamespace:
    """What `make_curricula` reads of a run set: the protocol and the pool."""
    config = {"per_run": per_run, "batch": batch, "epochs": epochs}
    return SimpleNamespace(metadata={"config": config}, train_ids=POOL, runs=[])


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, 7919, *key])


def _base(runs: SimpleNamespace, seed: int) -> list[list[str]]:
    config = runs.metadata["config"]
    return random_curriculum(
        POOL, config["per_run"], config["batch"], config["epochs"], _rng(seed, 0)
    )


@pytest.mark.parametrize("seed", [0, 5])
def test_random_curricula_follow_the_recording_protocol(seed: int) -> None:
    runs = _runs(per_run=10, batch=4, epochs=3)
    made = make_curricula("random", 3, runs, seed)
    expected = [random_curriculum(POOL, 10, 4, 3, _rng(seed, 1, k)) for k in range(3)]
    assert made == expected
    assert [len(b) for b in made[0]] == [4, 4, 2] * 3  # ceil(10 / 4) batches per epoch


@pytest.mark.parametrize(
    ("per_run", "n_edit"),
    [(3, 1), (10, 1), (25, 2), (35, 4)],  # max(1, round(0.1 * distinct)); round(2.5) = 2
)
def test_leave_out_and_repeat_edit_a_tenth_of_one_base_curriculum(
    per_run: int, n_edit: int
) -> None:
    runs, seed = _runs(per_run), 2
    base = _base(runs, seed)
    distinct = sorted({i for b in base for i in b})
    assert len(distinct) == per_run
    left_out = make_curricula("leave-out", 3, runs, seed)
    repeated = make_curricula("repeat", 3, runs, seed)
    for k in range(3):
        dropped = _rng(seed, 2, k).choice(distinct, n_edit, replace=False)
        assert left_out[k] == remove(base, dropped)
        doubled = _rng(seed, 4, k).choice(distinct, n_edit, replace=False)
        assert repeated[k] == repeat(base, doubled, 2)
        flat = [i for b in repeated[k] for i in b]
        assert sum(flat.count(i) == 4 for i in distinct) == n_edit  # 2 epochs x 2


def test_reorder_shuffles_the_base_curriculum() -> None:
    runs, seed = _runs(per_run=12), 9
    base = _base(runs, seed)
    made = make_curricula("reorder", 2, runs, seed)
    assert made == [reorder(base, _rng(seed, 3, k)) for k in range(2)]
    assert made[0] != made[1]


def test_each_kind_makes_count_curricula_and_unknown_kinds_are_refused() -> None:
    runs = _runs(per_run=8)
    for kind in ("random", "leave-out", "reorder", "repeat"):
        assert make_curricula(kind, 0, runs, 1) == []
        assert len(make_curricula(kind, 4, runs, 1)) == 4
    with pytest.raises(SimfluenceError, match="unknown kind 'sideways'; kinds: random, "):
        make_curricula("sideways", 1, runs, 1)
    with pytest.raises(SimfluenceError, match="optimized curricula need a fitted simulator"):
        make_curricula("optimized", 1, runs, 1)


def test_optimized_curricula_are_searches_seeded_apart_within_the_budget(monkeypatch) -> None:
    """``optimized``: search k runs with seed ``seed * 1000 + k`` in the recording protocol
    (per_run, batch, epochs), at most the given rollouts and seconds, inside the recorded
    runs' trust region; its curriculum is the search's."""
    from simfluence.recording import validation

    runs = _runs(per_run=8, batch=2, epochs=3)
    calls: list[tuple] = []

    def search(simulator, per_run, batch, epochs, **options):  # type: ignore[no-untyped-def]
        calls.append((simulator, per_run, batch, epochs, options))
        return SimpleNamespace(curriculum=[[f"found-{options['seed']}"]])

    monkeypatch.setattr(validation, "optimize_curriculum", search)
    found = make_curricula("optimized", 3, runs, 7, "SEARCHER", 25, 1.5)
    assert found == [[["found-7000"]], [["found-7001"]], [["found-7002"]]]
    for k, (simulator, per_run, batch, epochs, options) in enumerate(calls):
        assert (simulator, per_run, batch, epochs) == ("SEARCHER", 8, 2, 3)
        assert options == dict(seed=7000 + k, max_evaluations=25, max_seconds=1.5, recorded=runs)
