"""Section 1: cover and control block (ids, digests, hashes, sign-off)."""

from __future__ import annotations

from typing import Any

from governance import __version__
from governance.report.format import ftext, kv_rows, not_provided
from governance.report.inputs import ReportInputs
from governance.report.options import ReportOptions
from governance.report.evidence import NOT_RECORDED, RunEvidence


def evidence_date(inp: ReportInputs) -> str:
    """The evidence basis date: the explanation run's start (with the hour when configured)."""
    when = inp.ev.start_time
    return when.strftime("%Y-%m-%d %H:%M UTC") if inp.opts.show_timestamp else when.strftime("%Y-%m-%d")


def signoff(ev: RunEvidence, opts: ReportOptions) -> dict[str, Any]:
    """Required sign-off roles and the approvals recorded so far."""
    recorded = []
    for e in ev.approvals:
        recorded.append({"role": ftext(e.get("role")), "name": ftext(e.get("approver")),
                         "decision": ftext(e.get("decision")), "date": ftext(e.get("date")),
                         "comment": ftext(e.get("comment")) if e.get("comment") else ""})
    return {"roles": opts.signoff_roles, "recorded": recorded,
            "recorded_missing": None if recorded else not_provided(
                "no sign-off has been recorded yet (`mlflow-governance approve`)")}


def dataset_hashes(ev: RunEvidence) -> str:
    """Each input's SHA-256 as recorded by explain (one per input, never one copied to all)."""
    if not ev.datasets:
        return not_provided("no dataset was logged as an input of the run")
    if len(ev.datasets) == 1:
        return ev.datasets[0].get("sha256") or NOT_RECORDED
    return "; ".join(f"{d.get('name')} ({d.get('role') or d.get('context')}): {d.get('sha256') or NOT_RECORDED}"
                     for d in ev.datasets)


def feature_order_text(ev: RunEvidence) -> str:
    """How the stage knew the model's feature order (run tags ``governance.feature_order*``)."""
    state = ev.tags.get("governance.feature_order")
    source = ev.tags.get("governance.feature_order_source")
    if state == "unverified":
        return "UNVERIFIED: the model carries no feature names; the validation file's column order was assumed"
    if state == "verified":
        return f"verified (from the {source})" if source and source != "none" else "verified"
    return "not recorded by the explanation run"


def build(inp: ReportInputs) -> dict[str, Any]:
    """Ids, digests and hashes of everything the report rests on, and the sign-off table."""
    from governance.report.context import report_id

    ev, m = inp.ev, inp.ev.model
    dataset_digest = ev.tags.get("governance.dataset_digest") or (ev.datasets[0]["digest"] if ev.datasets else None)
    rows = kv_rows([
        ("Report id", report_id(ev)),
        ("Registered model", m.name or not_provided("the model is not registered")),
        ("Version", m.version),
        ("Aliases", m.aliases or "none"),
        ("Model id", m.model_id),
        ("Model URI", m.uri),
        ("Explanation run id", ev.run_id + (f" ({ev.run_name})" if ev.run_name else "")),
        ("Parent run id", ev.parent_run_id or "none"),
        ("Training run id", m.source_run_id),
        ("Experiment", f"{ev.experiment_name} ({ev.experiment_id})"),
        ("Dataset digest (MLflow)", dataset_digest),
        ("Dataset SHA-256 (taken by explain)", dataset_hashes(ev)),
        ("Feature order", feature_order_text(ev)),
        ("Model artifact SHA-256", f"{m.artifact_sha256} (tree of {m.artifact_files} files)" if m.artifact_sha256
         else None),
        ("Evidence basis date", evidence_date(inp) + " (start of the explanation run)"),
        ("Generator", f"mlflow-governance {__version__}"),
        ("Policy gates (explanation run's own)", inp.gates["status"]),
    ] + ([("Model loading", "from a pickle, by explicit opt-in (allow_pickle): loading ran code stored with "
                            "the model")] if ev.tags.get("governance.allow_pickle") == "true" else []))
    return {"rows": rows, "signoff": signoff(ev, inp.opts)}
