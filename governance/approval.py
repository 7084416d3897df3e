"""Sign-off of a model version: dated approval or rejection, and the ``audited`` alias.

``approve`` records who signed, in which role, when, and what they decided, as ``governance.*``
tags on the model version and as an entry in ``governance/reports/approvals.json`` beside the
report (the manifest is then re-issued, chained to the previous one by its SHA-256). The alias
``audited`` is set only when the run's policy gates passed and ``verify`` succeeds on its
evidence; otherwise the approval is refused with every reason and nothing is recorded.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from governance.errors import InputError, PolicyError
from governance.archive import (
    MANIFEST_PATH,
    ROOT,
    ArchiveError,
    build_manifest,
    download_governance,
    manifest_bytes,
    sha256_file,
    verify_folder,
)

ALIAS = "audited"
APPROVALS_PATH = f"{ROOT}/reports/approvals.json"
DECISIONS = ("approve", "reject")


class ApprovalError(InputError):
    """The sign-off cannot be processed (unknown model version, bad arguments)."""


class ApprovalRefused(ApprovalError, PolicyError):
    """The approval was refused; ``reasons`` says why (gates, verification, missing evidence)."""

    exit_code = PolicyError.exit_code

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("approval refused: " + "; ".join(reasons))


@dataclass
class ApprovalResult:
    """What :func:`approve` recorded."""

    model_name: str
    version: str
    run_id: str | None
    decision: str
    entry: dict[str, Any]
    alias_set: bool = False
    alias_removed: bool = False
    logged_to_run: bool = False
    notes: list[str] = field(default_factory=list)


def _gate_reasons(client, run_id: str, folder: Path | None) -> list[str]:
    """Why the run's policy gates do not allow approval (empty when they passed)."""
    reasons = []
    tag = client.get_run(run_id).data.tags.get("governance.gates_passed")
    gates = None
    if folder is not None and (folder / ROOT / "explanations" / "gates.json").is_file():
        try:
            gates = json.loads((folder / ROOT / "explanations" / "gates.json").read_text())
        except ValueError:
            reasons.append("governance/explanations/gates.json is not valid JSON")
    if tag is None and gates is None:
        reasons.append(f"run {run_id} records no policy gate result (tag governance.gates_passed, gates.json)")
    if tag is not None and tag != "true":
        reasons.append(f"policy gates failed (run tag governance.gates_passed = {tag!r})")
    if gates is not None and not gates.get("passed"):
        failed = [g.get("name") or g.get("metric") for g in gates.get("gates", []) if not g.get("passed")]
        reasons.append("policy gates failed in gates.json" + (f": {', '.join(map(str, failed))}" if failed else ""))
    return reasons


def approve(model_name: str, version: str, approver: str, role: str, decision: str = "approve",
            comment: str | None = None, *, tracking_uri: str | None = None,
            now: datetime | None = None) -> ApprovalResult:
    """Record a sign-off; set the ``audited`` alias on approval when gates pass and verify succeeds."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from governance.report.evidence import find_governance_run

    if decision not in DECISIONS:
        raise ApprovalError(f"--decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    if not approver.strip() or not role.strip():
        raise ApprovalError("--approver and --role must not be empty")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        mv = client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise ApprovalError(f"model {model_name!r} version {version!r} not found in {mlflow.get_tracking_uri()}") from exc
    run_id = find_governance_run(client, model_name, str(version))
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
    reasons: list[str] = []
    with tempfile.TemporaryDirectory(prefix="governance-approve-") as tmp:
        folder: Path | None = None
        gate_reasons: list[str] = []
        verified = False
        manifest_sha = None
        if run_id is None:
            reasons.append(f"no governance run found for {model_name} version {version} "
                           "(run `mlflow-governance explain` and `report` first)")
        else:
            try:
                folder = download_governance(run_id, tmp, tracking_uri)
            except ArchiveError as exc:
                reasons.append(str(exc))
            gate_reasons = _gate_reasons(client, run_id, folder)
            reasons += gate_reasons
            if folder is not None:
                if not (folder / MANIFEST_PATH).is_file():
                    reasons.append(f"run {run_id} has no {MANIFEST_PATH}; run `mlflow-governance report` first")
                else:
                    try:
                        check = verify_folder(folder, source=f"run {run_id}")
                        verified = check.ok
                        manifest_sha = check.manifest_sha256
                        reasons += [f"verify failed: {p}" for p in check.problems]
                    except ArchiveError as exc:
                        reasons.append(f"verify failed: {exc}")
        if decision == "approve" and reasons:
            raise ApprovalRefused(reasons)
        entry = {
            "model_name": model_name,
            "version": str(mv.version),
            "run_id": run_id,
            "approver": approver,
            "role": role,
            "decision": decision,
            "comment": comment or "",
            "date": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gates_passed": run_id is not None and not gate_reasons,
            "verified": verified,
            "manifest_sha256": manifest_sha,
        }
        result = ApprovalResult(model_name, str(mv.version), run_id, decision, entry)
        if verified and folder is not None:
            _log_entry(client, run_id, folder, entry)
            result.logged_to_run = True
        else:
            result.notes.append("the run's evidence did not verify; the decision is recorded on the model "
                                "version only: " + "; ".join(reasons))
    count = int((mv.tags or {}).get("governance.approval_count", "0") or 0) + 1
    tags = {
        "governance.approval_count": str(count),
        "governance.approval_decision": decision,
        "governance.approval_approver": approver,
        "governance.approval_role": role,
        "governance.approval_date": entry["date"],
        "governance.approval_comment": comment or "",
        f"governance.approval.{count}": json.dumps(
            {k: entry[k] for k in ("approver", "role", "decision", "date", "comment")}, sort_keys=True),
        "governance.audited": "true" if decision == "approve" else "false",
    }
    if run_id:
        tags["governance.run_id"] = run_id
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(mv.version), key, value)
    if decision == "approve":
        client.set_registered_model_alias(model_name, ALIAS, str(mv.version))
        result.alias_set = True
    elif ALIAS in (mv.aliases or []):
        client.delete_registered_model_alias(model_name, ALIAS)
        result.alias_removed = True
    return result


def _log_entry(client, run_id: str, folder: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to approvals.json, re-issue the manifest (chained), log both (manifest last)."""
    path = folder / APPROVALS_PATH
    doc = json.loads(path.read_text()) if path.is_file() else {"entries": []}
    doc.setdefault("entries", []).append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    manifest_file = folder / MANIFEST_PATH
    old = json.loads(manifest_file.read_text())
    previous = sha256_file(manifest_file)
    manifest_file.unlink()
    new = build_manifest(folder, old.get("inputs", {}), run_id=run_id, previous_manifest_sha256=previous)
    manifest_file.write_bytes(manifest_bytes(new))
    client.log_artifact(run_id, str(path), f"{ROOT}/reports")
    client.log_artifact(run_id, str(manifest_file), ROOT)
