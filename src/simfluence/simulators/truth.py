"""The oracle of synthetic run sets: rolls out with the true parameters in ``truth.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runlog.runs import RunSet
from simfluence.simulators.dynamics import DynamicsSimulator


class TruthSimulator(DynamicsSimulator):
    """The true parameters of a synthetic run set: the best any simulator can hope for.

    Parameters:
        path: the ``truth.npz`` written next to the synthetic run set.
    """

    name = "truth"

    def __init__(
        self, path: str = "", unseen: str = "prior", batch_weighting: str = "mean"
    ) -> None:
        super().__init__(unseen=unseen, batch_weighting=batch_weighting)
        self.path = path

    def _fit_parameters(self, runs: RunSet) -> None:
        if not Path(self.path).is_file():
            raise SimfluenceError(
                f"truth: {self.path or '(no path)'} not found; only synthetic run sets have one"
            )
        with np.load(self.path, allow_pickle=False) as data:
            self.A_, self.B_ = data["A"], data["B"]
        if self.A_.shape != (len(runs.test_ids), len(runs.train_ids)):
            raise SimfluenceError(f"truth: {self.path} does not match this run set's pool/tests")
        self.seen_ = np.ones(len(runs.train_ids), dtype=bool)
