"""In-memory run logs: a `Run` is one recorded training run, a `RunSet` many runs over one pool.

Shapes: a run with ``T`` steps over ``M`` test examples has ``losses`` of shape ``(T + 1, M)``:
row 0 is the loss before training, row ``t`` the loss after consuming batch ``t`` (1-based).
Its ``curriculum`` is a list of ``T`` batches; a batch is a list of training ids (a multiset:
an id may repeat, and batches may differ in size).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from simfluence.errors import CurriculumError, RunLogError

if TYPE_CHECKING:
    from simfluence.runlog.features import ExampleFeatures

Curriculum = list[list[str]]
#: a curriculum as users give it: batches of str or int ids
AnyCurriculum = Sequence[Sequence[Any]]


def normalize_curriculum(batches: Iterable[Iterable[Any]], where: str = "curriculum") -> Curriculum:
    """Turn a curriculum given with int or str ids into a list of lists of str ids.

    Raises `CurriculumError` naming the step for a batch that is not a list, or is empty.
    """
    if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
        raise CurriculumError(f"{where}: expected a list of batches (lists of training ids)")
    out: Curriculum = []
    for step, batch in enumerate(batches, start=1):
        if isinstance(batch, str | bytes) or not isinstance(batch, Iterable):
            raise CurriculumError(
                f"{where}: step {step}: a batch must be a list of training ids, got {batch!r}"
            )
        ids = [str(i) for i in batch]
        if not ids:
            raise CurriculumError(f"{where}: step {step}: empty batch")
        out.append(ids)
    if not out:
        raise CurriculumError(f"{where}: the curriculum has no steps")
    return out


def check_curriculum(batches: Sequence[Sequence[Any]], where: str = "curriculum") -> None:
    """Raise `CurriculumError` unless `batches` is a non-empty list of non-empty batches."""
    if isinstance(batches, str | bytes) or not isinstance(batches, Sequence) or not batches:
        raise CurriculumError(f"{where}: expected a non-empty list of batches")
    for step, batch in enumerate(batches, start=1):
        if isinstance(batch, str | bytes) or not isinstance(batch, Sequence):
            raise CurriculumError(
                f"{where}: step {step}: a batch must be a list of training ids, got {batch!r}"
            )
        if not batch:
            raise CurriculumError(f"{where}: step {step}: empty batch")


def count_matrix(
    curriculum: Sequence[Sequence[Any]], index: dict[str, int], where: str = "curriculum"
) -> sparse.csr_matrix:
    """The batch count matrix ``N``, shape ``(T, P)``: ``N[t-1, i]`` = times id ``i`` is in batch t.

    Ids may be str or int (looked up as str). Raises `CurriculumError` naming the first id not
    in `index`, with its step.
    """
    lengths = [len(batch) for batch in curriculum]
    try:  # fast path: every id is a known string
        cols = [index[train_id] for batch in curriculum for train_id in batch]
    except (KeyError, TypeError):
        cols = []
        for step, batch in enumerate(curriculum, start=1):
            for train_id in batch:
                col = index.get(str(train_id))
                if col is None:
                    raise CurriculumError(
                        f"{where}: step {step}: unknown training id {str(train_id)!r}"
                    ) from None
                cols.append(col)
    indptr = np.zeros(len(curriculum) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    data = np.ones(len(cols), dtype=np.float64)
    matrix = sparse.csr_matrix(
        (data, np.asarray(cols, dtype=np.int64), indptr), shape=(len(curriculum), len(index))
    )
    matrix.sum_duplicates()  # a repeated id in a batch counts twice
    return matrix


@dataclass
class Run:
    """One recorded training run.

    Attributes:
        run_id: unique within its run set.
        curriculum: ``T`` batches of training ids, the batch consumed at step ``t`` at index
            ``t - 1``.
        losses: shape ``(T + 1, M)``, float64; row 0 is before training.
        seed: the seed that drew the curriculum, when known.
        lr: shape ``(T,)``, the learning rate of each step, or None when unknown.
        metadata: free-form JSON-able metadata (workload, model, config).
        observed: shape ``(T + 1, M)`` bool, which losses were scored (a sparse recording,
            ``record --score-every`` / ``--score-fraction``), or None when every loss was
            (the usual case; a mask with no gap is turned into None). Where it is False the
            loss is unknown and ``losses`` holds NaN there, so code that ignores the mask
            fails loudly instead of using a made-up number. Row 0 must be fully observed.
            `mask` is the full boolean array either way.
    """

    run_id: str
    curriculum: Curriculum
    losses: np.ndarray
    seed: int | None = None
    lr: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    observed: np.ndarray | None = None
    #: ``(T + 1, M)`` bool, True where ``losses`` holds an imputed value rather than a
    #: recorded one (the complete runs `simulators.gaps` fits on); None: none. Not stored.
    imputed: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.run_id = str(self.run_id)
        self.losses = np.asarray(self.losses, dtype=np.float64)
        if self.lr is not None:
            self.lr = np.asarray(self.lr, dtype=np.float64)
        if self.observed is not None:
            observed = np.asarray(self.observed, dtype=bool)
            if observed.shape == self.losses.shape and observed.all():
                self.observed = None  # nothing missing: a complete run, as it always was
            else:
                self.observed = observed
                if observed.shape == self.losses.shape:
                    self.losses = np.where(observed, self.losses, np.nan)

    @property
    def recorded_losses(self) -> np.ndarray:
        """``losses`` with NaN where a value was imputed, not recorded (what a score may
        compare with: the metrics ignore NaN truths)."""
        if self.imputed is None:
            return self.losses
        return np.where(self.imputed, np.nan, self.losses)

    @property
    def complete(self) -> bool:
        """Whether every loss was observed (no mask)."""
        return self.observed is None

    @property
    def mask(self) -> np.ndarray:
        """``(T + 1, M)`` bool: True where the loss was observed (all True for a complete run)."""
        if self.observed is None:
            return np.ones(self.losses.shape, dtype=bool)
        return self.observed

    @property
    def n_steps(self) -> int:
        """``T``, the number of training steps."""
        return len(self.curriculum)

    @property
    def initial_loss(self) -> np.ndarray:
        """The loss of every test example before training, shape ``(M,)``."""
        return self.losses[0]


def default_holdout(n_runs: int) -> int:
    """How many runs to hold out when the user says nothing: the GPTfluence protocol holds out
    5 of 32 runs, so about 1 in 6, at least 1."""
    return max(1, round(n_runs * 5 / 32))


@dataclass
class RunSet:
    """Many runs that share one pool of training ids and one list of test ids.

    Attributes:
        train_ids: the pool, length ``P``; ids are strings.
        test_ids: the test examples, length ``M``; column ``j`` of every run's losses is
            ``test_ids[j]``.
        runs: the runs, in the order they were recorded or loaded.
        metadata: free-form metadata of the whole set.
        source: the directory it was loaded from, if any (where checkpoints live).
        features: one vector per training and test example (`ExampleFeatures`), or None;
            loaded from ``DIR/features.npz`` when present. Featurized simulators need them.
    """

    train_ids: list[str]
    test_ids: list[str]
    runs: list[Run] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)
    features: ExampleFeatures | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.train_ids = [str(i) for i in self.train_ids]
        self.test_ids = [str(i) for i in self.test_ids]

    @property
    def complete(self) -> bool:
        """Whether every run observed every loss (no sparse scoring)."""
        return all(run.observed is None for run in self.runs)

    @property
    def train_index(self) -> dict[str, int]:
        """Training id -> column in count matrices."""
        return {train_id: col for col, train_id in enumerate(self.train_ids)}

    @property
    def run_ids(self) -> list[str]:
        return [run.run_id for run in self.runs]

    def run(self, run_id: str) -> Run:
        """The run with this id; `RunLogError` if there is none."""
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise RunLogError(f"no run {run_id!r} in this run set (runs: {_preview(self.run_ids)})")

    def subset(self, run_ids: Sequence[str]) -> RunSet:
        """A run set holding only the named runs, in the given order."""
        runs = [self.run(r) for r in run_ids]
        return RunSet(
            self.train_ids, self.test_ids, runs, self.metadata, self.source, self.features
        )

    def select_tests(self, columns: Sequence[int] | np.ndarray) -> RunSet:
        """A run set with only the given test columns (in that order) of every run's losses.

        Test examples are independent in every simulator of the Simfluence-Linear family, so
        a fit can be split over them (`simfluence.simulators.sharded`).
        """
        cols = np.asarray(columns, dtype=np.int64)
        runs = [
            Run(
                r.run_id,
                r.curriculum,
                r.losses[:, cols],
                r.seed,
                r.lr,
                r.metadata,
                None if r.observed is None else r.observed[:, cols],
                None if r.imputed is None else r.imputed[:, cols],
            )
            for r in self.runs
        ]
        test_ids = [self.test_ids[c] for c in cols]
        return RunSet(self.train_ids, test_ids, runs, self.metadata, self.source)

    def split(self, heldout: int | Sequence[str]) -> tuple[RunSet, RunSet]:
        """``(train, heldout)`` by whole runs.

        Args:
            heldout: a number ``H`` (the last ``H`` runs by sorted run id are held out) or the
                explicit list of held-out run ids.
        """
        ordered = sorted(self.run_ids)
        if isinstance(heldout, int):
            if not 0 < heldout < len(ordered):
                raise RunLogError(
                    f"--holdout {heldout}: must be between 1 and {len(ordered) - 1} "
                    f"(the run set has {len(ordered)} runs)"
                )
            held = ordered[-heldout:]
        else:
            held = [str(r) for r in heldout]
            for run_id in held:
                self.run(run_id)
            if len(held) >= len(ordered):
                raise RunLogError("no training runs left after holding out the given runs")
        train = [r for r in ordered if r not in set(held)]
        return self.subset(train), self.subset(held)

    def validate(self, source: str = "run set") -> RunSet:
        """Check every invariant; `RunLogError` names the run, step or field. Returns self."""
        _check_unique(self.train_ids, f"{source}: train_ids")
        _check_unique(self.test_ids, f"{source}: test_ids")
        if not self.test_ids:
            raise RunLogError(f"{source}: test_ids is empty")
        index = self.train_index
        seen: dict[str, int] = {}
        for position, run in enumerate(self.runs):
            if run.run_id in seen:
                raise RunLogError(
                    f"{source}: duplicate run id {run.run_id!r} (runs #{seen[run.run_id]} "
                    f"and #{position})"
                )
            seen[run.run_id] = position
            validate_run(run, index, len(self.test_ids), self.test_ids, source)
        return self


def validate_run(
    run: Run, index: dict[str, int], n_tests: int, test_ids: Sequence[str], source: str
) -> None:
    """Check one run against its pool and test list; raise `RunLogError` on the first fault."""
    where = f"{source}: run {run.run_id!r}"
    losses = run.losses
    if losses.ndim != 2 or losses.shape[1] != n_tests:
        raise RunLogError(
            f"{where}: losses have shape {losses.shape}, expected (steps + 1, {n_tests})"
        )
    if losses.shape[0] != run.n_steps + 1:
        raise RunLogError(
            f"{where}: {run.n_steps} batches but {losses.shape[0]} loss rows "
            f"(expected steps + 1 = {run.n_steps + 1}, row 0 being before training)"
        )
    if run.n_steps == 0:
        raise RunLogError(f"{where}: the run has no training steps")
    if run.observed is not None:
        if run.observed.shape != losses.shape:
            raise RunLogError(
                f"{where}: observed mask has shape {run.observed.shape}, expected {losses.shape}"
            )
        if not run.observed[0].all():
            col = int(np.argmin(run.observed[0]))
            raise RunLogError(
                f"{where}: step 0: loss of test example {test_ids[col]!r} is missing (the loss "
                "before training must be observed: every rollout starts from it)"
            )
    bad = ~np.isfinite(losses) & run.mask
    if bad.any():
        step, col = (int(v) for v in np.argwhere(bad)[0])
        raise RunLogError(
            f"{where}: step {step}: loss of test example {test_ids[col]!r} is {losses[step, col]}"
        )
    for step, batch in enumerate(run.curriculum, start=1):
        if not batch:
            raise RunLogError(f"{where}: step {step}: empty batch")
        for train_id in batch:
            if train_id not in index:
                raise RunLogError(
                    f"{where}: step {step}: training id {train_id!r} is not in the pool"
                )
    if run.lr is not None and run.lr.shape != (run.n_steps,):
        raise RunLogError(f"{where}: lr has shape {run.lr.shape}, expected ({run.n_steps},)")


def _check_unique(ids: Sequence[str], where: str) -> None:
    counts = Counter(ids)
    dupes = [i for i, c in counts.items() if c > 1]
    if dupes:
        raise RunLogError(f"{where}: duplicate ids {_preview(dupes)}")


def _preview(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
