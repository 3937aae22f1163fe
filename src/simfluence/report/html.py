"""One self-contained, interactive HTML file that shows an evaluation to a person.

Built in three layers: `simfluence.report.payload` (the data the viewer gets),
`simfluence.report.render` (generic: escaping, tables of any JSON value, inlined assets and
figures, the page template) and `simfluence.report.page` (this report's sections, its metric
table from `simfluence.evaluation.specs`).

`write_report` writes a single ``.html`` file with no external resources (inline CSS, vanilla
JavaScript, PNG figures as base64 data URIs, the data as a JSON blob in a
``<script type="application/json" id="simfluence-data">``). It shows:

* the run set (workload, runs, split, pool, test examples) and the methods;
* the protocol's metrics per method (`simfluence.evaluation.METRICS`), the best value of
  each column highlighted;
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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simfluence._atomic import write_text_atomic
from simfluence.colors import method_colors
from simfluence.evaluation import EvaluationResult
from simfluence.report.page import render_report
from simfluence.report.payload import build_payload
from simfluence.report.render import render_value
from simfluence.runlog.runs import RunSet

__all__ = ["build_payload", "method_colors", "render_report", "render_value", "write_report"]


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
        validation: optional, what `simfluence validate --json` writes (the layout in
            `simfluence.evaluation.validation_json`).
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
