"""Audit report and model card: context building, plots, rendering (HTML, PDF/A-3b, Markdown, JSON).

The report reads a run's ``governance/`` artifacts and MLflow metadata (never torch internals),
prepares every number in :mod:`governance.report.context`, and renders the jinja2 templates of
the top-level ``templates/`` folder.
"""

from governance.report.options import ReportError
from governance.report.publish import ReportResult, publish_model_card, publish_report, render_all

__all__ = ["ReportError", "ReportResult", "publish_model_card", "publish_report", "render_all"]
