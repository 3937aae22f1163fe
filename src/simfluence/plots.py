"""Figures a person would rather look at than read: true vs simulated loss trajectories, and
where an attribution says a test loss moved."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np

from simfluence._atomic import atomic_path
from simfluence.colors import METHOD_COLORS

if TYPE_CHECKING:
    from simfluence.counterfactual import LeaveOneOut, StepContributions

__all__ = [
    "METHOD_COLORS",
    "pick_test_examples",
    "plot_attribution",
    "plot_method_grid",
    "plot_trajectories",
]


def pick_test_examples(true: np.ndarray, count: int) -> list[int]:
    """Columns worth showing: the ones whose loss moves most over the run (``true``: (T+1, M))."""
    movement = np.abs(np.diff(true, axis=0)).sum(axis=0)
    return [int(j) for j in np.argsort(-movement)[:count]]


def plot_trajectories(
    true: np.ndarray | None,
    simulated: Mapping[str, np.ndarray],
    test_ids: Sequence[str],
    columns: Sequence[int],
    title: str = "",
    path: str | os.PathLike[str] | None = None,
    band: tuple[np.ndarray, np.ndarray] | None = None,
    band_label: str = "90% interval",
) -> plt.Figure:
    """One panel per test example: the recorded trajectory and each method's rollout.

    Args:
        true: shape ``(T + 1, M)``, recorded losses of one run, or None (a simulation only).
        simulated: method name -> shape ``(T + 1, M)`` free-running rollout of the same run.
        test_ids: the ``M`` test ids (panel titles).
        columns: which test examples to draw.
        path: where to save a PNG (atomically), if given.
        band: ``(lower, upper)``, each ``(T + 1, M)``: a predictive interval, shaded.
    """
    n = len(columns)
    ncols = min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    steps = np.arange((true if true is not None else next(iter(simulated.values()))).shape[0])
    for ax, col in zip(axes.ravel(), columns, strict=False):
        if band is not None:
            ax.fill_between(
                steps,
                band[0][:, col],
                band[1][:, col],
                color="tab:red",
                alpha=0.15,
                lw=0,
                label=band_label,
            )
        if true is not None:
            ax.plot(steps, true[:, col], color="black", lw=2.0, label="recorded")
        for k, (name, traj) in enumerate(simulated.items()):
            color = METHOD_COLORS.get(name, f"C{k % 10}")
            ax.plot(steps, traj[:, col], color=color, lw=1.2, alpha=0.85, label=name)
        ax.set_title(f"test {test_ids[col]}", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(labels), 7),
        frameon=False,
    )
    return _finish(fig, path)


def plot_method_grid(
    true: np.ndarray,
    simulated: Mapping[str, np.ndarray],
    test_ids: Sequence[str],
    columns: Sequence[int],
    title: str = "",
    path: str | os.PathLike[str] | None = None,
) -> plt.Figure:
    """One panel per method, the same few test examples in each: recorded (thick, faint) vs
    simulated (thin), one colour per test example. The y-axis follows the recorded losses, so
    a rollout that explodes runs off the panel instead of flattening every other curve.

    Args: as `plot_trajectories`.
    """
    names = list(simulated)
    ncols = min(len(names), 4)
    nrows = int(np.ceil(len(names) / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False, sharex=True, sharey=True
    )
    steps = np.arange((true if true is not None else next(iter(simulated.values()))).shape[0])
    low, high = true[:, columns].min(), true[:, columns].max()
    margin = 0.15 * (high - low + 1e-12)
    for ax, name in zip(axes.ravel(), names, strict=False):
        for k, col in enumerate(columns):
            color = f"C{k % 10}"
            ax.plot(steps, true[:, col], color=color, lw=3.0, alpha=0.3)
            ax.plot(steps, simulated[name][:, col], color=color, lw=1.1, label=test_ids[col])
        ax.set_title(name, fontsize=10)
        ax.set_ylim(low - margin, high + margin)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("loss")
    fig.suptitle(
        (title + "\n" if title else "") + "thick faint: recorded; thin: simulated", fontsize=10
    )
    fig.tight_layout()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=len(labels),
        frameon=False,
        title="test example",
    )
    return _finish(fig, path)


def plot_attribution(
    loo: LeaveOneOut,
    steps: StepContributions | None,
    top: int,
    path: str | os.PathLike[str],
) -> None:
    """Left: the (simulated or recorded) trajectory with the top steps marked; right: the top
    leave-one-out effects. Saved to `path` as PNG, atomically."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if steps is not None:
        kind = "recorded" if loo.method in ("unrolled", "combined") else "simulated"
        left.plot(np.arange(steps.trajectory.size), steps.trajectory, color="tab:red", lw=1.5)
        marked = steps.top_steps(min(top, 5))
        left.scatter(marked, steps.trajectory[marked], color="black", zorder=3, label="top steps")
        left.set(xlabel="training step", ylabel=f"{kind} loss", title=f"{kind} trajectory")
        left.legend(frameon=False)
    left.grid(alpha=0.3)
    rows = sorted(loo.rows(), key=lambda r: -abs(r[2]))[:top][::-1]
    colors = ["tab:green" if e < 0 else "tab:red" for _, _, e in rows]
    right.barh([r[0] for r in rows], [r[2] for r in rows], color=colors)
    right.axvline(0, color="black", lw=0.8)
    right.set(
        xlabel="L_T(with) - L_T(without)  (<0 helpful)",
        title=f"leave-one-out effects ({loo.method or 'simulator'}, {loo.removal})",
    )
    fig.tight_layout()
    _finish(fig, path)


def _finish(fig: plt.Figure, path: str | os.PathLike[str] | None) -> plt.Figure:
    """Save to `path` as PNG, atomically, and release pyplot's hold on the figure (commands
    that draw many figures would otherwise keep them all in memory)."""
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
    return fig
