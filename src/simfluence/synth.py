"""Synthetic run sets drawn from a known Simfluence-Linear process, with their true parameters.

The process (per test example ``z``, independently) is Simfluence-Linear with multiplicative
log-normal process noise, so losses stay positive:

    L_t = (alpha_t L_{t-1} + beta_t) * exp(noise * eps_t - noise^2 / 2),  eps_t ~ N(0, 1).

Its parameters mimic a classification task with latent classes:
* every training example and test example has a class; an example *helps* test examples of its
  own class most: it moves the loss a fraction ``s`` of the way to the test example's floor,
  ``A_i = (1 - s) / b``, ``B_i = s * floor / b``, with ``s ~ U(0.03, 0.12)`` for the same class
  and ``U(0, 0.01)`` otherwise (so a batch of ``b`` examples decreases the loss on average);
* a few "mislabeled" examples (``harmful`` of the pool) add a spike ``U(0.3, 1.0) * L_0 / b``
  to test examples of their class.

Example features (``DIR/features.npz``, for featurized simulators) play a frozen encoder that
knows the class but not the rest: the one-hot class plus ``N(0, feature_noise^2)`` noise, and 8
dimensions of pure noise. They reveal neither which examples are mislabeled nor how strongly
each example helps, so only a simulator that also learns per-example effects can know those.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from simfluence._atomic import save_npz_atomic
from simfluence.curricula import random_curriculum
from simfluence.errors import SimfluenceError
from simfluence.runlog.features import ExampleFeatures
from simfluence.runlog.layout import TRUTH_FILE
from simfluence.runlog.runs import Run, RunSet, count_matrix
from simfluence.runlog.store import save_runset
from simfluence.simulators.encoding import weight_batches


@dataclass(frozen=True)
class SynthConfig:
    """Size and shape of a synthetic run set (defaults: the GPTfluence protocol)."""

    pool: int = 200
    tests: int = 50
    runs: int = 32
    per_run: int = 128
    batch: int = 4
    epochs: int = 3
    seed: int = 0
    classes: int = 5
    harmful: float = 0.05
    noise: float = 0.02
    feature_noise: float = 0.3

    def validate(self) -> None:
        for name in ("pool", "tests", "runs", "per_run", "batch", "epochs", "classes"):
            if getattr(self, name) < 1:
                raise SimfluenceError(f"--{name.replace('_', '-')} must be at least 1")
        if self.per_run > self.pool:
            raise SimfluenceError(f"--per-run {self.per_run} exceeds --pool {self.pool}")
        if not 0 <= self.harmful <= 1 or self.noise < 0 or self.feature_noise < 0:
            raise SimfluenceError("harmful must be in [0, 1] and the noises non-negative")


@dataclass
class Truth:
    """True parameters: ``A``, ``B`` of shape ``(M, P)``, ``initial_loss`` ``(M,)``, and the
    latent classes of the training (``(P,)``) and test (``(M,)``) examples."""

    A: np.ndarray
    B: np.ndarray
    initial_loss: np.ndarray
    train_class: np.ndarray
    test_class: np.ndarray


def true_parameters(config: SynthConfig, rng: np.random.Generator) -> Truth:
    """Draw the true ``A``, ``B`` and ``L_0`` of the process described in the module docstring."""
    P, M, b = config.pool, config.tests, config.batch
    train_class = rng.integers(config.classes, size=P)
    test_class = rng.integers(config.classes, size=M)
    same = test_class[:, None] == train_class[None, :]
    initial = rng.lognormal(np.log(2.0), 0.25, size=M)
    floor = rng.uniform(0.05, 0.5, size=M) * initial
    help_ = np.where(same, rng.uniform(0.03, 0.12, (M, P)), rng.uniform(0.0, 0.01, (M, P)))
    A = (1.0 - help_) / b
    B = help_ * floor[:, None] / b
    harmful = rng.random(P) < config.harmful
    spikes = rng.uniform(0.3, 1.0, (M, P)) * initial[:, None] / b
    B += np.where(same & harmful[None, :], spikes, 0.0)
    return Truth(A, B, initial, train_class, test_class)


#: pure-noise dimensions appended to the synthetic features
NOISE_DIMENSIONS = 8


def synthetic_features(truth: Truth, config: SynthConfig) -> ExampleFeatures:
    """Noisy one-hot classes plus pure noise (see the module docstring); own random stream."""
    rng = np.random.default_rng([config.seed, 2])

    def encode(classes: np.ndarray) -> np.ndarray:
        onehot = np.eye(config.classes)[classes]
        noisy = onehot + config.feature_noise * rng.standard_normal(onehot.shape)
        return np.hstack([noisy, rng.standard_normal((len(classes), NOISE_DIMENSIONS))])

    return ExampleFeatures(
        encode(truth.train_class),
        encode(truth.test_class),
        {"source": f"synthetic (noisy class, feature_noise {config.feature_noise})"},
    )


def simulate_noisy(
    truth: Truth,
    curriculum: list[list[str]],
    index: dict[str, int],
    batch_size: int,
    noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One run of the noisy process; shape ``(T + 1, M)``. Batches are mean-weighted (a batch
    of ``k`` examples scales its sums by ``batch_size / k``), as the simulators assume."""
    counts = weight_batches(count_matrix(curriculum, index), batch_size, "mean")
    alpha = np.asarray(counts @ truth.A.T)
    beta = np.asarray(counts @ truth.B.T)
    losses = np.empty((len(curriculum) + 1, truth.A.shape[0]))
    losses[0] = truth.initial_loss
    shocks = np.exp(noise * rng.standard_normal(alpha.shape) - noise**2 / 2)
    for t in range(len(curriculum)):
        losses[t + 1] = (alpha[t] * losses[t] + beta[t]) * shocks[t]
    return losses


def generate(config: SynthConfig) -> tuple[RunSet, Truth]:
    """A run set of `config.runs` runs and the truth it was drawn from; deterministic in seed."""
    config.validate()
    rng = np.random.default_rng(config.seed)
    truth = true_parameters(config, rng)
    train_ids = [f"train-{i}" for i in range(config.pool)]
    test_ids = [f"test-{j}" for j in range(config.tests)]
    index = {t: k for k, t in enumerate(train_ids)}
    runs = []
    for r in range(config.runs):
        run_rng = np.random.default_rng([config.seed, r])
        curriculum = random_curriculum(
            train_ids, config.per_run, config.batch, config.epochs, run_rng
        )
        losses = simulate_noisy(truth, curriculum, index, config.batch, config.noise, run_rng)
        runs.append(Run(f"run-{r:04d}", curriculum, losses, seed=r))
    meta = {"workload": "synthetic", "config": asdict(config)}
    runset = RunSet(train_ids, test_ids, runs, meta, features=synthetic_features(truth, config))
    return runset, truth


def write_synthetic(directory: str | os.PathLike[str], config: SynthConfig) -> RunSet:
    """Generate and write a run set (with its features) plus ``truth.npz`` (arrays ``A``,
    ``B``, ``initial_loss``, ``train_class``, ``test_class``)."""
    runset, truth = generate(config)
    save_runset(runset, directory)
    save_npz_atomic(Path(directory) / TRUTH_FILE, **vars(truth))
    return runset
