"""simfluence: training-run simulation for training data attribution (Guu et al. 2023).

Record training runs, fit simulators (Simfluence-Linear and its special cases), simulate any
curriculum, and evaluate on held-out runs. The core (this package minus ``recording`` and
``attribution``) needs only numpy, scipy and pyarrow.
"""

from simfluence.errors import CurriculumError, RunLogError, SimfluenceError
from simfluence.runlog import Run, RunSet, load_runset, save_runset
from simfluence.simulators import (
    AdditiveSimulator,
    BlendSimulator,
    LinearSimulator,
    MeanTrajectorySimulator,
    PersistenceSimulator,
    Simulator,
    load_simulator,
    make_simulator,
)

__version__ = "0.1.0"

__all__ = [
    "AdditiveSimulator",
    "BlendSimulator",
    "CurriculumError",
    "LinearSimulator",
    "MeanTrajectorySimulator",
    "PersistenceSimulator",
    "Run",
    "RunLogError",
    "RunSet",
    "SimfluenceError",
    "Simulator",
    "load_runset",
    "load_simulator",
    "make_simulator",
    "save_runset",
]
