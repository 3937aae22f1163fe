"""One self-contained, interactive HTML file that shows an evaluation to a person.

`write_report` writes a single ``.html`` file with no external resources (inline CSS, vanilla
JavaScript, PNG figures as base64 data URIs, the data as a JSON blob in a
``<script type="application/json" id="simfluence-data">``). It shows:

* the run set (workload, runs, split, pool, test examples) and the methods;
* the protocol's metrics per method, the best value of each column highlighted;
* an interactive trajectory viewer: pick a held-out run and a test example, toggle methods,
  hover for the step and every visible line's value; the y-axis follows the recorded losses
  and rollouts that leave that range are clipped, so an exploding method does not flatten
  the others;
* optional attribution and validation sections (JSON produced by other commands), rendered
  generically: lists of records become tables, number series become sparklines;
* static figures (PNG or SVG files), embedded.

Only the held-out runs' recorded and simulated losses are embedded, rounded to 5 significant
digits; when that would exceed `max_bytes`, each run keeps the `max_tests` test examples whose
recorded loss moves most, and the page says so.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from simfluence._atomic import write_text_atomic
from simfluence.errors import SimfluenceError
from simfluence.evaluation import EvaluationResult
from simfluence.runlog.runs import RunSet

#: same colours as `simfluence.plots.METHOD_COLORS` (matplotlib's tab10), as hex
KNOWN_COLORS = {
    "linear": "#d62728",
    "additive": "#1f77b4",
    "mean": "#7f7f7f",
    "persistence": "#bcbd22",
    "truth": "#2ca02c",
    "featurized": "#ff7f0e",
    "hybrid": "#9467bd",
}
PALETTE = [
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
]
#: estimated JSON bytes per embedded number (5 significant digits, comma)
_BYTES_PER_NUMBER = 10

#: (key, label, better, explanation) of each metric column
METRICS = [
    (
        "all_steps_mse",
        "all-steps MSE",
        "min",
        "mean over (held-out run, test example) trajectories of the squared error of the "
        "free-running rollout, averaged over steps 1..T.",
    ),
    (
        "all_steps_mae",
        "all-steps MAE",
        "min",
        "the same with the absolute error: less dominated by a few spikes.",
    ),
    (
        "final_step_mse",
        "final-step MSE",
        "min",
        "squared error of the predicted loss after the last step only.",
    ),
    (
        "final_step_spearman",
        "final-step Spearman",
        "max",
        "within each held-out run, the rank correlation across test examples between predicted "
        "and recorded final loss (does the method know which examples end up learned?), "
        "averaged over runs.",
    ),
    (
        "fit_seconds",
        "fit s",
        "min",
        "wall-clock seconds to fit on the training runs (pre-fitted models: not measured).",
    ),
    (
        "coverage_90",
        "coverage 90%",
        None,
        "share of held-out (run, step, test example) points inside the method's 90% predictive "
        "interval (calibrated on held-out folds of the training runs): about 0.9 is calibrated, "
        "less is overconfident.",
    ),
    (
        "interval_width_90",
        "width 90%",
        None,
        "mean width of that interval, in loss units: among calibrated methods, narrower is more "
        "informative (the curriculum-blind mean's width is the spread of the runs themselves).",
    ),
]


def method_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per method: the library's colours for known ones, a palette for others."""
    used = {KNOWN_COLORS[n] for n in names if n in KNOWN_COLORS}
    free = [c for c in PALETTE if c not in used] or PALETTE
    out: dict[str, str] = {}
    k = 0
    for name in names:
        if name in KNOWN_COLORS:
            out[name] = KNOWN_COLORS[name]
        else:
            out[name] = free[k % len(free)]
            k += 1
    return out


def _sig(values: np.ndarray) -> list[float | None]:
    """Floats rounded to 5 significant digits; non-finite values become None (JSON null)."""
    return [
        float(f"{v:.5g}") if math.isfinite(v) else None
        for v in np.asarray(values, dtype=np.float64).ravel().tolist()
    ]


def _movement(losses: np.ndarray) -> np.ndarray:
    """Total variation of each column of a ``(T + 1, M)`` loss array."""
    return np.abs(np.diff(losses, axis=0)).sum(axis=0)


def build_payload(
    runs: RunSet,
    evaluation: EvaluationResult,
    max_bytes: int = 10_000_000,
    max_tests: int = 20,
) -> dict[str, Any]:
    """The data the trajectory viewer needs, JSON-able.

    Returns ``{"test_ids", "methods", "colors", "runs": [{"id", "tests", "movement",
    "recorded", "simulated": {method: [...]}, "bands": {method: {"lower": [...], "upper":
    [...]}}}], "trimmed", "max_tests"}`` where ``tests`` are column indices into ``test_ids``
    (most moving first), ``recorded[k]`` / ``simulated[m][k]`` the trajectories (length
    ``T + 1``) of test ``tests[k]``, and ``bands`` the 90% intervals of the methods that have
    them.
    """
    names = list(evaluation.methods)
    banded = [n for n in names if evaluation.methods[n].intervals is not None]
    held = [runs.run(r) for r in evaluation.heldout_runs]
    n_numbers = sum(run.losses.size for run in held) * (1 + len(names) + 2 * len(banded))
    trimmed = n_numbers * _BYTES_PER_NUMBER > max_bytes and len(runs.test_ids) > max_tests
    out_runs = []
    for k, run in enumerate(held):
        movement = _movement(run.losses)
        order = np.argsort(-movement, kind="stable")
        columns = order[:max_tests] if trimmed else order
        out_runs.append(
            {
                "id": run.run_id,
                "steps": run.n_steps,
                "tests": [int(j) for j in columns],
                "movement": _sig(movement[columns]),
                "recorded": [_sig(run.losses[:, j]) for j in columns],
                "simulated": {
                    name: [_sig(evaluation.methods[name].simulated[k][:, j]) for j in columns]
                    for name in names
                },
                "bands": {name: _band(evaluation, name, k, columns) for name in banded},
            }
        )
    return {
        "test_ids": list(runs.test_ids),
        "methods": names,
        "colors": method_colors(names),
        "runs": out_runs,
        "trimmed": bool(trimmed),
        "max_tests": max_tests,
    }


def _band(
    evaluation: EvaluationResult, name: str, run: int, columns: np.ndarray
) -> dict[str, list[list[float | None]]]:
    band = (evaluation.methods[name].intervals or [])[run]
    return {
        "lower": [_sig(band.lower[:, j]) for j in columns],
        "upper": [_sig(band.upper[:, j]) for j in columns],
    }


# -- HTML pieces --------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """A number or scalar for a table cell."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.4g}"
    return _e(value)


def _humanize(key: str) -> str:
    text = str(key).replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _best(values: Sequence[Any], better: str | None) -> float | None:
    if better is None:
        return None
    finite = [float(v) for v in values if _is_number(v) and math.isfinite(float(v))]
    if not finite:
        return None
    return min(finite) if better == "min" else max(finite)


def _sparkline(values: Sequence[Any], width: int = 240, height: int = 36) -> str:
    """A small static SVG line of a number series (None/non-finite values leave gaps)."""
    ys = [float(v) if _is_number(v) and math.isfinite(float(v)) else None for v in values]
    finite = [y for y in ys if y is not None]
    if len(finite) < 2:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    n = len(ys)
    parts: list[str] = []
    pen = "M"
    for i, y in enumerate(ys):
        if y is None:
            pen = "M"
            continue
        x = 2 + (width - 4) * i / max(n - 1, 1)
        yy = 2 + (height - 4) * (1 - (y - lo) / span)
        parts.append(f"{pen}{x:.1f},{yy:.1f}")
        pen = "L"
    zero = ""
    if lo < 0 < hi:
        z = 2 + (height - 4) * (1 - (0 - lo) / span)
        zero = f'<line x1="0" x2="{width}" y1="{z:.1f}" y2="{z:.1f}" class="zero"/>'
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'{zero}<path d="{" ".join(parts)}"/></svg>'
        f' <span class="muted">{n} values, {_fmt(lo)} … {_fmt(hi)}</span>'
    )


def _cell(value: Any, depth: int) -> str:
    """A table cell for any JSON value (nested records become a nested table)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _records_table(value, depth + 1, limit=10)
    if isinstance(value, list) and value and all(_is_number(v) or v is None for v in value):
        if len(value) > 8:
            return _sparkline(value, width=120, height=24)
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict | list):
        text = json.dumps(value, default=str)
        return f"<code>{_e(text[:200] + ('…' if len(text) > 200 else ''))}</code>"
    return _fmt(value)


def _records_table(rows: Sequence[Mapping[str, Any]], depth: int = 0, limit: int = 100) -> str:
    """A table of a list of dicts: one column per key (in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    cls = "records nested" if depth else "records"
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in rows[:limit]:
        cells = "".join(
            f'<td class="{"num" if _is_number(row.get(c)) else ""}">{_cell(row.get(c), depth)}</td>'
            for c in columns
        )
        # a row whose interval includes 0 (e.g. an attribution whose sign is not established)
        uncertain = row.get("interval_includes_zero") is True
        marker = ' class="uncertain" title="its interval includes 0"' if uncertain else ""
        body.append(f"<tr{marker}>{cells}</tr>")
    more = ""
    if len(rows) > limit:
        more = f'<p class="muted">… and {len(rows) - limit} more rows (not shown).</p>'
    legend = ""
    if "interval_includes_zero" in columns:
        legend = (
            '<p class="muted"><span class="uncertain-key">greyed</span> rows: the interval '
            "includes 0, so not even the sign of the effect is established.</p>"
        )
    return (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>{more}{legend}"
    )


def render_value(obj: Any, level: int = 3) -> str:
    """Render any JSON-able value readably: a dict's ``description`` as a paragraph, its
    scalars as a key/value table, lists of dicts as tables, number series as sparklines, nested
    dicts as sub-sections."""
    if isinstance(obj, list):
        if obj and all(isinstance(v, dict) for v in obj):
            return _records_table(obj)
        if obj and all(_is_number(v) or v is None for v in obj):
            return f"<p>{_sparkline(obj)}</p>" if len(obj) > 8 else f"<p>{_cell(obj, 0)}</p>"
        return f"<p>{_cell(obj, 0)}</p>"
    if not isinstance(obj, dict):
        return f"<p>{_fmt(obj)}</p>"
    parts: list[str] = []
    if isinstance(obj.get("description"), str):
        parts.append(f'<p class="desc">{_e(obj["description"])}</p>')
    scalars = [
        (k, v) for k, v in obj.items() if k != "description" and not isinstance(v, dict | list)
    ]
    short_lists = [
        (k, v)
        for k, v in obj.items()
        if isinstance(v, list) and all(not isinstance(x, dict | list) for x in v) and v
    ]
    if scalars or short_lists:
        rows = [f"<tr><th>{_e(_humanize(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in scalars]
        for k, v in short_lists:
            if all(_is_number(x) or x is None for x in v) and len(v) > 8:
                shown = _sparkline(v)
            else:
                text = ", ".join(_fmt(x) for x in v[:30])
                shown = text + (f" … ({len(v)} in all)" if len(v) > 30 else "")
            rows.append(f"<tr><th>{_e(_humanize(k))}</th><td>{shown}</td></tr>")
        parts.append(f'<table class="kv">{"".join(rows)}</table>')
    h = min(level, 6)
    for key, value in obj.items():
        if isinstance(value, dict):
            if value and all(_is_number(v) or v is None for v in value.values()):
                rows_ = [{"key": k, "value": v} for k, v in value.items()]
                parts.append(f"<h{h}>{_e(_humanize(key))}</h{h}>{_records_table(rows_)}")
            else:
                parts.append(
                    f'<section class="sub"><h{h}>{_e(_humanize(key))}</h{h}>'
                    f"{render_value(value, level + 1)}</section>"
                )
        elif isinstance(value, list) and value and any(isinstance(x, dict | list) for x in value):
            parts.append(f"<h{h}>{_e(_humanize(key))}</h{h}>{render_value(value, level + 1)}")
    return "".join(parts)


def _shown(value: Any, key: str) -> Any:
    """Fit seconds compare as shown (2 decimals), so equal-looking cells tie."""
    if key == "fit_seconds" and _is_number(value) and math.isfinite(float(value)):
        return round(float(value), 2)
    return value


def _better_text(better: str | None) -> str:
    if better is None:
        return ""
    return f"({'lower' if better == 'min' else 'higher'} is better)"


def _metrics_table(evaluation: EvaluationResult) -> str:
    names = list(evaluation.methods)
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _, _ in METRICS)
    best = {
        key: _best([_shown(evaluation.methods[n].scores.get(key), key) for n in names], better)
        for key, _, better, _ in METRICS
    }
    rows = []
    for name in names:
        scores = evaluation.methods[name].scores
        cells = []
        for key, _, _, _ in METRICS:
            value = scores.get(key)
            std = scores.get(f"{key}_std")
            text = _fmt(value)
            if key == "final_step_spearman" and _is_number(value) and math.isfinite(value):
                text = f"{value:.3f}"
            if std is not None and _is_number(std) and math.isfinite(std):
                text += f' <span class="std">± {std:.2g}</span>'
            if key == "fit_seconds" and _is_number(value) and math.isfinite(value):
                text = f"{value:.2f}"
            is_best = (
                best[key] is not None
                and _is_number(value)
                and math.isfinite(float(value))
                and _shown(value, key) == best[key]
                and len(names) > 1
            )
            cells.append(f'<td class="num{" best" if is_best else ""}">{text}</td>')
        label = f'<span class="swatch" data-method="{_e(name)}"></span><code>{_e(name)}</code>'
        if name == "mean":
            label += ' <span class="muted">(curriculum-blind baseline)</span>'
        rows.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    explain = "".join(
        f"<li><b>{_e(label)}</b> {_better_text(better)}: {_e(text)}</li>"
        for _, label, better, text in METRICS
    )
    return (
        f'<table class="metrics" id="metrics"><thead><tr><th>method</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<p class="muted">Mean ± standard deviation over held-out trajectories (Spearman: over '
        "held-out runs). The best value of each column is highlighted.</p>"
        f'<ul class="explain">{explain}'
        "<li><code>mean</code> predicts every test example's average recorded trajectory over "
        "the training runs, whatever the curriculum: it is the <b>curriculum-blind baseline to "
        "beat</b>. A simulator that does not beat it has learned nothing about the curriculum."
        "</li></ul>"
    )


_VALIDATION_KEYS = [
    ("all_steps_mse", "all-steps MSE", "min"),
    ("final_step_spearman", "final-step Spearman", "max"),
    ("lds", "LDS", "max"),
]


def _validation_section(validation: Mapping[str, Any]) -> str:
    kinds = validation.get("kinds")
    parts: list[str] = [
        '<p class="muted">Simulators checked against real counterfactual training runs '
        "(curricula the simulators never saw). LDS: linear datamodeling score, the rank "
        "correlation between predicted and actual outcomes across counterfactual curricula "
        "(higher is better).</p>"
    ]
    if isinstance(validation.get("description"), str):
        parts.append(f'<p class="desc">{_e(validation["description"])}</p>')
    if isinstance(kinds, dict):
        for kind, body in kinds.items():
            methods = body.get("methods") if isinstance(body, dict) else None
            parts.append(f"<h3>{_e(_humanize(kind))}</h3>")
            if not isinstance(methods, dict):
                parts.append(render_value(body, 4))
                continue
            keys = [k for k, _, _ in _VALIDATION_KEYS]
            for scores in methods.values():
                if isinstance(scores, dict):
                    keys += [k for k in scores if k not in keys and _is_number(scores[k])]
            labels = {k: lab for k, lab, _ in _VALIDATION_KEYS}
            better = {k: b for k, _, b in _VALIDATION_KEYS}
            head = "".join(f"<th>{_e(labels.get(k, k))}</th>" for k in keys)
            best = {
                k: _best([s.get(k) for s in methods.values() if isinstance(s, dict)], better[k])
                if k in better
                else None
                for k in keys
            }
            rows = []
            for name, scores in methods.items():
                scores = scores if isinstance(scores, dict) else {}
                cells = []
                for k in keys:
                    v = scores.get(k)
                    hit = best[k] is not None and _is_number(v) and float(v) == best[k]
                    cells.append(f'<td class="num{" best" if hit else ""}">{_fmt(v)}</td>')
                rows.append(f"<tr><th><code>{_e(name)}</code></th>{''.join(cells)}</tr>")
            parts.append(
                f'<table class="metrics validation"><thead><tr><th>method</th>{head}</tr>'
                f"</thead><tbody>{''.join(rows)}</tbody></table>"
            )
            rest = {k: v for k, v in body.items() if k != "methods"}
            if rest:
                parts.append(render_value(rest, 4))
    if "optimized" in validation:
        parts.append("<h3>Optimized curriculum</h3>" + render_value(validation["optimized"], 4))
    rest = {k: v for k, v in validation.items() if k not in ("kinds", "optimized", "description")}
    if rest:
        parts.append(render_value(rest, 3))
    return "".join(parts)


def _figure(name: str, path: str | os.PathLike[str]) -> str:
    path = Path(path)
    if not path.is_file():
        raise SimfluenceError(f"report figure {name!r}: {path}: no such file")
    data = path.read_bytes()
    mime = {
        ".png": "image/png",
        ".svg": "image/svg+xml",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
    }.get(path.suffix.lower())
    if mime is None:
        raise SimfluenceError(f"report figure {name!r}: {path}: expected a .png, .svg or .jpg")
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<figure><img src="{uri}" alt="{_e(name)}"><figcaption>{_e(name)}</figcaption></figure>'


def _header(title: str, runs: RunSet, evaluation: EvaluationResult) -> str:
    meta = runs.metadata or {}
    held = [runs.run(r) for r in evaluation.heldout_runs]
    steps = sorted({run.n_steps for run in runs.runs})
    step_text = str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"
    facts = [
        ("workload", meta.get("workload", "unknown")),
        ("runs", len(runs.runs)),
        ("training runs", len(evaluation.train_runs)),
        ("held-out runs", f"{len(held)} ({', '.join(evaluation.heldout_runs)})"),
        ("steps per run", step_text),
        ("pool (training examples)", len(runs.train_ids)),
        ("test examples", len(runs.test_ids)),
    ]
    for key, value in meta.items():
        if key != "workload" and not isinstance(value, dict | list) and value is not None:
            facts.append((_humanize(key), value))
    config = meta.get("config")
    if isinstance(config, dict):
        shown = [f"{k}={v}" for k, v in config.items() if not isinstance(v, dict | list)]
        facts.append(("config", ", ".join(shown)))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    methods = " ".join(
        f'<span class="chip"><span class="swatch" data-method="{_e(n)}"></span>{_e(n)}</span>'
        for n in evaluation.methods
    )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017
    return (
        f"<header><h1>{_e(title)}</h1>"
        f'<p class="muted">simfluence report, generated {stamp}. Every method is fitted on the '
        "training runs and rolled out free-running on the held-out runs from their recorded "
        "loss before training.</p>"
        f'<table class="kv" id="runset">{rows}</table>'
        f'<p class="methods"><b>Methods:</b> {methods}</p></header>'
    )


def render_report(
    *,
    title: str,
    runs: RunSet,
    evaluation: EvaluationResult,
    attribution: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    figures: Mapping[str, str | os.PathLike[str]] | None = None,
    notes: Sequence[str] | None = None,
    max_bytes: int = 10_000_000,
    max_tests: int = 20,
) -> str:
    """The report as one HTML string (see `write_report`)."""
    if not evaluation.methods:
        raise SimfluenceError("report: the evaluation has no methods")
    payload = build_payload(runs, evaluation, max_bytes, max_tests)
    # "<" never occurs in numbers; escaping it keeps "</script>" out of the JSON blob
    blob = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    notes = list(notes or [])
    if payload["trimmed"]:
        notes.append(
            f"To keep this file small, the viewer holds only the {max_tests} test examples per "
            "held-out run whose recorded loss moves most; the metrics use all of them."
        )
    sections = [_header(title, runs, evaluation)]
    if notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        sections.append(f'<section class="notes"><h2>Notes</h2><ul>{items}</ul></section>')
    sections.append(
        f'<section id="metrics-section"><h2>Held-out metrics</h2>{_metrics_table(evaluation)}'
        "</section>"
    )
    sections.append(
        '<section id="viewer-section"><h2>Trajectory viewer</h2>'
        '<p class="muted">Choose a held-out run and a test example (listed by how much its '
        "recorded loss moves, most first). Black: the recorded loss; coloured: each method's "
        "free-running rollout, with its 90% predictive interval shaded when the method has one. "
        "The y-axis follows the recorded range; a rollout that leaves it "
        "is clipped (marked ↕ in the legend). Hover for values (and intervals).</p>"
        '<div class="controls">'
        '<label>run <select id="run-select"></select></label>'
        '<label>test example <select id="test-select"></select></label>'
        '<label>filter <input id="test-filter" type="search" placeholder="test id…" '
        'size="12"></label>'
        '<button type="button" id="prev-test" title="previous test example">◀</button>'
        '<button type="button" id="next-test" title="next test example">▶</button>'
        '<label>90% interval of <select id="band-select"></select></label>'
        "</div>"
        '<div id="method-toggles" class="toggles"></div>'
        '<div id="viewer" class="viewer"><div id="tooltip" class="tooltip" hidden></div></div>'
        '<table id="trajectory-errors" class="metrics small"></table>'
        "</section>"
    )
    if attribution:
        sections.append(
            '<section id="attribution-section"><h2>Attribution</h2>'
            '<p class="muted">Simulated counterfactuals: the effect of removing training '
            "examples, where in training the loss moved, and how pairs interact (see each "
            "table's sign convention).</p>"
            f"{render_value(dict(attribution), 3)}</section>"
        )
    if validation:
        sections.append(
            '<section id="validation-section"><h2>Validation against real runs</h2>'
            f"{_validation_section(validation)}</section>"
        )
    if figures:
        figs = "".join(_figure(name, path) for name, path in figures.items())
        sections.append(f'<section id="figures-section"><h2>Figures</h2>{figs}</section>')
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_static('report.css')}</style></head><body><main>"
        + "".join(sections)
        + '<footer class="muted">Written by simfluence. Self-contained: no network access.'
        "</footer></main>"
        f'<script type="application/json" id="simfluence-data">{blob}</script>'
        f"<script>{_static('viewer.js')}</script></body></html>\n"
    )


def write_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    runs: RunSet,
    evaluation: EvaluationResult,
    attribution: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    figures: Mapping[str, str | os.PathLike[str]] | None = None,
    notes: Sequence[str] | None = None,
    max_bytes: int = 10_000_000,
    max_tests: int = 20,
) -> Path:
    """Write one self-contained HTML report of `evaluation` on `runs` to `path` (atomically).

    Args:
        title: the page title.
        runs: the run set evaluated (its held-out runs' recorded losses are embedded).
        evaluation: from `simfluence.evaluation.evaluate`; every method's rollouts are shown.
        attribution: optional JSON-able dict (e.g. leave-one-out effects, step contributions,
            pair interactions); lists of dicts become tables, ``description`` strings are shown.
        validation: optional ``{"kinds": {KIND: {"methods": {NAME: {"all_steps_mse",
            "final_step_spearman", "lds"}}}}, "optimized": {...}}``.
        figures: name -> PNG/SVG/JPEG file, embedded as data URIs.
        notes: sentences shown near the top.
        max_bytes: beyond about this much embedded data, keep `max_tests` test examples per run.

    Returns:
        the path written.
    """
    text = render_report(
        title=title,
        runs=runs,
        evaluation=evaluation,
        attribution=attribution,
        validation=validation,
        figures=figures,
        notes=notes,
        max_bytes=max_bytes,
        max_tests=max_tests,
    )
    path = Path(path)
    write_text_atomic(path, text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # a report is for sharing: not the temp file's 0600
    return path


def _static(name: str) -> str:
    """The text of a file shipped in ``simfluence/report/static/`` (inlined into the page)."""
    return resources.files("simfluence.report").joinpath("static", name).read_text()
