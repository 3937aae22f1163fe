"""Curriculum search: the curriculum of ``K`` pool examples that a simulator predicts is best.

The layout is the recording protocol's: the same ``K`` examples are consumed once per epoch for
``E`` epochs, each epoch in its own order, cut into consecutive batches of ``b`` (the last one
may be smaller). A layout is an integer array ``(E, K)`` of pool indices whose rows are
permutations of the same ``K``-subset. The search looks for the subset *and* the orders.

Modules: `starts` (candidates, random and greedy starts), `moves` (one round of local search),
`evaluator` (the vectorized objective and its trust region), `optimize` (the driver), `result`
(what it returns).
"""

from simfluence.counterfactual.search.evaluator import TRUST_REGION, trust_region_rollouts
from simfluence.counterfactual.search.optimize import assess_curriculum, optimize_curriculum
from simfluence.counterfactual.search.result import SearchResult

__all__ = [
    "TRUST_REGION",
    "SearchResult",
    "assess_curriculum",
    "optimize_curriculum",
    "trust_region_rollouts",
]
