"""Curricula: random ones in the paper's protocol, and counterfactual edits of a curriculum.

A curriculum is a list of ``T`` batches; a batch is a list of training ids.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from simfluence.errors import CurriculumError, SimfluenceError


def random_curriculum(
    pool_ids: Sequence[str],
    per_run: int,
    batch_size: int,
    epochs: int,
    rng: np.random.Generator,
) -> list[list[str]]:
    """The paper's protocol: draw `per_run` of the pool without replacement, then for each epoch
    reshuffle them and cut consecutive batches of `batch_size` (the last one may be smaller).

    Returns ``epochs * ceil(per_run / batch_size)`` batches.
    """
    if not 0 < per_run <= len(pool_ids):
        raise SimfluenceError(
            f"--per-run {per_run}: must be between 1 and the pool size {len(pool_ids)}"
        )
    if batch_size < 1 or epochs < 1:
        raise SimfluenceError("--batch and --epochs must be at least 1")
    chosen = rng.choice(len(pool_ids), size=per_run, replace=False)
    batches: list[list[str]] = []
    for _ in range(epochs):
        order = rng.permutation(chosen)
        for start in range(0, per_run, batch_size):
            batches.append([str(pool_ids[i]) for i in order[start : start + batch_size]])
    return batches


# -- counterfactual edits -----------------------------------------------------------------------
# Pure functions: each takes a curriculum (``T`` batches of training ids) and returns a new one;
# the input is never modified. Ids are compared as strings. Each raises `CurriculumError` for
# ids that are not in the curriculum (or, where a pool is given, not in the pool) and for edits
# that would leave no training step.


def _as_curriculum(curriculum: Sequence[Sequence[Any]]) -> list[list[str]]:
    out = [[str(i) for i in batch] for batch in curriculum]
    if not out or not all(out):
        raise CurriculumError(
            "the curriculum to edit must be a non-empty list of non-empty batches"
        )
    return out


def _id_list(ids: Iterable[Any] | str, what: str) -> list[str]:
    listed = [ids] if isinstance(ids, str) else [str(i) for i in ids]
    if not listed:
        raise CurriculumError(f"{what}: no training ids given")
    return listed


def _check_present(curriculum: list[list[str]], ids: Iterable[str], what: str) -> None:
    present = {i for batch in curriculum for i in batch}
    absent = [i for i in ids if i not in present]
    if absent:
        shown = ", ".join(repr(i) for i in absent[:5])
        raise CurriculumError(f"{what}: training id(s) {shown} never occur in the curriculum")


def remove(curriculum: Sequence[Sequence[Any]], ids: Iterable[Any] | str) -> list[list[str]]:
    """Drop every occurrence of `ids`. A batch left empty is dropped, so the result may have
    fewer steps (the later batches move one step earlier); the other batches keep their order.

    Raises `CurriculumError` if an id never occurs, or if nothing would be left to train on.
    """
    batches = _as_curriculum(curriculum)
    dropped = set(_id_list(ids, "remove"))
    _check_present(batches, dropped, "remove")
    out = [kept for batch in batches if (kept := [i for i in batch if i not in dropped])]
    if not out:
        raise CurriculumError("remove: removing these ids leaves an empty curriculum")
    return out


def add(
    curriculum: Sequence[Sequence[Any]],
    ids: Iterable[Any] | str,
    batch_size: int,
    position: str | int = "end",
    pool: Collection[str] | None = None,
) -> list[list[str]]:
    """Insert new batches made of `ids` (in the given order, cut into batches of `batch_size`,
    the last one may be smaller). `position` is ``"end"``, ``"start"`` or a step ``k`` in
    ``0..T``: the new batches follow the first ``k`` batches (``k = 0`` is the start).

    With `pool`, ids outside the pool are rejected here; otherwise the simulator rejects them.
    """
    batches = _as_curriculum(curriculum)
    new = _id_list(ids, "add")
    if batch_size < 1:
        raise CurriculumError(f"add: batch size must be at least 1, got {batch_size}")
    if pool is not None:
        unknown = [i for i in new if i not in pool]
        if unknown:
            raise CurriculumError(f"add: unknown training id {unknown[0]!r} (not in the pool)")
    at = {"end": len(batches), "start": 0}.get(position) if isinstance(position, str) else position
    if at is None or not 0 <= at <= len(batches):
        raise CurriculumError(
            f"add: position {position!r} must be 'start', 'end' or a step in 0..{len(batches)}"
        )
    inserted = [new[s : s + batch_size] for s in range(0, len(new), batch_size)]
    return batches[:at] + inserted + batches[at:]


def repeat(
    curriculum: Sequence[Sequence[Any]], ids: Iterable[Any] | str, times: int
) -> list[list[str]]:
    """Every occurrence of each of `ids` is consumed `times` times in its batch (the batch grows
    by ``times - 1`` copies per occurrence; ``times = 1`` changes nothing). Use `remove` for 0."""
    batches = _as_curriculum(curriculum)
    chosen = set(_id_list(ids, "repeat"))
    if times < 1:
        raise CurriculumError(f"repeat: times must be at least 1 (use remove for 0), got {times}")
    _check_present(batches, chosen, "repeat")
    return [[i for i in batch for _ in range(times if i in chosen else 1)] for batch in batches]


def _recut(flat: Sequence[str], sizes: Sequence[int]) -> list[list[str]]:
    bounds = np.cumsum([0, *sizes])
    return [list(flat[a:b]) for a, b in pairwise(bounds)]


def reorder(curriculum: Sequence[Sequence[Any]], rng: np.random.Generator | int) -> list[list[str]]:
    """The same multiset of ids in a new random order, cut into batches of the same sizes as
    the original (step ``t`` keeps its batch size). `rng`: a generator or an int seed."""
    batches = _as_curriculum(curriculum)
    generator = np.random.default_rng(rng) if isinstance(rng, int) else rng
    flat = [i for batch in batches for i in batch]
    order = generator.permutation(len(flat))
    return _recut([flat[k] for k in order], [len(b) for b in batches])


def sort_by(
    curriculum: Sequence[Sequence[Any]], scores: Mapping[str, float], descending: bool = False
) -> list[list[str]]:
    """The same multiset of ids ordered by `scores` (ascending: highest score last, e.g. the
    hardest examples at the end), cut into batches of the original sizes. The sort is stable.

    Raises `CurriculumError` naming an id of the curriculum that has no score.
    """
    batches = _as_curriculum(curriculum)
    flat = [i for batch in batches for i in batch]
    missing = [i for i in flat if i not in scores]
    if missing:
        raise CurriculumError(f"sort_by: no score for training id {missing[0]!r}")
    ordered = sorted(flat, key=lambda i: float(scores[i]), reverse=descending)
    return _recut(ordered, [len(b) for b in batches])


def truncate(curriculum: Sequence[Sequence[Any]], steps: int) -> list[list[str]]:
    """The first `steps` batches (``1 <= steps <= T``)."""
    batches = _as_curriculum(curriculum)
    if not 1 <= steps <= len(batches):
        raise CurriculumError(
            f"truncate: steps must be between 1 and the curriculum's {len(batches)} steps, "
            f"got {steps}"
        )
    return batches[:steps]


# -- edit specs ---------------------------------------------------------------------------------
#: operations of an edit spec, by name
EDIT_OPS = ("remove", "add", "repeat", "reorder", "sort_by", "truncate")


def apply_edits(
    curriculum: Sequence[Sequence[Any]],
    spec: Sequence[Mapping[str, Any]],
    pool: Collection[str] | None = None,
) -> list[list[str]]:
    """Apply a JSON edit spec: a list of operations, applied in order. Each is an object with
    ``"op"`` and that operation's arguments, e.g.::

        [{"op": "remove", "ids": ["a", "b"]},
         {"op": "repeat", "ids": ["c"], "times": 2},
         {"op": "add", "ids": ["d", "e"], "batch_size": 4, "position": "end"},
         {"op": "reorder", "seed": 0},
         {"op": "sort_by", "scores": {"a": 1.0, ...}, "descending": false},
         {"op": "truncate", "steps": 50}]

    Raises `CurriculumError` naming the operation at fault.
    """
    if isinstance(spec, Mapping) or not isinstance(spec, Sequence):
        raise CurriculumError("edit spec: expected a list of operations ({'op': ..., ...})")
    out = _as_curriculum(curriculum)
    for k, edit in enumerate(spec, start=1):
        if not isinstance(edit, Mapping) or edit.get("op") not in EDIT_OPS:
            raise CurriculumError(
                f"edit spec: operation #{k}: expected an object whose 'op' is one of {EDIT_OPS}"
            )
        try:
            out = _apply_one(out, edit, pool)
        except CurriculumError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CurriculumError(
                f"edit spec: operation #{k} ({edit['op']}): bad arguments ({exc!r})"
            ) from None
    return out


def _apply_one(
    curriculum: list[list[str]], edit: Mapping[str, Any], pool: Collection[str] | None
) -> list[list[str]]:
    op = edit["op"]
    if op == "remove":
        return remove(curriculum, edit["ids"])
    if op == "add":
        return add(
            curriculum, edit["ids"], int(edit["batch_size"]), edit.get("position", "end"), pool
        )
    if op == "repeat":
        return repeat(curriculum, edit["ids"], int(edit["times"]))
    if op == "reorder":
        return reorder(curriculum, int(edit.get("seed", 0)))
    if op == "sort_by":
        return sort_by(curriculum, edit["scores"], bool(edit.get("descending", False)))
    return truncate(curriculum, int(edit["steps"]))
