"""Attribution views of one curriculum for one test example (or a group), by simulation.

Every view is about the *objective*: the simulated loss of the chosen test examples, averaged
over them (one test id: its loss). All views work with any fitted `Simulator`; the
per-example decomposition of each step needs a Simfluence-Linear-family (`DynamicsSimulator`).

Sign convention (all views): an *effect* is ``L_T(with) - L_T(without)``, the simulated final
loss with the example(s) consumed minus without. **Negative = helpful**: consuming the example
lowered the final loss. Positive = harmful.

Modules: `rollouts` (shared helpers), `removal` (removal effects and their sign), `loo`
(leave-one-out), `steps` (where in training), `pairs` (non-additivity), `views` (all three).
"""

from simfluence.counterfactual.attribution.loo import (
    INTERVAL_NOTE,
    LeaveOneOut,
    effect_intervals,
    leave_one_out,
)
from simfluence.counterfactual.attribution.pairs import PairInteractions, pair_interactions
from simfluence.counterfactual.attribution.removal import (
    REMOVALS,
    SIGN_CONVENTION,
    check_removal,
    removal_effects,
)
from simfluence.counterfactual.attribution.rollouts import final_objective, test_columns
from simfluence.counterfactual.attribution.steps import (
    FLOOR_KEY,
    SIMULATED_CHANGE,
    StepContributions,
    step_contributions,
)
from simfluence.counterfactual.attribution.views import attribution_views

__all__ = [
    "FLOOR_KEY",
    "INTERVAL_NOTE",
    "REMOVALS",
    "SIGN_CONVENTION",
    "SIMULATED_CHANGE",
    "LeaveOneOut",
    "PairInteractions",
    "StepContributions",
    "attribution_views",
    "check_removal",
    "effect_intervals",
    "final_objective",
    "leave_one_out",
    "pair_interactions",
    "removal_effects",
    "step_contributions",
    "test_columns",
]
