"""`approve`: the approver's policy on verified evidence decides; a dated sign-off; alias `audited`.

Separation of duties is reproduced for real: the explanation runs of the fixture configure gates
of their own (v2's trivially passes, v3's fails), and approval follows the approver's policy on
the logged quality.json / stability.json whatever those say.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib import resources

import pytest
import yaml
from click.testing import CliRunner

from governance.archive import sha256_file, verify_run
from governance.cli import main

STRICT = {"name": "strict", "gates": [{"name": "signed deletion gap at least 0.9", "metric": "delta_auc",
                                       "method": "backtrace_signed", "op": ">=", "threshold": 0.9}]}


def _approve(store, key: str, *extra: str):
    return CliRunner().invoke(main, ["approve", "--model-name", store.model_name, "--version", store.versions[key],
                                     "--approver", "Dana Reviewer", "--role", "Independent validator", *extra])


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _default_sha() -> str:
    return hashlib.sha256((resources.files("governance") / "policies" / "default.yaml").read_bytes()).hexdigest()


def test_refused_without_a_policy(published, tracking):
    client = _client()
    before = client.get_registered_model(tracking.model_name).aliases
    res = _approve(tracking, "v2")
    assert res.exit_code == 3, res.output
    assert res.output.startswith("error: no approval policy: give --policy FILE")
    assert "Traceback" not in res.output
    mv = client.get_model_version(tracking.model_name, tracking.versions["v2"])
    assert "governance.approval_decision" not in mv.tags
    assert client.get_registered_model(tracking.model_name).aliases == before


def test_the_approvers_policy_decides_not_the_explainers_gates(published, tracking, tmp_path):
    """v2's own gate (chosen by whoever ran explain) passes; the approver's stricter policy fails
    on the same quality.json, and the approval is refused, naming the approver's gate."""
    client = _client()
    run_tags = client.get_run(tracking.explain_run_ids["v2"]).data.tags
    assert run_tags["governance.gates_passed"] == "true"
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(STRICT))
    res = _approve(tracking, "v2", "--policy", str(strict))
    assert res.exit_code == 3, res.output
    assert "policy 'strict' gate failed: signed deletion gap at least 0.9" in res.output
    mv = client.get_model_version(tracking.model_name, tracking.versions["v2"])
    assert "governance.approval_decision" not in mv.tags and "audited" not in mv.aliases


def test_a_failing_explainer_gate_does_not_block_the_approvers_policy(published, tracking):
    """v3's own gate failed (its explainer asked delta AUC > 0.95); the approver's default policy
    passes on its evidence, so it is approved, with a note. Then rejected again."""
    client = _client()
    assert client.get_run(tracking.explain_run_ids["v3"]).data.tags["governance.gates_passed"] == "false"
    res = _approve(tracking, "v3", "--policy", "default")
    assert res.exit_code == 0, res.output
    assert "the explanation run's own gates failed" in res.output
    res = _approve(tracking, "v3", "--decision", "reject", "--comment", "owner withdrew it")
    assert res.exit_code == 0, res.output
    mv = client.get_model_version(tracking.model_name, tracking.versions["v3"])
    assert mv.tags["governance.approval_state"] == "rejected" and "audited" not in mv.aliases
    assert "governance.approved_run_id" not in mv.tags


def test_default_policy_approves_the_credit_evidence_and_is_recorded(published, tracking):
    from governance.policy import evaluate_policy, load_policy

    client = _client()
    rid = tracking.explain_run_ids["v2"]
    assert verify_run(rid).ok
    res = _approve(tracking, "v2", "--policy", "default", "--comment", "Reviewed <all> sections")
    assert res.exit_code == 0, res.output
    assert f"policy default (packaged policy 'default'), sha256 {_default_sha()}" in res.output
    assert "alias 'audited' -> credit-risk version 2" in res.output
    mv = client.get_model_version_by_alias(tracking.model_name, "audited")
    assert str(mv.version) == tracking.versions["v2"]
    tags = mv.tags
    assert tags["governance.approval_decision"] == "approve"
    assert tags["governance.approval_approver"] == "Dana Reviewer"
    assert tags["governance.approval_policy_sha256"] == _default_sha()
    assert tags["governance.status"] == "approved" and tags["governance.audited"] == "true"
    assert tags["governance.approved_run_id"] == rid
    date = datetime.strptime(tags["governance.approval_date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - date).total_seconds()) < 600
    # the entry beside the report: the policy, each gate's value, the manifest that was approved
    entries = json.loads(open(client.download_artifacts(rid, "governance/reports/approvals.json")).read())["entries"]
    entry = entries[-1]
    assert entry["approver"] == "Dana Reviewer" and entry["verified"] is True
    assert entry["policy"]["sha256"] == _default_sha()
    assert [g["metric"] for g in entry["policy_gates"]] == ["delta_auc", "mprt_spearman", "stability"]
    assert all(g["passed"] for g in entry["policy_gates"])
    # the numbers are the logged evidence's own
    quality = json.loads(open(client.download_artifacts(rid, "governance/explanations/quality.json")).read())
    stability = json.loads(open(client.download_artifacts(rid, "governance/explanations/stability.json")).read())
    again = evaluate_policy(load_policy("default"), quality, stability)
    assert [g["value"] for g in again["gates"]] == [g["value"] for g in entry["policy_gates"]]
    # the re-issued manifest is chained, anchored on the run and on the version, and verifies
    manifest_path = client.download_artifacts(rid, "governance/manifest.json")
    manifest = json.loads(open(manifest_path).read())
    assert manifest["previous_manifest_sha256"] == entry["manifest_sha256"]
    assert "governance/reports/approvals.json" in {f["path"] for f in manifest["files"]}
    new_sha = sha256_file(manifest_path)
    assert client.get_run(rid).data.tags["governance.manifest_sha256"] == new_sha
    assert tags["governance.approved_manifest_sha256"] == new_sha
    check = verify_run(rid)
    assert check.ok, check.summary()
    assert "model version credit-risk/2" in check.anchor


def test_reject_records_sign_off_and_removes_the_alias(published, tracking):
    client = _client()
    res = _approve(tracking, "v2", "--decision", "reject", "--comment", "second look")
    assert res.exit_code == 0, res.output
    mv = client.get_model_version(tracking.model_name, tracking.versions["v2"])
    assert "audited" not in mv.aliases
    assert mv.tags["governance.approval_decision"] == "reject"
    assert mv.tags["governance.audited"] == "false" and mv.tags["governance.approval_state"] == "rejected"
    assert int(mv.tags["governance.approval_count"]) >= 2
    assert verify_run(tracking.explain_run_ids["v2"]).ok
    # approve again so that later tests see the final state: audited on version 2
    assert _approve(tracking, "v2", "--policy", "default").exit_code == 0


def test_a_registered_policy_is_used_and_pinned(published, tracking, tmp_path):
    """Without --policy, the policy registered for the model (an artifact URI, pinned by hash)."""
    import mlflow

    client = _client()
    name = tracking.model_name
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(STRICT))
    with mlflow.start_run(experiment_id=client.get_run(tracking.explain_run_ids["v2"]).info.experiment_id,
                          run_name="model-risk-policies") as run:
        mlflow.log_artifact(str(policy))
    uri = f"runs:/{run.info.run_id}/policy.yaml"
    client.set_registered_model_tag(name, "governance.policy", uri)
    client.set_registered_model_tag(name, "governance.policy_sha256", sha256_file(policy))
    try:
        res = _approve(tracking, "v2")
        assert res.exit_code == 3 and "policy 'strict' gate failed" in res.output
        client.set_registered_model_tag(name, "governance.policy_sha256", "0" * 64)
        res = _approve(tracking, "v2")
        assert res.exit_code == 3 and "changed since it was registered" in res.output
        client.delete_registered_model_tag(name, "governance.policy_sha256")
        client.set_registered_model_tag(name, "governance.policy", "default")  # a packaged policy by name
        res = _approve(tracking, "v2")
        assert res.exit_code == 0, res.output
        assert "registered-model tag governance.policy of credit-risk -> packaged policy 'default'" in res.output
    finally:
        client.delete_registered_model_tag(name, "governance.policy")


def test_refused_when_the_evidence_was_tampered_with(published, tracking, tmp_path):
    client = _client()
    rid = tracking.explain_run_ids["v2"]
    original = client.download_artifacts(rid, "governance/explanations/stability.json", str(tmp_path / "orig"))
    tampered = tmp_path / "t" / "stability.json"
    tampered.parent.mkdir()
    tampered.write_text(json.dumps({"spearman": 1.0}))
    client.log_artifact(rid, str(tampered), "governance/explanations")
    try:
        res = _approve(tracking, "v2", "--policy", "default")
        assert res.exit_code == 3
        assert "verify failed: CHANGED: governance/explanations/stability.json" in res.output
    finally:
        client.log_artifact(rid, original, "governance/explanations")
    assert verify_run(rid).ok


def test_refused_when_quality_evidence_is_forged_with_a_rehashed_manifest(published, tracking, tmp_path):
    """A better quality.json, with the manifest re-hashed and logged over the run: the anchor
    (the run tag set when the report was made) refuses it."""
    from mlflow.utils.file_utils import local_file_uri_to_path
    from pathlib import Path

    from governance.archive import manifest_bytes

    client = _client()
    rid = tracking.explain_run_ids["v2"]
    root = Path(local_file_uri_to_path(client.get_run(rid).info.artifact_uri))
    saved = {rel: (root / rel).read_bytes() for rel in ("governance/explanations/quality.json",
                                                       "governance/manifest.json")}
    try:
        q = json.loads(saved["governance/explanations/quality.json"])
        q["methods"]["backtrace_signed"]["delta_auc"] = 0.99
        (root / "governance/explanations/quality.json").write_text(json.dumps(q))
        manifest = json.loads(saved["governance/manifest.json"])
        for entry in manifest["files"]:
            if entry["path"] == "governance/explanations/quality.json":
                entry["sha256"] = sha256_file(root / entry["path"])
                entry["size"] = (root / entry["path"]).stat().st_size
        (root / "governance/manifest.json").write_bytes(manifest_bytes(manifest))
        strict = tmp_path / "strict.yaml"
        strict.write_text(yaml.safe_dump(STRICT))
        res = _approve(tracking, "v2", "--policy", str(strict))
        assert res.exit_code == 3
        assert "verify failed: ANCHOR: governance/manifest.json" in res.output
    finally:
        for rel, data in saved.items():
            (root / rel).write_bytes(data)
    assert verify_run(rid).ok


def test_unknown_model_version_and_bad_arguments(tracking):
    res = CliRunner().invoke(main, ["approve", "--model-name", "nope", "--version", "1", "--approver", "a",
                                    "--role", "b", "--policy", "default"])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "not found" in res.output
    res = CliRunner().invoke(main, ["approve", "--model-name", "x", "--version", "1", "--approver", "a",
                                    "--role", "b", "--decision", "maybe"])
    assert res.exit_code != 0
    res = CliRunner().invoke(main, ["approve", "--model-name", tracking.model_name, "--version", "1",
                                    "--approver", "a", "--role", "b", "--policy", "no-such-policy"])
    assert res.exit_code == 3 and "no packaged policy of that name (packaged: default)" in res.output


def test_refused_without_a_report(tracking):
    from governance.approval import ApprovalRefused, approve

    # version 1 has explanation artifacts but no report (no manifest): approval must be refused
    with pytest.raises(ApprovalRefused) as info:
        approve(tracking.model_name, tracking.versions["v1"], "A", "B", policy="default")
    assert any("manifest.json" in r for r in info.value.reasons)


def test_policy_files_are_validated(tmp_path):
    from governance.errors import PolicyError
    from governance.policy import load_policy

    bad = tmp_path / "bad.yaml"
    bad.write_text("gates:\n  - {metric: delta_auc, method: primary, op: '=>', threshold: 0}\n")
    with pytest.raises(PolicyError, match="op '=>' is not one of"):
        load_policy(str(bad))
    bad.write_text("name: x\ngate: []\n")
    with pytest.raises(PolicyError, match="unknown key"):
        load_policy(str(bad))
    assert load_policy("default").sha256 == _default_sha()
