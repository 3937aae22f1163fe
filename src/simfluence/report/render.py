"""A generic HTML renderer: escaping, any JSON value as tables and sparklines, figures and the
shipped static assets inlined, and the page template filled in. It knows nothing of
evaluations (`simfluence.report.page` builds the report from it)."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from simfluence.errors import SimfluenceError


def escape(value: Any) -> str:
    """`value` as text safe inside HTML (quotes too)."""
    return html.escape(str(value), quote=True)


def fmt_value(value: Any) -> str:
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
    return escape(value)


def humanize(key: str) -> str:
    text = str(key).replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def best_of(values: Sequence[Any], better: str | None) -> float | None:
    """The best finite number of `values` ("lower" or "higher" is better; None: no best)."""
    if better is None:
        return None
    finite = [float(v) for v in values if is_number(v) and math.isfinite(float(v))]
    if not finite:
        return None
    return min(finite) if better == "lower" else max(finite)


def sparkline(values: Sequence[Any], width: int = 240, height: int = 36) -> str:
    """A small static SVG line of a number series (None/non-finite values leave gaps)."""
    ys = [float(v) if is_number(v) and math.isfinite(float(v)) else None for v in values]
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
        f' <span class="muted">{n} values, {fmt_value(lo)} … {fmt_value(hi)}</span>'
    )


def cell(value: Any, depth: int) -> str:
    """A table cell for any JSON value (nested records become a nested table)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return records_table(value, depth + 1, limit=10)
    if isinstance(value, list) and value and all(is_number(v) or v is None for v in value):
        if len(value) > 8:
            return sparkline(value, width=120, height=24)
        return ", ".join(fmt_value(v) for v in value)
    if isinstance(value, dict | list):
        text = json.dumps(value, default=str)
        return f"<code>{escape(text[:200] + ('…' if len(text) > 200 else ''))}</code>"
    return fmt_value(value)


def records_table(rows: Sequence[Mapping[str, Any]], depth: int = 0, limit: int = 100) -> str:
    """A table of a list of dicts: one column per key (in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    cls = "records nested" if depth else "records"
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows[:limit]:
        cells = "".join(
            f'<td class="{"num" if is_number(row.get(c)) else ""}">{cell(row.get(c), depth)}</td>'
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
            return records_table(obj)
        if obj and all(is_number(v) or v is None for v in obj):
            return f"<p>{sparkline(obj)}</p>" if len(obj) > 8 else f"<p>{cell(obj, 0)}</p>"
        return f"<p>{cell(obj, 0)}</p>"
    if not isinstance(obj, dict):
        return f"<p>{fmt_value(obj)}</p>"
    parts: list[str] = []
    if isinstance(obj.get("description"), str):
        parts.append(f'<p class="desc">{escape(obj["description"])}</p>')
    scalars = [
        (k, v) for k, v in obj.items() if k != "description" and not isinstance(v, dict | list)
    ]
    short_lists = [
        (k, v)
        for k, v in obj.items()
        if isinstance(v, list) and all(not isinstance(x, dict | list) for x in v) and v
    ]
    if scalars or short_lists:
        rows = [
            f"<tr><th>{escape(humanize(k))}</th><td>{fmt_value(v)}</td></tr>" for k, v in scalars
        ]
        for k, v in short_lists:
            if all(is_number(x) or x is None for x in v) and len(v) > 8:
                shown = sparkline(v)
            else:
                text = ", ".join(fmt_value(x) for x in v[:30])
                shown = text + (f" … ({len(v)} in all)" if len(v) > 30 else "")
            rows.append(f"<tr><th>{escape(humanize(k))}</th><td>{shown}</td></tr>")
        parts.append(f'<table class="kv">{"".join(rows)}</table>')
    h = min(level, 6)
    for key, value in obj.items():
        if isinstance(value, dict):
            if value and all(is_number(v) or v is None for v in value.values()):
                rows_ = [{"key": k, "value": v} for k, v in value.items()]
                parts.append(f"<h{h}>{escape(humanize(key))}</h{h}>{records_table(rows_)}")
            else:
                parts.append(
                    f'<section class="sub"><h{h}>{escape(humanize(key))}</h{h}>'
                    f"{render_value(value, level + 1)}</section>"
                )
        elif isinstance(value, list) and value and any(isinstance(x, dict | list) for x in value):
            parts.append(f"<h{h}>{escape(humanize(key))}</h{h}>{render_value(value, level + 1)}")
    return "".join(parts)


def figure(name: str, path: str | os.PathLike[str]) -> str:
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
    caption = escape(name)
    return f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def static_text(name: str) -> str:
    """The text of a file shipped in ``simfluence/report/static/`` (inlined into the page)."""
    text = resources.files("simfluence.report").joinpath("static", name).read_text("utf-8")
    return text.replace("\r\n", "\n")  # as the HTML parser will see it (the hash covers it)


#: the embedded JSON's characters that could end its ``<script>`` (``</script>``, ``<!--``) or
#: that older JavaScript parsers take as line ends, as JSON escapes (the same value once parsed)
_JSON_ESCAPES = {
    ord("<"): "\\u003c",
    ord(">"): "\\u003e",
    ord("&"): "\\u0026",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def script_json(data: Any) -> str:
    """`data` as JSON safe inside a ``<script type="application/json">`` element: no ``<``,
    ``>``, ``&``, U+2028 or U+2029 (escaped as ``\\uXXXX``, which `JSON.parse` reads back
    unchanged), so no string in it can close the element or open a comment."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.translate(_JSON_ESCAPES)


def csp_hash(text: str) -> str:
    """The CSP source expression that allows exactly the inline element with this text."""
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return f"'sha256-{digest}'"


def content_security_policy(script: str, style: str) -> str:
    """The report's policy: nothing is fetched or sent anywhere; the one inline script and the
    one inline stylesheet run only because their sha256 is listed (an injected script, event
    handler, style attribute or ``javascript:`` URL is refused); images only as ``data:``."""
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {csp_hash(script)}",
            f"style-src {csp_hash(style)}",
            "img-src data:",
            "connect-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )


def fill_page(title: str, sections: Sequence[str], data: Any) -> str:
    """The whole page: `sections` (HTML) in the template, the shipped CSS and viewer script
    inlined (allowed by hash in the page's Content-Security-Policy), and `data` as the JSON
    blob ``<script type="application/json" id="simfluence-data">`` the viewer reads."""
    script = static_text("viewer.js")
    style = static_text("report.css")
    if "</script" in script.lower() or "</style" in style.lower():  # pragma: no cover
        raise SimfluenceError("report: a shipped asset would end its own element")
    policy = content_security_policy(script, style)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'  # no " in it
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{style}</style></head><body>"
        "<main>"
        + "".join(sections)
        + '<footer class="muted">Written by simfluence. Self-contained: no network access.'
        "</footer></main>"
        f'<script type="application/json" id="simfluence-data">{script_json(data)}</script>'
        f"<script>{script}</script></body></html>\n"
    )
