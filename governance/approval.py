"""Sign-off of a model version: dated approval or rejection, and the ``audited`` alias.

``approve`` takes the version's current evidence (the run that explained it, which must hold
the report of that explanation), verifies it (every file, the manifest's consistency, and the
manifest against the run tag ``governance.manifest_sha256``), and evaluates the **approver's**
policy (:mod:`governance.policy`) on the logged ``quality.json`` and ``stability.json``. The
gates the explanation run configured itself are shown in the report but decide nothing.

On approval it records who signed, in which role, when, under which policy (name and SHA-256),
as ``governance.*`` tags on the model version and as an entry in
``governance/reports/approvals.json`` beside the report; the manifest is re-issued, chained to
the previous one by its SHA-256, and re-anchored (run tag and version tag). The version's state
and the alias ``audited`` are set through :mod:`governance.registry`. Otherwise the approval is
refused with every reason and nothing is recorded. A rejection is always recorded.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from governance.archive import (
    MANIFEST_PATH,
    MANIFEST_TAG,
    ROOT,
    ArchiveError,
    build_manifest,
    download_governance,
    manifest_bytes,
    sha256_bytes,
    sha256_file,
    verify_folder,
)
from governance.errors import InputError, PolicyError
from governance.policy import Policy, evaluate_policy, resolve_policy

ALIAS = "audited"
APPROVALS_PATH = f"{ROOT}/reports/approvals.json"
DECISIONS = ("approve", "reject")


class ApprovalError(InputError):
    """The sign-off cannot be processed (unknown model version, bad arguments)."""


class ApprovalRefused(ApprovalError, PolicyError):
    """The approval was refused; ``reasons`` says why (policy gates, verification, missing evidence)."""

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
    policy: Policy | None = None
    alias_set: bool = False
    alias_removed: bool = False
    logged_to_run: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class _Evidence:
    """The downloaded, checked evidence of the run under review."""

    run_id: str | None
    folder: Path | None = None
    verified: bool = False
    manifest_sha256: str | None = None
    reasons: list[str] = field(default_factory=list)

    def read(self, rel: str) -> dict[str, Any] | None:
        """A JSON file of the verified evidence (None when absent or not verified)."""
        if self.folder is None or not self.verified:
            return None
        path = self.folder / ROOT / rel
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except ValueError:
            return None


def _evidence_run(client, state, model_name: str, version: str) -> tuple[str | None, list[str]]:
    """The run whose report is of the version's latest explanation, or the reasons there is none."""
    from governance.report.evidence import find_governance_run

    current = state.current_run_id or find_governance_run(client, model_name, version)
    if current is None:
        return None, [f"no governance run found for {model_name} version {version} "
                      "(run `mlflow-governance explain` and `report` first)"]
    if state.report_run_id and state.report_run_id != current:
        return None, [f"the latest explanation of {model_name} version {version} (run {current}) has no report "
                      f"yet (the report is of run {state.report_run_id}); run `mlflow-governance report --run-id "
                      f"{current}` first"]
    return current, []


def _check(client, run_id: str, tmp: str, tracking_uri: str | None) -> _Evidence:
    """Download ``run_id``'s evidence and verify it against its manifest and the run's anchor."""
    ev = _Evidence(run_id)
    try:
        ev.folder = download_governance(run_id, tmp, tracking_uri)
    except ArchiveError as exc:
        ev.reasons.append(str(exc))
        return ev
    if not (ev.folder / MANIFEST_PATH).is_file():
        ev.reasons.append(f"run {run_id} has no {MANIFEST_PATH}; run `mlflow-governance report` first")
        return ev
    anchor = client.get_run(run_id).data.tags.get(MANIFEST_TAG)
    if anchor is None:
        ev.reasons.append(f"run {run_id} has no {MANIFEST_TAG} tag (its report predates anchoring); run "
                          "`mlflow-governance report` on it again")
    try:
        check = verify_folder(ev.folder, source=f"run {run_id}", expected_sha256=anchor,
                              anchor=f"run tag {MANIFEST_TAG}")
    except ArchiveError as exc:
        ev.reasons.append(f"verify failed: {exc}")
        return ev
    ev.manifest_sha256 = check.manifest_sha256
    ev.reasons += [f"verify failed: {p}" for p in check.problems]
    ev.verified = check.ok and anchor is not None
    return ev


def _gate_reasons(policy: Policy, evaluation: dict[str, Any]) -> list[str]:
    """One reason per failed gate of the approver's policy."""
    return [f"policy {policy.name!r} gate failed: {g['name']}" + (f" ({g['reason']})" if g.get("reason") else "")
            for g in evaluation["gates"] if not g["passed"]]


def approve(model_name: str, version: str, approver: str, role: str, decision: str = "approve",
            comment: str | None = None, *, policy: str | None = None, tracking_uri: str | None = None,
            now: datetime | None = None) -> ApprovalResult:
    """Record a sign-off. An approval needs the approver's policy (``policy``: a file or a packaged
    name, else the one registered for the model) to pass on verified evidence."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from governance import registry

    if decision not in DECISIONS:
        raise ApprovalError(f"--decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    if not approver.strip() or not role.strip():
        raise ApprovalError("--approver and --role must not be empty")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        mv = client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise ApprovalError(f"model {model_name!r} version {version!r} not found in {mlflow.get_tracking_uri()}") from exc
    version = str(mv.version)
    pol = resolve_policy(policy, client, model_name) if decision == "approve" or policy else None
    state = registry.version_state(client, model_name, version)
    run_id, reasons = _evidence_run(client, state, model_name, version)
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="governance-approve-") as tmp:
        ev = _check(client, run_id, tmp, tracking_uri) if run_id else _Evidence(None)
        reasons += ev.reasons
        evaluation = None
        if pol is not None and ev.verified:
            evaluation = evaluate_policy(pol, ev.read("explanations/quality.json"),
                                         ev.read("explanations/stability.json"))
            reasons += _gate_reasons(pol, evaluation)
        if decision == "approve" and reasons:
            raise ApprovalRefused(reasons)
        explain_gates = ev.read("explanations/gates.json")
        entry = {
            "model_name": model_name,
            "version": version,
            "run_id": run_id,
            "approver": approver,
            "role": role,
            "decision": decision,
            "comment": comment or "",
            "date": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "policy": pol.record() if pol else None,
            "policy_gates": evaluation["gates"] if evaluation else None,
            "gates_passed": bool(evaluation and evaluation["passed"]),
            "explanation_run_gates_passed": None if explain_gates is None else bool(explain_gates.get("passed")),
            "verified": ev.verified,
            "manifest_sha256": ev.manifest_sha256,
        }
        result = ApprovalResult(model_name, version, run_id, decision, entry, policy=pol)
        manifest_sha = None
        if ev.verified and ev.folder is not None and run_id:
            manifest_sha = _log_entry(client, run_id, ev.folder, entry)
            result.logged_to_run = True
        else:
            result.notes.append("the run's evidence did not verify; the decision is recorded on the model "
                                "version only: " + "; ".join(reasons))
        if explain_gates is not None and not explain_gates.get("passed") and decision == "approve":
            result.notes.append("the explanation run's own gates failed (see the report); the approver's policy "
                                "decided")
    _sign_off_tags(client, model_name, version, mv.tags or {}, entry)
    before = ALIAS in (mv.aliases or [])
    new = registry.record_decision(model_name, version, run_id or "", decision, manifest_sha,
                                   policy=pol.record() if pol else None, client=client)
    result.alias_set = decision == "approve"
    result.alias_removed = before and ALIAS not in new.aliases
    return result


def _sign_off_tags(client, model_name: str, version: str, tags: dict[str, str], entry: dict[str, Any]) -> None:
    """Who signed, when and what (the latest sign-off, and each one numbered)."""
    count = int(tags.get("governance.approval_count", "0") or 0) + 1
    policy = entry.get("policy") or {}
    out = {
        "governance.approval_count": str(count),
        "governance.approval_decision": entry["decision"],
        "governance.approval_approver": entry["approver"],
        "governance.approval_role": entry["role"],
        "governance.approval_date": entry["date"],
        "governance.approval_comment": entry["comment"],
        f"governance.approval.{count}": json.dumps(
            {**{k: entry[k] for k in ("approver", "role", "decision", "date", "comment", "run_id")},
             "policy_sha256": policy.get("sha256")}, sort_keys=True),
    }
    for key, value in out.items():
        client.set_model_version_tag(model_name, version, key, value)


def _log_entry(client, run_id: str, folder: Path, entry: dict[str, Any]) -> str:
    """Append ``entry`` to approvals.json, re-issue the manifest (chained), log both (manifest last)
    and re-anchor it (run tag); return the new manifest's SHA-256."""
    path = folder / APPROVALS_PATH
    doc = json.loads(path.read_text()) if path.is_file() else {"entries": []}
    doc.setdefault("entries", []).append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    manifest_file = folder / MANIFEST_PATH
    old = json.loads(manifest_file.read_text())
    previous = sha256_file(manifest_file)
    manifest_file.unlink()
    new = build_manifest(folder, old.get("inputs", {}), run_id=run_id, report_id=old.get("report_id"),
                         previous_manifest_sha256=previous)
    data = manifest_bytes(new)
    manifest_file.write_bytes(data)
    client.log_artifact(run_id, str(path), f"{ROOT}/reports")
    client.log_artifact(run_id, str(manifest_file), ROOT)
    digest = sha256_bytes(data)
    client.set_tag(run_id, MANIFEST_TAG, digest)
    return digest
