"""Simulator names -> classes. Methods that need PyTorch are imported only when asked for, so
the core never imports torch."""

from __future__ import annotations

import importlib

from simfluence.errors import SimfluenceError
from simfluence.simulators.base import Simulator
from simfluence.simulators.baselines import MeanTrajectorySimulator, PersistenceSimulator
from simfluence.simulators.linear import AdditiveSimulator, LinearSimulator
from simfluence.simulators.truth import TruthSimulator

_CORE: dict[str, type[Simulator]] = {
    cls.name: cls
    for cls in (
        LinearSimulator,
        AdditiveSimulator,
        PersistenceSimulator,
        MeanTrajectorySimulator,
        TruthSimulator,
    )
}
#: name -> "module:Class" for simulators that live outside the core (they import torch)
_LAZY: dict[str, str] = {
    name: f"simfluence.attribution.simulators:{cls}"
    for name, cls in [
        ("tracin-cp", "TracInCPSimulator"),
        ("tracin-cp-scaled", "ScaledTracInCPSimulator"),
        ("grad-dot", "GradDotSimulator"),
        ("grad-dot-scaled", "ScaledGradDotSimulator"),
        ("influence", "InfluenceSimulator"),
        ("influence-scaled", "ScaledInfluenceSimulator"),
    ]
}


def available_simulators() -> list[str]:
    """Every simulator name, core first."""
    return [*_CORE, *_LAZY]


def simulator_class(name: str) -> type[Simulator]:
    """The class registered under `name`; `SimfluenceError` listing the known names otherwise."""
    if name in _CORE:
        return _CORE[name]
    if name in _LAZY:
        module, attr = _LAZY[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise SimfluenceError(
        f"unknown method {name!r}; known methods: {', '.join(available_simulators())}"
    )


def make_simulator(name: str, **params: object) -> Simulator:
    """A fresh, unfitted simulator of method `name`."""
    return simulator_class(name)(**params)


def configure_simulator(name: str, **options: object) -> Simulator:
    """A fresh simulator of method `name`, given those of `options` that it takes.

    Lets a caller (the command line) pass one set of options to many methods: ``l2`` reaches
    the ridge methods, ``path`` the truth oracle, and each ignores the rest. Options whose value
    is None are left at the method's default.
    """
    cls = simulator_class(name)
    taken = set(cls._param_names())
    return cls(**{k: v for k, v in options.items() if k in taken and v is not None})
