"""Where the zero-weight probes of a run's unconsumed examples go (`probe_schedule`)."""

from __future__ import annotations

from collections import Counter

from simfluence.attribution.probes import probe_schedule


def test_every_unconsumed_example_is_probed_once_per_span() -> None:
    curriculum = [["a", "b"], ["c", "a"], ["b", "c"], ["a", "b"], ["c", "a"], ["b", "c"]]
    pool = ["a", "b", "c", "d", "e"]
    probes = probe_schedule(curriculum, pool, seed=7)
    assert len(probes) == 6
    counts = Counter(i for p in probes for i in p)
    assert counts == {"d": 4, "e": 4}  # 12 consumptions of 3 examples: 4 each
    bounds = [(k * 6 // 4, (k + 1) * 6 // 4) for k in range(4)]  # 4 spans of 6 steps
    for example in ("d", "e"):
        steps = sorted(t for t, p in enumerate(probes) for i in p if i == example)
        assert all(low <= t < high for t, (low, high) in zip(steps, bounds, strict=True))
    assert probe_schedule(curriculum, pool, seed=7) == probes  # drawn from the seed
    others = [probe_schedule(curriculum, pool, seed=s) for s in range(8)]
    assert any(p != probes for p in others)


def test_nothing_to_probe_when_the_run_consumed_the_whole_pool() -> None:
    assert probe_schedule([["a"], ["b"]], ["a", "b"], seed=0) == [[], []]
    assert probe_schedule([[], []], ["a", "b"], seed=0) == [[], []]
