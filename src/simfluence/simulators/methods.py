"""The default method lists, in one place: each command and benchmark that needs a default
takes it from here (named for what it is for)."""

from __future__ import annotations

#: `simfluence evaluate` and `simfluence report`: the two Simfluence fits, `auto` (the best by
#: run-wise CV of linear with optimizer memory, additive, mean, hybrid, their log-space twins
#: and the stack of them; it says what it picked) and the two baselines (need no checkpoints or
#: features)
DEFAULT_EVALUATE_METHODS: tuple[str, ...] = ("linear", "additive", "auto", "mean", "persistence")

#: `simfluence validate`: the fits, one gradient method and a baseline; the first one searches
#: the optimized curricula
DEFAULT_VALIDATE_METHODS: tuple[str, ...] = ("linear", "additive", "tracin-cp-scaled", "mean")

#: `simfluence demo` (and `benchmarks/bench_workloads.py`): every simulator that a recorded run
#: set with checkpoints and features can fit
DEMO_METHODS: tuple[str, ...] = (
    "linear",
    "additive",
    "tracin-cp",
    "tracin-cp-scaled",
    "grad-dot",
    "grad-dot-scaled",
    "influence",
    "influence-scaled",
    "featurized",
    "hybrid",
    "mean",
    "persistence",
)
