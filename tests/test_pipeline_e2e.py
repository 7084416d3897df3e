"""End to end: `mlflow run pipelines --env-manager local` (train -> validate -> explain -> report)
in a temp sqlite store; every artifact exists and loads, and the primary global importance puts
the generator's true drivers above its pure-noise features. How each mode ranks them is recorded
(printed and attached to the test report as user properties). The pipeline leaves nothing in the
temp directory and makes no run besides its steps'; a failing step's run is still its child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from examples.credit_risk.generator import DRIVERS, FEATURE_NAMES, NOISE, STRONG_DRIVERS
from mlflow_server import cli_env

ROOT = Path(__file__).resolve().parents[1]
EXPL = "governance/explanations/"
STEPS = os.environ.get("GOVERNANCE_E2E_STEPS", "train,validate,explain,report")


def driver_ranking(features: list[dict]) -> dict:
    """How a global-importance table ranks the true drivers against the noise features."""
    rank = {f["feature"]: f["rank"] for f in features}
    d = np.array([rank[f] for f in DRIVERS])
    n = np.array([rank[f] for f in NOISE])
    return {
        "strong_driver_ranks": {f: rank[f] for f in STRONG_DRIVERS},
        "best_noise_rank": int(n.min()),
        "top5_all_drivers": bool(all(f["feature"] in DRIVERS for f in features[:5])),
        # probability that a random true driver outranks a random noise feature
        "driver_over_noise_auc": float((d[:, None] < n[None, :]).mean()),
    }


def _mlflow_run(tmp_path: Path, uri: str, *params: str) -> subprocess.CompletedProcess:
    """`mlflow run pipelines` with a private temp dir (``tmp_path/tmp``) and storage dir."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT / "pipelines"), "--env-manager", "local",
           "--experiment-name", "e2e", "--storage-dir", str(tmp_path / "mlflow-run")]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, cwd=tmp_path, env=cli_env(uri, tmp_path / "tmp"), capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)


def _new_temp_entries(tmp_path: Path) -> list[str]:
    """What the run left in its temp dir (torch's shared compile cache aside)."""
    return sorted(p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_"))


@pytest.mark.slow
def test_mlflow_run_pipeline_end_to_end(tmp_path: Path, record_property) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    proc = _mlflow_run(tmp_path, uri, "n_train=6000", "n_valid=600", "epochs=6",
                       "registered_model_name=credit-e2e", f"steps={STEPS}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _new_temp_entries(tmp_path) == []

    mlflow.set_tracking_uri(uri)
    runs = {r.data.tags.get("mlflow.project.entryPoint"): r for r in client.search_runs(
        [client.get_experiment_by_name("e2e").experiment_id])}
    steps = {"main", "train", "explain"} | ({"validate"} & set(STEPS.split(",")))
    assert set(runs) == steps  # the report is logged into the explain run: no run of its own
    assert len(client.search_runs([client.get_experiment_by_name("e2e").experiment_id])) == len(steps)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    main, explain = runs["main"], runs["explain"]
    assert main.data.tags["governance.explain_run_id"] == explain.info.run_id
    assert explain.data.tags["mlflow.parentRunId"] == main.info.run_id
    rid = explain.info.run_id

    def load(path: str) -> Path:
        return Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=path, tracking_uri=uri))

    gi = json.loads(load(EXPL + "global_importance.json").read_text())
    layers = json.loads(load(EXPL + "layer_ranking.json").read_text())
    stability = json.loads(load(EXPL + "stability.json").read_text())
    local = pd.read_parquet(load(EXPL + "local_relevance.parquet"))
    codes = pd.read_parquet(load(EXPL + "reason_codes.parquet"))
    long = pd.read_parquet(load(EXPL + "global_importance.parquet"))
    config = yaml.safe_load(load("governance/config.yaml").read_text())
    validation = json.loads(load("governance/data_quality/validation_result.json").read_text())
    for png in ("global_importance", "feature_distribution", "layer_ranking", "importance_by_mode"):
        assert load(f"{EXPL}plots/{png}.png").read_bytes()[:4] == b"\x89PNG"
    if (Path(load(EXPL)) / "quality.json").exists():
        quality = json.loads(load(EXPL + "quality.json").read_text())
        assert "methods" in quality
        assert "passed" in json.loads(load(EXPL + "gates.json").read_text())

    assert validation["success"] and validation["contract_source"].startswith("training data")
    assert config["target_column"] == "default" and config["reason_codes"]["dictionary"]["fico_score"]
    assert gi["n_samples"] == 600 and len(local) == 600 and len(codes) == 600
    assert list(local.columns[5:]) == FEATURE_NAMES and set(long["mode"]) == set(gi["modes"])
    assert layers["layers"][0]["rank"] == 1 and -1 <= stability["stability"] <= 1
    texts = set(codes["supporting_1_text"].dropna())
    assert "Credit score" in texts or "Debt-to-income ratio" in texts  # the dictionary was applied
    tags = explain.data.tags
    reported = "report" in STEPS.split(",")
    assert tags["governance.status"] == ("reported" if reported else "explained")
    assert tags["governance.model_uri"] == "models:/credit-e2e/1"
    if reported:  # the report step ran on this explanation run: its outputs are there too
        for path in ("governance/reports/audit_report.html", "governance/manifest.json"):
            assert load(path).stat().st_size > 0
    assert explain.data.metrics["governance_n_samples"] == 600
    assert [d.dataset.name for d in explain.inputs.dataset_inputs] == ["validation"]
    assert client.get_model_version("credit-e2e", "1").tags["governance.explained_run_id"] == rid

    by_mode = {m: driver_ranking(v["features"]) for m, v in gi["modes"].items()}
    print("\ndriver ranking by mode:", json.dumps(by_mode, indent=1, sort_keys=True))
    for m, v in by_mode.items():
        record_property(f"driver_ranking_{m}", json.dumps(v, sort_keys=True))
    primary = by_mode[gi["primary_mode"]]
    assert primary["top5_all_drivers"], primary
    assert primary["driver_over_noise_auc"] >= 0.85, primary
    assert all(r < primary["best_noise_rank"] for f, r in primary["strong_driver_ranks"].items()
               if f != "annual_income"), primary
    assert max(primary["strong_driver_ranks"].values()) <= 12, primary


@pytest.mark.slow
def test_a_failed_step_is_still_a_child_of_the_pipeline_run(tmp_path: Path) -> None:
    """n_valid=1 makes the train step fail (a validation AUC needs both classes)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    proc = _mlflow_run(tmp_path, uri, "n_train=200", "n_valid=1", "epochs=1", "registered_model_name=")
    assert proc.returncode != 0
    assert "error: step train failed" in proc.stderr
    runs = {r.data.tags.get("mlflow.project.entryPoint"): r for r in client.search_runs([exp])}
    assert set(runs) == {"main", "train"}
    assert runs["train"].info.status == "FAILED" and runs["main"].info.status == "FAILED"
    assert runs["train"].data.tags["mlflow.parentRunId"] == runs["main"].info.run_id
