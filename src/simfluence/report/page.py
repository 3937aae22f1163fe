"""The report page: the run set, the held-out metrics (from `simfluence.evaluation.specs`), the
trajectory viewer, and the optional attribution, validation and figure sections."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from simfluence.errors import SimfluenceError
from simfluence.evaluation import EvaluationResult, read_validation, specs
from simfluence.report.payload import build_payload
from simfluence.report.render import (
    best_of,
    escape,
    figure,
    fill_page,
    fmt_value,
    humanize,
    is_number,
    render_value,
)
from simfluence.runlog.runs import RunSet


def _better_text(better: str | None) -> str:
    return f"({better} is better)" if better is not None else ""


def _metric_cell(spec: specs.MetricSpec, scores: Mapping[str, Any]) -> str:
    """A finite value in the spec's format (its spread as a small ``± std``), else "—"."""
    value = scores.get(spec.key)
    if not (is_number(value) and math.isfinite(float(value))):
        return fmt_value(value)
    text = format(float(value), spec.fmt)
    std = scores.get(f"{spec.key}_std")
    if spec.std_fmt is not None and is_number(std) and math.isfinite(float(std)):
        text += f' <span class="std">± {format(float(std), spec.std_fmt)}</span>'
    return text


def metrics_table(evaluation: EvaluationResult) -> str:
    """One row per method, one column per `specs.METRICS`, each column's best highlighted
    (compared as shown, so equal-looking cells tie), and what each metric means."""
    names = list(evaluation.methods)
    columns = specs.METRICS
    head = "".join(f"<th>{escape(spec.label)}</th>" for spec in columns)
    best = {
        spec.key: best_of(
            [spec.shown(evaluation.methods[n].scores.get(spec.key)) for n in names], spec.better
        )
        for spec in columns
    }
    rows = []
    for name in names:
        scores = evaluation.methods[name].scores
        cells = []
        for spec in columns:
            value = scores.get(spec.key)
            is_best = (
                best[spec.key] is not None
                and is_number(value)
                and math.isfinite(float(value))
                and spec.shown(value) == best[spec.key]
                and len(names) > 1
            )
            text = _metric_cell(spec, scores)
            cells.append(f'<td class="num{" best" if is_best else ""}">{text}</td>')
        label = f'<span class="swatch" data-method="{escape(name)}"></span>'
        label += f"<code>{escape(name)}</code>"
        if name == "mean":
            label += ' <span class="muted">(curriculum-blind baseline)</span>'
        rows.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    explain = "".join(
        f"<li><b>{escape(spec.label)}</b> {_better_text(spec.better)}: "
        f"{escape(spec.explanation)}</li>"
        for spec in columns
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


def _validation_table(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """Methods x metrics of one validation kind: the `specs.VALIDATION_METRICS` with a "better"
    first (best highlighted), then every other number the methods have."""
    ranked = [m for m in specs.VALIDATION_METRICS if m.better is not None]
    keys = [m.key for m in ranked]
    for scores in methods.values():
        keys += [k for k in scores if k not in keys and is_number(scores[k])]
    better = {m.key: m.better for m in ranked}
    head = "".join(f"<th>{escape(specs.metric_label(k))}</th>" for k in keys)
    best = {
        k: best_of([s.get(k) for s in methods.values()], better[k]) if k in better else None
        for k in keys
    }
    rows = []
    for name, scores in methods.items():
        cells = []
        for k in keys:
            v = scores.get(k)
            hit = best[k] is not None and is_number(v) and float(v) == best[k]
            cells.append(f'<td class="num{" best" if hit else ""}">{fmt_value(v)}</td>')
        rows.append(f"<tr><th><code>{escape(name)}</code></th>{''.join(cells)}</tr>")
    return (
        f'<table class="metrics validation"><thead><tr><th>method</th>{head}</tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def validation_section(data: Mapping[str, Any]) -> str:
    """A validation (`simfluence.evaluation.validation_json`): one table per kind."""
    validation = read_validation(data)
    parts: list[str] = [
        '<p class="muted">Simulators checked against real counterfactual training runs '
        "(curricula the simulators never saw). LDS: linear datamodeling score, the rank "
        "correlation between predicted and actual outcomes across counterfactual curricula "
        "(higher is better).</p>"
    ]
    if validation.description is not None:
        parts.append(f'<p class="desc">{escape(validation.description)}</p>')
    for kind in validation.kinds:
        parts.append(f"<h3>{escape(humanize(kind.name))}</h3>")
        if kind.methods is None:
            parts.append(render_value(kind.raw, 4))
            continue
        parts.append(_validation_table(kind.methods))
        if kind.info:
            parts.append(render_value(kind.info, 4))
    if "optimized" in data:
        parts.append("<h3>Optimized curriculum</h3>" + render_value(validation.optimized, 4))
    if validation.rest:
        parts.append(render_value(validation.rest, 3))
    return "".join(parts)


def header(title: str, runs: RunSet, evaluation: EvaluationResult) -> str:
    """The title, the run set's facts and the methods (with their colour swatches)."""
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
            facts.append((humanize(key), value))
    config = meta.get("config")
    if isinstance(config, dict):
        shown = [f"{k}={v}" for k, v in config.items() if not isinstance(v, dict | list)]
        facts.append(("config", ", ".join(shown)))
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts)
    methods = " ".join(
        f'<span class="chip"><span class="swatch" data-method="{escape(n)}"></span>'
        f"{escape(n)}</span>"
        for n in evaluation.methods
    )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017
    return (
        f"<header><h1>{escape(title)}</h1>"
        f'<p class="muted">simfluence report, generated {stamp}. Every method is fitted on the '
        "training runs and rolled out free-running on the held-out runs from their recorded "
        "loss before training.</p>"
        f'<table class="kv" id="runset">{rows}</table>'
        f'<p class="methods"><b>Methods:</b> {methods}</p></header>'
    )


VIEWER = (
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
    """The report as one HTML string (see `simfluence.report.write_report`)."""
    if not evaluation.methods:
        raise SimfluenceError("report: the evaluation has no methods")
    payload = build_payload(runs, evaluation, max_bytes, max_tests)
    notes = list(notes or [])
    if payload["trimmed"]:
        notes.append(
            f"To keep this file small, the viewer holds only the {max_tests} test examples per "
            "held-out run whose recorded loss moves most; the metrics use all of them."
        )
    sections = [header(title, runs, evaluation)]
    if notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in notes)
        sections.append(f'<section class="notes"><h2>Notes</h2><ul>{items}</ul></section>')
    sections.append(
        f'<section id="metrics-section"><h2>Held-out metrics</h2>{metrics_table(evaluation)}'
        "</section>"
    )
    sections.append(VIEWER)
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
            f"{validation_section(validation)}</section>"
        )
    if figures:
        figs = "".join(figure(name, path) for name, path in figures.items())
        sections.append(f'<section id="figures-section"><h2>Figures</h2>{figs}</section>')
    return fill_page(title, sections, payload)
