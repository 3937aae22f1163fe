"""Training-run simulators: Simfluence-Linear, its special cases and honest baselines."""

from simfluence.simulators.base import NotFittedError, Simulator
from simfluence.simulators.baselines import MeanTrajectorySimulator, PersistenceSimulator
from simfluence.simulators.blend import BlendSimulator
from simfluence.simulators.dynamics import DynamicsSimulator, rollout
from simfluence.simulators.linear import AdditiveSimulator, LinearSimulator
from simfluence.simulators.logspace import LogHybridSimulator, LogLinearSimulator
from simfluence.simulators.registry import (
    available_simulators,
    configure_simulator,
    load_simulator,
    make_simulator,
    simulator_class,
    simulator_params,
)
from simfluence.simulators.stack import StackSimulator

__all__ = [
    "AdditiveSimulator",
    "BlendSimulator",
    "DynamicsSimulator",
    "LinearSimulator",
    "LogHybridSimulator",
    "LogLinearSimulator",
    "MeanTrajectorySimulator",
    "NotFittedError",
    "PersistenceSimulator",
    "Simulator",
    "StackSimulator",
    "available_simulators",
    "configure_simulator",
    "load_simulator",
    "make_simulator",
    "rollout",
    "simulator_class",
    "simulator_params",
]
