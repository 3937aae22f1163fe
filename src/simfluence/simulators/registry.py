"""Simulator names -> classes, and loading saved simulators (the class is found by name).
Methods that need PyTorch are imported only when asked for, so the core never imports torch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from simfluence._resolve import load_reference
from simfluence._safe_io import loads_json, read_npz, refuse_malformed
from simfluence.errors import SimfluenceError
from simfluence.simulators.auto import AutoSimulator
from simfluence.simulators.base import MODEL_FORMAT, MODEL_SCHEMA_VERSION, Simulator
from simfluence.simulators.baselines import MeanTrajectorySimulator, PersistenceSimulator
from simfluence.simulators.blend import BlendSimulator
from simfluence.simulators.featurized.hybrid import HybridSimulator
from simfluence.simulators.featurized.simulator import FeaturizedSimulator
from simfluence.simulators.linear import AdditiveSimulator, LinearSimulator
from simfluence.simulators.logspace import LogHybridSimulator, LogLinearSimulator
from simfluence.simulators.stack import StackSimulator
from simfluence.simulators.truth import TruthSimulator

_CORE: dict[str, type[Simulator]] = {
    cls.name: cls
    for cls in (
        LinearSimulator,
        BlendSimulator,
        AdditiveSimulator,
        FeaturizedSimulator,
        HybridSimulator,
        PersistenceSimulator,
        MeanTrajectorySimulator,
        TruthSimulator,
        LogLinearSimulator,
        LogHybridSimulator,
        StackSimulator,
        AutoSimulator,
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
_LAZY["unrolled"] = "simfluence.attribution.unrolled:UnrolledSimulator"
_LAZY["dvemb"] = "simfluence.attribution.dvemb:DVEmbSimulator"
_LAZY["combined"] = "simfluence.attribution.combined:CombinedSimulator"
#: static methods through dattri (`simfluence.attribution.static`)
for _name, _cls in [
    ("trak", "TRAKSimulator"),
    ("logra", "LoGraSimulator"),
    ("if-ekfac", "EKFACSimulator"),
    ("if-explicit", "ExplicitIFSimulator"),
    ("if-cg", "CGIFSimulator"),
]:
    _LAZY[_name] = f"simfluence.attribution.static:{_cls}"


def available_simulators() -> list[str]:
    """Every simulator name, core first."""
    return [*_CORE, *_LAZY]


def simulator_class(name: str) -> type[Simulator]:
    """The class registered under `name`; `SimfluenceError` listing the known names otherwise."""
    if name in _CORE:
        return _CORE[name]
    if name in _LAZY:
        return load_reference(_LAZY[name], f"method {name!r}")
    raise SimfluenceError(
        f"unknown method {name!r}; known methods: {', '.join(available_simulators())}"
    )


def make_simulator(name: str, **params: object) -> Simulator:
    """A fresh, unfitted simulator of method `name`."""
    return simulator_class(name)(**params)


def simulator_params(name: str) -> tuple[str, ...]:
    """The constructor parameters that method `name` takes."""
    return tuple(simulator_class(name)._param_names())


def configure_simulator(
    name: str, /, *, defaults: Mapping[str, object] | None = None, **options: object
) -> Simulator:
    """A fresh simulator of method `name` with `options` (None leaves a parameter at the
    method's default).

    Raises `SimfluenceError` naming the method, the parameters it does not take and the ones it
    does (as scikit-learn's ``set_params``): an option is never dropped without a word.
    `defaults` are the caller's own defaults for many methods at once (e.g. ``{"unseen":
    "prior"}`` for an evaluation of several methods): each reaches only the methods that take
    it, and `options` win over them.
    """
    taken = simulator_params(name)
    invalid = sorted(set(options) - set(taken))
    if invalid:
        s = "s" if len(invalid) > 1 else ""
        raise SimfluenceError(
            f"invalid parameter{s} {', '.join(map(repr, invalid))} for method {name!r}; valid "
            f"parameters are: {', '.join(taken) if taken else 'none'}"
        )
    chosen = {k: v for k, v in (defaults or {}).items() if k in taken and v is not None}
    chosen |= {k: v for k, v in options.items() if v is not None}
    return simulator_class(name)(**chosen)


def load_simulator(path: str | os.PathLike[str]) -> Simulator:
    """Load a simulator written by `Simulator.save`; the class is chosen by its method name."""
    path = Path(path)
    if not path.is_file():
        raise SimfluenceError(f"{path}: no such simulator file")
    data = read_npz(path, what="a simfluence simulator file")
    if "__meta__" not in data:
        raise SimfluenceError(f"{path}: not a simfluence simulator file (no '__meta__')")
    meta = loads_json(str(data.pop("__meta__")), str(path))
    if not isinstance(meta, dict):
        raise SimfluenceError(f"{path}: not a simfluence simulator file (its header is no object)")
    arrays = data
    if meta.get("format") != MODEL_FORMAT or meta.get("schema_version") != MODEL_SCHEMA_VERSION:
        raise SimfluenceError(
            f"{path}: unsupported simulator file (format {meta.get('format')!r}, "
            f"schema_version {meta.get('schema_version')!r})"
        )
    with refuse_malformed(path):
        try:
            cls = simulator_class(meta["method"])
        except SimfluenceError as exc:
            raise SimfluenceError(f"{path}: {exc}") from None
        simulator = cls(**meta["params"])
        for key, value in {**meta["learned"], **arrays}.items():
            setattr(simulator, key, value)
    return simulator
