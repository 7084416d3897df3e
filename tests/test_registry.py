"""Registry state that tells the truth (issue 9), on a real sqlite store: the version's tags and
the alias `audited` follow explain -> report -> approve, and a new explanation or report of an
approved version supersedes the approval."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from governance import registry
from governance.cli import main


def _tags(client, name, version):
    return {k[len("governance."):]: v for k, v in client.get_model_version(name, version).tags.items()
            if k.startswith("governance.")}


def _alias_version(client, name):
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, registry.ALIAS).version)
    except MlflowException:
        return None


def _explain(store, client, uri, seed, tmp_path):
    """A new explanation run of ``uri`` (what the stage logs), then the stage's registry call."""
    import mlflow

    from report_fixtures import log_explanation_run, make_data, train_model

    model, _ = train_model(6)
    x, _ = make_data(160, seed=99)
    exp = client.get_run(store.explain_run_ids["v2"]).info.experiment_id
    return log_explanation_run(mlflow, client, model, uri, x, passed=True, seed=seed, experiment_id=exp,
                               current=True, data_dir=tmp_path / f"data-{seed}")


def _approve(name, version):
    return CliRunner().invoke(main, ["approve", "--model-name", name, "--version", version, "--approver", "Dana",
                                     "--role", "Validator", "--policy", "default"])


@pytest.mark.slow
def test_reexplaining_an_approved_version_supersedes_the_approval(published, tracking, tmp_path):
    import mlflow

    from governance.report import publish_report

    client = mlflow.MlflowClient()
    name = tracking.model_name
    source = client.get_model_version(name, tracking.versions["v2"]).source  # models:/m-<id>
    mv = client.create_model_version(name, source, run_id=tracking.train_run_ids["v2"],
                                     model_id=source.split("/")[-1])
    version, uri = str(mv.version), f"models:/{name}/{mv.version}"

    run_a = _explain(tracking, client, uri, 11, tmp_path)
    registry.record_explained(name, version, run_a)
    assert _tags(client, name, version)["status"] == "explained"
    res = _approve(name, version)
    assert res.exit_code == 3 and "run `mlflow-governance report` first" in res.output  # explained, not reported

    report_a = publish_report(run_a)
    t = _tags(client, name, version)
    assert (t["status"], t["explained_run_id"], t["report_run_id"]) == ("reported", run_a, run_a)
    assert t["report_id"] == report_a.report_id and t["manifest_sha256"] == report_a.manifest_sha256

    assert _approve(name, version).exit_code == 0
    t = _tags(client, name, version)
    assert (t["status"], t["approval_state"], t["audited"], t["approved_run_id"]) == \
           ("approved", "approved", "true", run_a)
    assert _alias_version(client, name) == version
    card = CliRunner().invoke(main, ["card", "--model-uri", f"models:/{name}@audited", "--output-dir",
                                     str(tmp_path / "card-a")])
    assert card.exit_code == 0 and f"governance run {run_a}" in card.output

    # a new explanation of the approved version: the approval no longer covers the latest evidence
    run_b = _explain(tracking, client, uri, 12, tmp_path)
    state = registry.record_explained(name, version, run_b)
    t = _tags(client, name, version)
    assert t["approval_state"] == "superseded" and t["audited"] == "false"
    assert t["superseded_by_run_id"] == run_b and f"re-explained in run {run_b}" in t["superseded_reason"]
    assert (t["status"], t["explained_run_id"], t["run_id"]) == ("explained", run_b, run_b)
    assert "report_run_id" not in t and "report_id" not in t  # the report is of older evidence
    assert t["approved_run_id"] == run_a  # what was approved stays on record
    assert _alias_version(client, name) is None  # removed, not left pointing at stale evidence
    assert any("superseded" in n for n in state.notes)
    card = CliRunner().invoke(main, ["card", "--model-uri", f"models:/{name}@audited", "--output-dir",
                                     str(tmp_path / "card-b")])
    assert card.exit_code == 1 and card.output.startswith("error: ")
    res = _approve(name, version)
    assert res.exit_code == 3 and f"run {run_b} has no governance/manifest.json; run `mlflow-governance report` first" \
        in res.output
    assert CliRunner().invoke(main, ["verify", "--run-id", run_a]).exit_code == 0  # run a's evidence is intact

    # a report of the older run changes nothing on the version
    late = publish_report(run_a)
    assert any(f"run {run_a} is not the latest explanation" in n for n in late.notes)
    assert _tags(client, name, version)["explained_run_id"] == run_b

    publish_report(run_b)
    assert _tags(client, name, version)["status"] == "reported"
    assert _approve(name, version).exit_code == 0
    t = _tags(client, name, version)
    assert (t["approval_state"], t["approved_run_id"], t["audited"]) == ("approved", run_b, "true")
    assert "superseded_by_run_id" not in t
    assert _alias_version(client, name) == version

    # re-rendering the approved report supersedes the approval too (new manifest, new bytes to sign)
    publish_report(run_b)
    t = _tags(client, name, version)
    assert t["approval_state"] == "superseded" and "report re-rendered" in t["superseded_reason"]
    assert t["status"] == "reported" and _alias_version(client, name) is None
