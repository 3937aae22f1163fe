"""Growing a fitted featurized or hybrid simulator by `extend`: training and test examples that
no recorded run holds, simulated from their features (and the calibration's fold copies grown
alike, for the intervals of attributions)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Self

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.simulators.featurized.effects import Effects, _FeatureEffects


class _ExtendableEffects(_FeatureEffects):
    """`_FeatureEffects` that `extend` grows with new training and test examples."""

    def extend(
        self,
        train_ids: Sequence[str] = (),
        train_features: np.ndarray | None = None,
        test_ids: Sequence[str] = (),
        test_features: np.ndarray | None = None,
        test_initial_loss: np.ndarray | None = None,
    ) -> Self:
        """A copy that also simulates training and test examples that no recorded run holds.

        Args:
            train_ids: ``m`` new training ids; train_features: ``(m, d)``.
            test_ids: ``m'`` new test ids; test_features: ``(m', d')``; test_initial_loss:
                ``(m',)``, their loss before training (their default starting point).

        New training examples get their featurized effects on every test example; new test
        examples get coefficients predicted from their features (``test_map_``). Columns and
        rows are appended after the existing ones. Raises `SimfluenceError` for a known or
        repeated id, a missing array, a wrong shape or a non-finite value.
        """
        self._check_fitted()
        new = copy.copy(self)
        train_ids = [str(i) for i in train_ids]
        test_ids = [str(i) for i in test_ids]
        _check_new_ids(train_ids, self.train_ids_, "training")
        _check_new_ids(test_ids, self.test_ids_, "test")
        basis, test_basis = self._train_basis(), self._test_basis()
        x = _check_rows(train_features, len(train_ids), len(basis.mean), "train_features")
        y = _check_rows(test_features, len(test_ids), len(test_basis.mean), "test_features")
        initial = _check_rows(
            None if test_initial_loss is None else np.reshape(test_initial_loss, (-1, 1)),
            len(test_ids),
            1,
            "test_initial_loss",
        ).ravel()
        if train_ids:
            new._add_training(train_ids, basis(x))
        if test_ids:
            new._add_tests(test_ids, test_basis(y), initial)
        return new

    def _add_training(self, ids: list[str], phi: np.ndarray) -> None:
        """Append training examples with projected features `phi` ``(m, K)`` (see `extend`)."""
        added = self._effects(self.coef_A_, self.coef_B_, phi)
        self._set_effects(_join(self._current_effects(), added, axis=1))
        folds = zip(
            self._fold_effects(),
            getattr(self, "fold_coef_A_", []),
            getattr(self, "fold_coef_B_", []),
            strict=True,
        )
        self._set_fold_effects(
            [_join(old, self._effects(ca, cb, phi), axis=1) for old, ca, cb in folds]
        )
        self.features_ = np.vstack([self.features_, phi])
        self.train_ids_ = [*self.train_ids_, *ids]
        self.seen_ = np.concatenate([self.seen_, np.ones(len(ids), dtype=bool)])
        self.consumed_ = np.concatenate([self.consumed_, np.zeros(len(ids), dtype=bool)])

    def _add_tests(self, ids: list[str], psi: np.ndarray, initial: np.ndarray) -> None:
        """Append test examples with projected features `psi` ``(m', K')`` and losses before
        training `initial` ``(m',)`` (see `extend`)."""
        J = self.coef_A_.shape[1]
        coef = psi @ self.test_map_
        rows = self._effects(coef[:, :J], coef[:, J:], self.features_)
        self._set_effects(_join(self._current_effects(), rows, axis=0))
        fold_maps = getattr(self, "fold_test_map_", [])
        self._set_fold_effects(
            [
                _join(old, self._effects(c[:, :J], c[:, J:], self.features_), axis=0)
                for old, c in zip(self._fold_effects(), (psi @ m for m in fold_maps), strict=True)
            ]
        )
        if len(fold_maps):
            self.fold_coef_A_ = np.concatenate([self.fold_coef_A_, psi @ fold_maps[:, :, :J]], 1)
            self.fold_coef_B_ = np.concatenate([self.fold_coef_B_, psi @ fold_maps[:, :, J:]], 1)
        self.coef_A_ = np.vstack([self.coef_A_, coef[:, :J]])
        self.coef_B_ = np.vstack([self.coef_B_, coef[:, J:]])
        self.test_features_ = np.vstack([self.test_features_, psi])
        self._add_test_bounds(initial)
        self.test_ids_ = [*self.test_ids_, *ids]
        self.initial_loss_ = np.concatenate([self.initial_loss_, initial])

    def _add_test_bounds(self, initial: np.ndarray) -> None:
        """Floor, envelope and calibration columns of new test examples (nothing recorded):
        a floor at ``min(0, initial)`` with the recorded examples' typical bend, no trust-region
        bound, and intervals with the median scale and no residuals (see the class docstring)."""
        M = len(self.test_ids_)
        floor = np.broadcast_to(np.asarray(self.floor_, dtype=np.float64), (M,))
        width = np.broadcast_to(np.asarray(self.floor_width_, dtype=np.float64), (M,))
        room = self.initial_loss_ - floor
        ratio = np.median(np.divide(width, room, out=np.zeros(M), where=room > 0))
        new_floor = np.minimum(0.0, initial)
        self.floor_ = np.concatenate([floor, new_floor])
        self.floor_width_ = np.concatenate([width, ratio * (initial - new_floor)])
        envelope = getattr(self, "envelope_", None)
        if envelope is not None:
            unknown = np.full((len(envelope), len(initial)), -np.inf)
            self.envelope_ = np.hstack([envelope, unknown])
        if self.is_calibrated:
            residuals = self.calibration_residuals_
            missing = np.full((*residuals.shape[:2], len(initial)), np.nan, residuals.dtype)
            self.calibration_residuals_ = np.concatenate([residuals, missing], axis=2)
            scale = np.asarray(self.calibration_scale_)
            typical = getattr(self, "new_test_scale_", None)
            if typical is None:  # calibrated without fold copies: a typical recorded example
                typical = np.median(scale, axis=1)
            typical = np.repeat(np.asarray(typical)[:, None], len(initial), axis=1)
            self.calibration_scale_ = np.hstack([scale, typical])

    def _current_effects(self) -> Effects:
        return self.A_, self.B_, self.A_slope_, self.B_slope_

    def _fold_effects(self) -> list[Effects]:
        """The effects of the calibration's fold copies (empty when not calibrated)."""
        if getattr(self, "fold_coef_A_", None) is None:
            return []
        stacks = [getattr(self, f"fold_{n}_", None) for n in ("A", "B", "A_slope", "B_slope")]
        return [
            (stacks[0][k], stacks[1][k], *(None if s is None else s[k] for s in stacks[2:]))
            for k in range(len(self.fold_coef_A_))
        ]

    def _set_fold_effects(self, effects: list[Effects]) -> None:
        if not effects:
            return
        for n, name in enumerate(("A", "B", "A_slope", "B_slope")):
            if effects[0][n] is not None:
                stacked = np.stack([e[n] for e in effects]).astype(np.float32)
                setattr(self, f"fold_{name}_", stacked)


def _join(old: Effects, added: Effects, axis: int) -> Effects:
    joined = [
        None if a is None else np.concatenate([a, b], axis=axis)
        for a, b in zip(old, added, strict=True)
    ]
    return joined[0], joined[1], joined[2], joined[3]


def _check_new_ids(ids: list[str], known: Sequence[str], side: str) -> None:
    known_set = set(known)
    seen: set[str] = set()
    for example_id in ids:
        if example_id in known_set:
            raise SimfluenceError(f"{side} id {example_id!r} is already known to the simulator")
        if example_id in seen:
            raise SimfluenceError(f"{side} id {example_id!r} is given twice")
        seen.add(example_id)


def _check_rows(array: np.ndarray | None, rows: int, dim: int, what: str) -> np.ndarray:
    if rows == 0:
        return np.zeros((0, dim))
    if array is None:
        raise SimfluenceError(f"{what}: required for the {rows} new ids")
    array = np.asarray(array, dtype=np.float64)
    if array.shape != (rows, dim):
        raise SimfluenceError(f"{what}: shape {array.shape}, expected ({rows}, {dim})")
    if not np.isfinite(array).all():
        raise SimfluenceError(f"{what}: holds NaN or infinite values")
    return array
