"""The report step: read a run's evidence, render everything, log it, write the manifest last.

Everything is rendered into a temporary copy of the run's ``governance/`` folder first; only when
every file rendered does anything get logged (reports, then the model card, then the manifest),
so a failure never leaves a half-written set of artifacts behind a valid manifest. The
manifest's own hash is then recorded as the run tag ``governance.manifest_sha256`` (the anchor
``verify`` checks) and the model version's state is updated (:mod:`governance.registry`).
A folder given with ``--output-dir`` must be new or empty: nothing the command did not write is
ever deleted or overwritten.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from governance.archive import MANIFEST_PATH, MANIFEST_TAG, ROOT, build_manifest, manifest_bytes, sha256_bytes
from governance.report.context import build_context, manifest_inputs, report_id
from governance.report.evidence import (
    RunEvidence,
    find_governance_run,
    load_model_facts,
    load_run_evidence,
    resolve_model_version,
)
from governance.report.model_card import approval_text, build_model_card, render_model_card
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
    notes: list[str] = field(default_factory=list)


@dataclass
class CardResult:
    """What :func:`publish_model_card` produced: the files, and where they went."""

    files: dict[str, bytes]
    run_id: str | None = None
    written: dict[str, Path] = field(default_factory=dict)  # name -> path (with --output-dir)
    artifact_uri: str | None = None  # runs:/<id>/model_cards/... (without --output-dir)


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


def check_output_dir(output_dir: str | Path) -> Path:
    """``output_dir`` if it does not exist or is an empty folder; otherwise a :class:`ReportError`
    (the command never deletes or overwrites what it did not write)."""
    dest = Path(output_dir)
    if dest.exists() and not dest.is_dir():
        raise ReportError(f"--output-dir {dest} is a file; give a new or empty folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise ReportError(f"--output-dir {dest} is not empty; give a new or empty folder (nothing was written)")
    return dest


def write_output_dir(files: Path | dict[str, bytes], dest: Path, *, subdir: str | None = None) -> Path:
    """Copy a folder (or write ``{name: bytes}``) into the new or empty folder ``dest``; on failure
    remove what this call created, and only that."""
    created = not dest.exists()
    check_output_dir(dest)
    target = dest / subdir if subdir else dest
    try:
        dest.mkdir(parents=True, exist_ok=True)
        if isinstance(files, Path):
            shutil.copytree(files, target)
        else:
            target.mkdir(parents=True, exist_ok=True)
            for name, data in sorted(files.items()):
                (target / name).write_bytes(data)
    except OSError as exc:
        shutil.rmtree(dest if created else target, ignore_errors=True)
        if not created and subdir is None:  # the caller's empty folder: leave it, emptied of our files only
            dest.mkdir(exist_ok=True)
        raise ReportError(f"cannot write into {dest}: {exc}") from exc
    return target


def publish_report(run_id: str, *, config_path: str | Path | None = None, output_dir: str | Path | None = None,
                   tracking_uri: str | None = None, log: bool = True, allow_pickle: bool = False) -> ReportResult:
    """Render the report and model card of ``run_id``, log them and the manifest (last), anchor
    the manifest (run tag ``governance.manifest_sha256``) and update the model version's state.

    ``output_dir`` must be new or empty: a copy of the complete ``governance/`` folder is written
    there. ``allow_pickle`` lets a run without a recorded model summary load a pickled model.
    """
    import mlflow

    from governance import registry

    t0 = time.perf_counter()
    if output_dir is not None:
        check_output_dir(output_dir)
    override = read_config_file(config_path)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="governance-report-") as tmp:
        ev = load_run_evidence(run_id, tracking_uri=tracking_uri, config_override=override, workdir=Path(tmp),
                               allow_pickle=allow_pickle)
        outputs = render_all(ev)
        stage = ev.root  # a full copy of the run's governance/ folder
        for rel, data in outputs.items():
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        stale = stage / MANIFEST_PATH
        if stale.exists():
            stale.unlink()
        rid = report_id(ev)
        manifest = build_manifest(stage, manifest_inputs(ev), run_id=run_id, report_id=rid)
        mbytes = manifest_bytes(manifest)
        (stage / MANIFEST_PATH).write_bytes(mbytes)
        result = ReportResult(run_id=run_id, report_id=rid,
                              files={rel: sha256_bytes(d) for rel, d in outputs.items()},
                              manifest_sha256=sha256_bytes(mbytes), pdf_bytes=len(outputs[REPORT_PDF]))
        if output_dir is not None:
            write_output_dir(stage / ROOT, Path(output_dir), subdir=ROOT)
            result.output_dir = Path(output_dir)
        if log:
            client.log_artifacts(run_id, str(stage / ROOT / "reports"), f"{ROOT}/reports")
            client.log_artifacts(run_id, str(stage / CARD_DIR), CARD_DIR)
            client.log_artifact(run_id, str(stage / MANIFEST_PATH), ROOT)  # last
            client.set_tag(run_id, MANIFEST_TAG, result.manifest_sha256)
            client.set_tag(run_id, "governance.status", "reported")
            client.set_tag(run_id, "governance.report_id", result.report_id)
            if ev.model.name and ev.model.version:
                state = registry.record_reported(ev.model.name, ev.model.version, run_id, result.report_id,
                                                 result.manifest_sha256, client=client)
                result.notes += state.notes
            result.logged = True
    result.seconds = time.perf_counter() - t0
    return result


def card_run_id(client, model_uri: str) -> str | None:
    """The governance run a model card of ``model_uri`` cites: for ``models:/name@audited`` the
    approved run (the alias only stands while the approval does), else the version's latest run."""
    from governance import registry

    mv = resolve_model_version(client, model_uri)
    if mv is None:
        return None
    if model_uri.endswith(f"@{registry.ALIAS}"):
        state = registry.version_state(client, mv.name, str(mv.version))
        if state.approved_run_id and state.approval_state == "approved":
            return state.approved_run_id
        raise ReportError(f"{model_uri} points at version {mv.version}, whose approval is "
                          f"{state.approval_state or 'not recorded'}; give --run-id or a version number")
    return find_governance_run(client, mv.name, str(mv.version))


def publish_model_card(model_uri: str, *, run_id: str | None = None, config_path: str | Path | None = None,
                       output_dir: str | Path | None = None, tracking_uri: str | None = None,
                       allow_pickle: bool = False) -> CardResult:
    """The model card alone for ``model_uri`` (explanation results from its governance run).

    Written into ``output_dir`` (new or empty) when given; otherwise logged to the governance run
    under ``model_cards/<name>-v<version>/`` (outside ``governance/``, whose manifest it would
    break). Facts come from what the run recorded; a model is loaded only when no summary was
    recorded, and a pickled one only with ``allow_pickle``.
    """
    import mlflow

    if output_dir is not None:
        check_output_dir(output_dir)
    override = read_config_file(config_path) or {}
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    explicit = run_id is not None
    with tempfile.TemporaryDirectory(prefix="governance-card-") as tmp:
        if run_id is None:
            run_id = card_run_id(client, model_uri)
        ev = None
        if run_id is not None:
            try:
                ev = load_run_evidence(run_id, tracking_uri=tracking_uri, config_override=override,
                                       workdir=Path(tmp) / "run", allow_pickle=allow_pickle)
            except ReportError:
                if explicit:
                    raise
                ev = None
        if ev is not None:
            facts = ev.model if ev.model.uri else load_model_facts(
                client, model_uri, with_architecture=True, layer_types={}, workdir=Path(tmp),
                allow_pickle=allow_pickle)
            card_cfg = ev.config.get("model_card")
            date = ev.start_time.strftime("%Y-%m-%d")
        else:
            facts = load_model_facts(client, model_uri, with_architecture=True, layer_types={}, workdir=Path(tmp),
                                     allow_pickle=allow_pickle)
            if facts.local_path is None:
                raise ReportError(f"model {model_uri!r} not found: {facts.architecture_note}")
            card_cfg = override.get("model_card")
            date = facts.created[:10] if facts.created else None
        card = build_model_card(facts, ev, card_cfg, date=date, approval=approval_text(facts))
        files = render_model_card(card)
        result = CardResult(files=files, run_id=ev.run_id if ev is not None else None)
        if output_dir is not None:
            out = write_output_dir(files, Path(output_dir))
            result.written = {name: out / name for name in sorted(files)}
            return result
        if ev is None:
            raise ReportError(f"{model_uri} has no governance run to log the card to; give --output-dir DIR")
        label = f"{facts.name}-v{facts.version}" if facts.name and facts.version else "model"
        folder = Path(tmp) / "card"
        write_output_dir(files, folder)
        path = f"model_cards/{label}"
        client.log_artifacts(ev.run_id, str(folder), path)
        result.artifact_uri = f"runs:/{ev.run_id}/{path}"
    return result
