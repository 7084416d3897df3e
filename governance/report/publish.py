"""The report step: read a run's evidence, render everything, log it, write the manifest last.

Everything is rendered into a temporary copy of the run's ``governance/`` folder first; only when
every file rendered does anything get logged (reports, then the model card, then the manifest),
so a failure never leaves a half-written set of artifacts behind a valid manifest.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from governance.archive import MANIFEST_PATH, ROOT, build_manifest, manifest_bytes, sha256_bytes
from governance.report.context import build_context, manifest_inputs, report_id
from governance.report.evidence import (
    RunEvidence,
    find_governance_run,
    load_model_facts,
    load_run_evidence,
    resolve_model_version,
)
from governance.report.model_card import build_model_card, render_model_card
from governance.report.options import ReportError, parse_model_card_options, parse_report_options
from governance.report.render import render_html, render_pdf

REPORT_HTML = f"{ROOT}/reports/audit_report.html"
REPORT_PDF = f"{ROOT}/reports/audit_report.pdf"
CARD_DIR = f"{ROOT}/model_card"


@dataclass
class ReportResult:
    """What :func:`publish_report` produced."""

    run_id: str
    report_id: str
    files: dict[str, str] = field(default_factory=dict)  # artifact path -> sha256
    manifest_sha256: str = ""
    pdf_bytes: int = 0
    seconds: float = 0.0
    output_dir: Path | None = None
    logged: bool = False


def read_config_file(path: str | Path | None) -> dict[str, Any] | None:
    """The ``report`` / ``model_card`` / ``reason_codes`` sections of a ``governance.yaml``."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ReportError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{p}: the top level must be a mapping of sections")
    try:  # the pipeline's validator, when present, checks the whole file
        from governance.config import ConfigError, config_from_dict

        try:
            config_from_dict(data)
        except ConfigError as exc:
            raise ReportError(f"{p}: {exc}") from exc
    except ImportError:
        pass
    return {k: data.get(k) for k in ("report", "model_card", "reason_codes") if data.get(k) is not None}


def evidence_document(ev: RunEvidence, report_id: str) -> dict[str, Any]:
    """The JSON attached to the PDF."""
    return {
        "report_id": report_id,
        "run_id": ev.run_id,
        "global_importance": ev.global_importance,
        "layer_ranking": ev.layer_ranking,
        "validation_result": ev.validation,
        "gates": ev.gates,
        "stability": ev.stability,
        "manifest_inputs": manifest_inputs(ev),
    }


def render_all(ev: RunEvidence) -> dict[str, bytes]:
    """Every output file (artifact path -> bytes) for ``ev``; nothing is written or logged."""
    parse_report_options(ev.config.get("report"))
    parse_model_card_options(ev.config.get("model_card"))
    ctx = build_context(ev)
    html = render_html(ctx)
    pdf = render_pdf(html, created=ev.start_time, evidence=evidence_document(ev, ctx["meta"]["report_id"]))
    card = build_model_card(ev.model, ev, ev.config.get("model_card"), date=ev.start_time.strftime("%Y-%m-%d"))
    out = {REPORT_HTML: html.encode("utf-8"), REPORT_PDF: pdf}
    for name, data in render_model_card(card).items():
        out[f"{CARD_DIR}/{name}"] = data
    return out


def publish_report(run_id: str, *, config_path: str | Path | None = None, output_dir: str | Path | None = None,
                   tracking_uri: str | None = None, log: bool = True) -> ReportResult:
    """Render the report and model card of ``run_id``, log them and the manifest (last)."""
    import mlflow

    t0 = time.perf_counter()
    override = read_config_file(config_path)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="governance-report-") as tmp:
        ev = load_run_evidence(run_id, tracking_uri=tracking_uri, config_override=override, workdir=Path(tmp))
        outputs = render_all(ev)
        stage = ev.root  # a full copy of the run's governance/ folder
        for rel, data in outputs.items():
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        stale = stage / MANIFEST_PATH
        if stale.exists():
            stale.unlink()
        manifest = build_manifest(stage, manifest_inputs(ev), run_id=run_id)
        mbytes = manifest_bytes(manifest)
        (stage / MANIFEST_PATH).write_bytes(mbytes)
        result = ReportResult(run_id=run_id, report_id=report_id(ev),
                              files={rel: sha256_bytes(d) for rel, d in outputs.items()},
                              manifest_sha256=sha256_bytes(mbytes), pdf_bytes=len(outputs[REPORT_PDF]))
        if output_dir is not None:
            dest = Path(output_dir)
            if (dest / ROOT).exists():
                shutil.rmtree(dest / ROOT)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copytree(stage / ROOT, dest / ROOT)
            result.output_dir = dest
        if log:
            client.log_artifacts(run_id, str(stage / ROOT / "reports"), f"{ROOT}/reports")
            client.log_artifacts(run_id, str(stage / CARD_DIR), CARD_DIR)
            client.log_artifact(run_id, str(stage / MANIFEST_PATH), ROOT)  # last
            client.set_tag(run_id, "governance.status", "reported")
            client.set_tag(run_id, "governance.report_id", result.report_id)
            if ev.model.name and ev.model.version:
                client.set_model_version_tag(ev.model.name, ev.model.version, "governance.run_id", run_id)
                client.set_model_version_tag(ev.model.name, ev.model.version, "governance.report_id", result.report_id)
            result.logged = True
    result.seconds = time.perf_counter() - t0
    return result


def publish_model_card(model_uri: str, *, run_id: str | None = None, config_path: str | Path | None = None,
                       output_dir: str | Path = "model_card", tracking_uri: str | None = None) -> dict[str, Path]:
    """The model card alone for ``model_uri`` (explanation results from its governance run, if any)."""
    import mlflow

    override = read_config_file(config_path) or {}
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    explicit = run_id is not None
    with tempfile.TemporaryDirectory(prefix="governance-card-") as tmp:
        if run_id is None:
            mv = resolve_model_version(client, model_uri)
            if mv is not None:
                run_id = find_governance_run(client, mv.name, str(mv.version))
        ev = None
        if run_id is not None:
            try:
                ev = load_run_evidence(run_id, tracking_uri=tracking_uri, config_override=override,
                                       workdir=Path(tmp) / "run")
            except ReportError:
                if explicit:
                    raise
                ev = None
        if ev is not None:
            facts = ev.model if ev.model.uri else load_model_facts(
                client, model_uri, with_architecture=True, layer_types={}, workdir=Path(tmp))
            card_cfg = ev.config.get("model_card")
            date = ev.start_time.strftime("%Y-%m-%d")
        else:
            facts = load_model_facts(client, model_uri, with_architecture=True, layer_types={}, workdir=Path(tmp))
            if facts.local_path is None:
                raise ReportError(f"model {model_uri!r} not found: {facts.architecture_note}")
            card_cfg = override.get("model_card")
            date = facts.created[:10] if facts.created else None
        card = build_model_card(facts, ev, card_cfg, date=date)
        files = render_model_card(card)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, data in files.items():
        (out / name).write_bytes(data)
        written[name] = out / name
    return written
