"""Self-contained HTML reports of an evaluation (see `simfluence.report.html`)."""

from simfluence.report.html import write_report
from simfluence.report.page import render_report
from simfluence.report.payload import build_payload

__all__ = ["build_payload", "render_report", "write_report"]
