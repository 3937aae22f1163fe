"""The one home of method colours: every figure and the HTML report draw a method the same way.

Colours are matplotlib's tab10, as hex (matplotlib and browsers both read them).
"""

from __future__ import annotations

from collections.abc import Sequence

#: a fixed colour per well-known method ("true": the recorded losses)
METHOD_COLORS: dict[str, str] = {
    "true": "#000000",
    "linear": "#d62728",
    "additive": "#1f77b4",
    "mean": "#7f7f7f",
    "persistence": "#bcbd22",
    "truth": "#2ca02c",
    "featurized": "#ff7f0e",
    "hybrid": "#9467bd",
}

#: colours for the other methods, in order (tab10, the orange and purple first)
PALETTE: tuple[str, ...] = (
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#bcbd22",
    "#7f7f7f",
)


def method_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per method: `METHOD_COLORS` for known ones, the `PALETTE` colours no
    known one of `names` uses for the others."""
    used = {METHOD_COLORS[n] for n in names if n in METHOD_COLORS}
    free = [c for c in PALETTE if c not in used] or list(PALETTE)
    out: dict[str, str] = {}
    k = 0
    for name in names:
        if name in METHOD_COLORS:
            out[name] = METHOD_COLORS[name]
        else:
            out[name] = free[k % len(free)]
            k += 1
    return out
