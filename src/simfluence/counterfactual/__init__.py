"""Counterfactual questions to a fitted simulator: which training examples, and where in
training, moved a test loss (`attribution`), and which curriculum it predicts is best (`search`).
"""

from simfluence.counterfactual.attribution import (
    SIGN_CONVENTION,
    LeaveOneOut,
    PairInteractions,
    StepContributions,
    final_objective,
    leave_one_out,
    pair_interactions,
    step_contributions,
    test_columns,
)
from simfluence.counterfactual.search import SearchResult, optimize_curriculum

__all__ = [
    "SIGN_CONVENTION",
    "LeaveOneOut",
    "PairInteractions",
    "SearchResult",
    "StepContributions",
    "final_objective",
    "leave_one_out",
    "optimize_curriculum",
    "pair_interactions",
    "step_contributions",
    "test_columns",
]
