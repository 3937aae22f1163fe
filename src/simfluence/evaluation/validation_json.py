"""Reading back the JSON that `simfluence validate --json` writes (torch-free).

The layout (written by `simfluence.recording.validation.validate`):

    {"description": str (optional),
     "kinds": {KIND: {"curricula": int,
                      "methods": {NAME: {"all_steps_mse", "final_step_spearman", "lds",
                                         "coverage_90", "mean_final_in_interval", ...}}},
               LOO_KIND: {"removal", "runs", "examples", "groups", "retrains",
                          "methods": {NAME: {"loo_spearman", ... } or {"error": str}},
                          "additive_ceiling_lds" (optional)}},
     "optimized": {...} (optional),
     "warnings": {NAME: [str, ...]} (optional),
     "timing": {"seconds", KIND: {...}} (optional)}

A leave-one-out kind is told apart by its ``"removal"`` key. `read_validation` is the one place
that knows this layout; the text tables (`format_validation`) and the HTML report read it
through `Validation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from simfluence.errors import SimfluenceError

_TOP_KEYS = ("kinds", "optimized", "description")


@dataclass
class ValidationKind:
    """One kind of counterfactual: its per-method scores and the rest of its block."""

    name: str
    #: method -> its scores (a non-dict entry reads as ``{}``); None: the block has no table
    methods: dict[str, dict[str, Any]] | None
    #: the block's other keys (``curricula``, or the leave-one-out kinds' ``removal``, ...)
    info: dict[str, Any] = field(default_factory=dict)
    #: the block itself, when it is not a dict
    raw: Any = None

    @property
    def is_loo(self) -> bool:
        """A leave-one-out kind (effects of removing examples), not a curriculum kind."""
        return "removal" in self.info


@dataclass
class Validation:
    kinds: list[ValidationKind] = field(default_factory=list)
    optimized: Any = None
    description: str | None = None
    #: method -> what it says about its own validity
    warnings: dict[str, list[str]] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    #: every top-level key other than ``kinds``, ``optimized`` and ``description``
    rest: dict[str, Any] = field(default_factory=dict)
    #: whether the JSON had a ``kinds`` object at all
    has_kinds: bool = False


def read_validation(data: Mapping[str, Any], where: str = "validation") -> Validation:
    """`data`, a validation JSON object, read into a `Validation` (lenient: missing parts read
    as empty; only a non-object raises `SimfluenceError`)."""
    if not isinstance(data, Mapping):
        raise SimfluenceError(f"{where}: expected a JSON object")
    kinds = data.get("kinds")
    out = Validation(
        optimized=data.get("optimized"),
        description=data["description"] if isinstance(data.get("description"), str) else None,
        warnings=dict(data.get("warnings") or {}),
        timing=dict(data.get("timing") or {}),
        rest={k: v for k, v in data.items() if k not in _TOP_KEYS},
        has_kinds=isinstance(kinds, dict),
    )
    if isinstance(kinds, dict):
        out.kinds = [_kind(name, body) for name, body in kinds.items()]
    return out


def _kind(name: str, body: Any) -> ValidationKind:
    if not isinstance(body, dict):
        return ValidationKind(name, None, raw=body)
    methods = body.get("methods")
    info = {k: v for k, v in body.items() if k != "methods"}
    if not isinstance(methods, dict):
        return ValidationKind(name, None, info, raw=body)
    scores = {m: s if isinstance(s, dict) else {} for m, s in methods.items()}
    return ValidationKind(name, scores, info, raw=body)
