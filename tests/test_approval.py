"""`approve`: dated sign-off; alias `audited` only for passing gates and verified evidence."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from governance.archive import verify_run
from governance.cli import main


def _approve(store, key: str, *extra: str):
    return CliRunner().invoke(main, ["approve", "--model-name", store.model_name, "--version", store.versions[key],
                                     "--approver", "Dana Reviewer", "--role", "Independent validator", *extra])


def test_refused_when_the_policy_gate_failed(published, tracking):
    client = __import__("mlflow").MlflowClient()
    before = client.get_registered_model(tracking.model_name).aliases
    res = _approve(tracking, "v3")
    assert res.exit_code == 3, res.output
    assert "refused" in res.output and "policy gates failed" in res.output
    assert "delta AUC beats threshold" in res.output  # names the failed gate
    mv = client.get_model_version(tracking.model_name, tracking.versions["v3"])
    assert "audited" not in mv.aliases
    assert "governance.approval_decision" not in mv.tags  # nothing recorded
    assert client.get_registered_model(tracking.model_name).aliases == before


def test_approve_sets_audited_on_a_passing_verified_run(published, tracking):
    import mlflow

    client = mlflow.MlflowClient()
    rid = tracking.explain_run_ids["v2"]
    assert verify_run(rid).ok
    res = _approve(tracking, "v2", "--comment", "Reviewed <all> sections")
    assert res.exit_code == 0, res.output
    assert "alias 'audited' -> credit-risk version 2" in res.output
    mv = client.get_model_version_by_alias(tracking.model_name, "audited")
    assert str(mv.version) == tracking.versions["v2"]
    assert mv.tags["governance.approval_decision"] == "approve"
    assert mv.tags["governance.approval_approver"] == "Dana Reviewer"
    assert mv.tags["governance.approval_role"] == "Independent validator"
    date = datetime.strptime(mv.tags["governance.approval_date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - date).total_seconds()) < 600
    assert mv.tags["governance.audited"] == "true"
    # the JSON entry is logged beside the report, and the re-issued manifest still verifies
    path = client.download_artifacts(rid, "governance/reports/approvals.json")
    entries = json.loads(open(path).read())["entries"]
    assert entries[-1]["approver"] == "Dana Reviewer" and entries[-1]["decision"] == "approve"
    assert entries[-1]["verified"] is True and len(entries[-1]["manifest_sha256"]) == 64
    check = verify_run(rid)
    assert check.ok, check.summary()
    manifest = json.loads(open(client.download_artifacts(rid, "governance/manifest.json")).read())
    assert manifest["previous_manifest_sha256"] == entries[-1]["manifest_sha256"]
    assert "governance/reports/approvals.json" in {f["path"] for f in manifest["files"]}


def test_reject_records_sign_off_and_removes_the_alias(published, tracking):
    import mlflow

    client = mlflow.MlflowClient()
    res = _approve(tracking, "v2", "--decision", "reject", "--comment", "second look")
    assert res.exit_code == 0, res.output
    mv = client.get_model_version(tracking.model_name, tracking.versions["v2"])
    assert "audited" not in mv.aliases
    assert mv.tags["governance.approval_decision"] == "reject"
    assert mv.tags["governance.audited"] == "false"
    assert int(mv.tags["governance.approval_count"]) >= 2
    assert verify_run(tracking.explain_run_ids["v2"]).ok
    # approve again so that later tests see the final state: audited on version 2
    assert _approve(tracking, "v2").exit_code == 0


def test_refused_when_the_evidence_was_tampered_with(published, tracking, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    rid = tracking.explain_run_ids["v2"]
    original = client.download_artifacts(rid, "governance/explanations/stability.json", str(tmp_path / "orig"))
    tampered = tmp_path / "t" / "stability.json"
    tampered.parent.mkdir()
    tampered.write_text(json.dumps({"spearman": 1.0}))
    client.log_artifact(rid, str(tampered), "governance/explanations")
    try:
        res = _approve(tracking, "v2")
        assert res.exit_code == 3
        assert "verify failed: CHANGED: governance/explanations/stability.json" in res.output
    finally:
        client.log_artifact(rid, original, "governance/explanations")
    assert verify_run(rid).ok


def test_unknown_model_version_and_bad_arguments(tracking):
    res = CliRunner().invoke(main, ["approve", "--model-name", "nope", "--version", "1", "--approver", "a",
                                    "--role", "b"])
    assert res.exit_code == 2 and "not found" in res.output
    res = CliRunner().invoke(main, ["approve", "--model-name", "x", "--version", "1", "--approver", "a",
                                    "--role", "b", "--decision", "maybe"])
    assert res.exit_code != 0


def test_refused_without_a_report(tracking):
    from governance.approval import ApprovalRefused, approve

    # version 1 has explanation artifacts but no report (no manifest): approval must be refused
    with pytest.raises(ApprovalRefused) as info:
        approve(tracking.model_name, tracking.versions["v1"], "A", "B")
    assert any("manifest.json" in r for r in info.value.reasons)
