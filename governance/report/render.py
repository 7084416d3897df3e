"""Rendering: jinja2 (autoescape on, strict undefined) to HTML, weasyprint to PDF/A-3b.

Templates and CSS live in the top-level ``templates/`` folder, shipped inside the wheel as
``governance/templates`` (a tracked symlink plus package data). The PDF is rendered from the same
HTML string, with fetching restricted to ``data:`` URIs (nothing from the network), metadata dates
taken from the run, and the evidence JSON attached.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from governance.report.options import ReportError

ATTACHMENT_NAME = "governance_evidence.json"


def template_dir() -> Path:
    """The folder holding the templates, installed (package data) or in the repository."""
    pkg = resources.files("governance") / "templates"
    candidates = [Path(str(pkg)), Path(__file__).resolve().parents[2] / "templates"]
    for c in candidates:
        if (c / "audit_report.html.j2").is_file():
            return c
    raise ReportError(f"templates not found (looked in {', '.join(map(str, candidates))})")


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The jinja2 environment: every template autoescaped, undefined values an error."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
    )


def render_template(name: str, context: dict[str, Any]) -> str:
    """Render one template with ``context``."""
    return environment().get_template(name).render(**context)


def render_html(context: dict[str, Any]) -> str:
    """The self-contained audit report HTML."""
    return render_template("audit_report.html.j2", context)


def evidence_bytes(evidence: dict[str, Any]) -> bytes:
    """Canonical JSON bytes of the evidence attached to the PDF."""
    return (json.dumps(evidence, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def render_pdf(html: str, *, created: datetime, evidence: dict[str, Any] | None = None) -> bytes:
    """PDF/A-3b bytes of ``html``; ``evidence`` is attached as JSON; dates fixed to ``created``."""
    import weasyprint

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    fetcher = weasyprint.URLFetcher(allowed_protocols=["data"], fail_on_errors=True)
    attachments = []
    if evidence is not None:
        when = created.replace(tzinfo=None)
        attachments.append(
            weasyprint.Attachment(
                string=evidence_bytes(evidence),
                name=ATTACHMENT_NAME,
                description="Evidence: global importance, layer ranking, validation result, manifest inputs",
                created=when,
                modified=when,
                relationship="Data",
                url_fetcher=fetcher,
            )
        )
    doc = weasyprint.HTML(string=html, url_fetcher=fetcher, base_url=None).render()
    # PDF/A-3b for archiving, tagged (structure tree) for screen readers
    return doc.write_pdf(pdf_variant="pdf/a-3b", attachments=attachments, pdf_identifier=True, pdf_tags=True)
