"""End to end: train the bundled credit-risk example, run the real explanation stage, then
`report`, `verify` and `approve` through the command line on a fresh sqlite store."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from click.testing import CliRunner

pytestmark = pytest.mark.slow


def test_explain_then_report_then_verify_then_approve(tmp_path):
    from report_fixtures import use_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with use_store(uri):
        _run(tmp_path, uri)


def _run(tmp_path, uri):
    import mlflow

    from examples.credit_risk.generator import REASON_TEXT, STRONG_DRIVERS, TARGET
    from examples.credit_risk.train import train_and_log
    from governance.cli import main

    exp = mlflow.MlflowClient().create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(run_name="train", experiment_id=exp):
        trained = train_and_log(n_train=3000, n_valid=400, epochs=3, seed=0, registered_model_name="credit-e2e",
                                data_dir=tmp_path / "data")
    cfg = tmp_path / "governance.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": "binary-classification", "target_column": TARGET, "batch_size": 200,
        "reason_codes": {"top_n": 4, "dictionary": dict(REASON_TEXT)},
        "quality": {"enabled": True, "n_samples": 256},
        "gates": [{"name": "primary beats random on delta AUC", "metric": "delta_auc", "method": "primary",
                   "op": ">", "threshold": "random"}],
        "report": {"intended_purpose": "Probability of default for consumer loans.",
                   "sample_decisions": {"n": 4, "select": "all"}},
        "model_card": {"developed_by": "Credit model team"},
    }))
    runner = CliRunner()
    res = runner.invoke(main, ["explain", "--model-uri", "models:/credit-e2e/1", "--data", trained["validation_path"],
                               "--target-column", TARGET, "--config", str(cfg), "--experiment-name", "e2e", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    run_id = res.stdout.strip().splitlines()[-1]

    out = tmp_path / "out"
    res = runner.invoke(main, ["report", "--run-id", run_id, "--output-dir", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(main, ["verify", "--run-id", run_id])
    assert res.exit_code == 0, res.output
    assert runner.invoke(main, ["verify", str(out)]).exit_code == 0

    gi = json.loads((out / "governance/explanations/global_importance.json").read_text())
    pdf = out / "governance/reports/audit_report.pdf"
    text = subprocess.run(["pdftotext", str(pdf), "-"], check=True, capture_output=True, text=True).stdout
    for f in gi["features"][:3]:
        assert f["feature"] in text
    assert set(STRONG_DRIVERS) & {f["feature"] for f in gi["features"][:5]}
    for title in ("1. Cover and control block", "5. Explainability", "6. Individual decisions", "9. Appendix"):
        assert title in text
    assert "governance_evidence.json" in subprocess.run(["pdfdetach", "-list", str(pdf)], check=True,
                                                        capture_output=True, text=True).stdout
    html = (out / "governance/reports/audit_report.html").read_text()
    summary = json.loads((out / "governance/explanations/model_summary.json").read_text())
    assert f"{summary['n_parameters']:,}" in html  # architecture from the stage's summary
    decisions = html[html.index('id="sec-decisions"'):html.index('id="sec-risks"')]
    assert "all decisions (400)" in decisions
    table = decisions[:decisions.index("Plain-language dictionary")]
    assert len(re.findall(r"<tr><td>\d+</td>", table)) == 4
    assert any(t in table for t in REASON_TEXT.values())  # plain-language reason texts per decision

    # the approver's packaged default policy on the bundled example's real evidence
    res = runner.invoke(main, ["approve", "--model-name", "credit-e2e", "--version", "1", "--approver", "E2E",
                               "--role", "Validator", "--policy", "default"])
    assert res.exit_code == 0, res.output
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("credit-e2e", "audited").version) == "1"
    assert runner.invoke(main, ["verify", "--run-id", run_id]).exit_code == 0
