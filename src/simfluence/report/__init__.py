"""Self-contained HTML reports of an evaluation (see `simfluence.report.html`)."""

from simfluence.report.html import build_payload, render_report, write_report

__all__ = ["build_payload", "render_report", "write_report"]
