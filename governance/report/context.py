"""Turn :class:`RunEvidence` into the template context: every number formatted here.

Templates never compute: they loop over rows and print strings prepared by the section builders
(:mod:`governance.report.sections`). Where the run has no data for a part of a section, the
context says so explicitly ("not provided" plus the reason), never leaves it blank.
"""

from __future__ import annotations

from typing import Any

from governance import __version__
from governance.archive import package_versions, report_id_for
from governance.report.evidence import RunEvidence
from governance.report.format import fnum
from governance.report.inputs import ReportInputs
from governance.report.options import NOT_PROVIDED
from governance.report.sections import SECTIONS
from governance.report.sections.cover import evidence_date


def headings() -> list[dict[str, str]]:
    """``{"id", "number", "title", "template"}`` of every section, numbered in table order."""
    return [{"id": s.id, "number": str(n), "title": s.title, "template": s.template}
            for n, s in enumerate(SECTIONS, start=1)]


def _summary(inp: ReportInputs) -> list[dict[str, Any]]:
    """The cover's summary box: gates, contract, top features, stability, flags."""
    gates, validation, stability, flags = inp.gates, inp.validation, inp.stability, inp.flags
    return [
        {"label": "Policy gates", "value": gates["status"], "alert": gates["status"] == "FAILED"},
        {"label": "Data contract", "value": validation.get("success", NOT_PROVIDED),
         "alert": bool(validation.get("failed"))},
        {"label": "Top features", "value": ", ".join(inp.top_names[:3]), "alert": False},
        {"label": "Stability (rank correlation)", "value": f"{stability['value']} ({stability['verdict']})",
         "alert": stability["verdict"] == "UNSTABLE"},
        {"label": "Automatic risk flags", "value": fnum(len(flags)),
         "alert": any(f["severity"] == "high" for f in flags)},
    ]


def build_context(ev: RunEvidence) -> dict[str, Any]:
    """The complete, escaped-at-render, precomputed context of the audit report."""
    inp = ReportInputs(ev, headings=headings())
    opts, m = inp.opts, ev.model
    ctx: dict[str, Any] = {
        "meta": {"title": opts.title, "report_id": report_id(ev), "organisation": opts.organisation,
                 "classification": opts.classification, "date": evidence_date(inp),
                 "model_label": f"{m.name} v{m.version}" if m.name else (m.uri or ev.run_id),
                 "created_iso": ev.start_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "generator": f"mlflow-governance {__version__}",
                 "keywords": "model risk, audit, explainability, DLBacktrace"},
        "sections": inp.headings,
        "section": {s["id"]: s for s in inp.headings},
        "summary": _summary(inp),
    }
    for section in SECTIONS:
        ctx[section.id] = section.build(inp)
    return ctx


def report_id(ev: RunEvidence) -> str:
    """A stable id: hash of the run, the model and every input file's hash (recomputable from
    the manifest, see :func:`governance.archive.report_id_for`)."""
    return report_id_for(ev.run_id, ev.model.model_id, ev.model.artifact_sha256, ev.input_files)


def manifest_inputs(ev: RunEvidence) -> dict[str, Any]:
    """The ``inputs`` block of the manifest and of the evidence attachment."""
    return {
        "run_id": ev.run_id,
        "model_uri": ev.model.uri,
        "model_id": ev.model.model_id,
        "model_name": ev.model.name,
        "model_version": ev.model.version,
        "model_sha256": ev.model.artifact_sha256,
        "dataset_digest": ev.tags.get("governance.dataset_digest") or (ev.datasets[0]["digest"] if ev.datasets else None),
        "datasets": [{k: d.get(k) for k in ("name", "digest", "context", "sha256")} for d in ev.datasets],
        "config": ev.config,
        "package_versions": package_versions(),
        "input_files": ev.input_files,
    }
