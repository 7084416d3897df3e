"""The explanation stage in-process against a real MLflow store: artifacts and their schema,
the data gate (CLI exit codes, messages, nothing half-logged), reason codes, the Python API and
the MLflow evaluator plugin."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from examples.credit_risk.generator import FEATURE_NAMES
from explain_fixtures import MODEL_NAME, artifact_paths
from governance.cli import main as cli
from governance.pipeline import explain_model

EXPL = "governance/explanations/"
TABLE_KEYS = {"feature", "importance", "signed", "std", "ci_low", "ci_high", "rank", "direction",
              "value_relevance_correlation"}
FAST = {"quality": {"enabled": False}, "aggregation": {"n_bootstrap": 50}}


def _download(run_id: str, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def _small(store, n: int, tmp_path: Path, name: str = "valid.parquet") -> Path:
    df = pd.read_parquet(store.validation_parquet).head(n)
    p = tmp_path / name
    df.to_parquet(p, index=False) if name.endswith(".parquet") else df.to_csv(p, index=False)
    return p


def test_stage_logs_every_artifact_with_its_schema(credit_store, tmp_path: Path) -> None:
    data = _small(credit_store, 300, tmp_path)
    res = explain_model(f"models:/{MODEL_NAME}/1", data, target_column="default", batch_size=128,
                        experiment_name="stage-test", quiet=True, config=FAST)
    rid = res.run_id
    files = artifact_paths(rid)
    for name in ("global_importance.json", "global_importance.parquet", "layer_ranking.json",
                 "local_relevance.parquet", "reason_codes.parquet", "stability.json", "model_summary.json",
                 "plots/global_importance.png", "plots/feature_distribution.png", "plots/layer_ranking.png",
                 "plots/importance_by_mode.png"):
        assert EXPL + name in files, name
    assert {"governance/config.yaml", "governance/data_quality/validation_result.json"} <= files
    summary = json.loads(_download(rid, EXPL + "model_summary.json").read_text())
    # the paper MLP 78 -> 39 -> 19 -> 1: weights and biases of three Linear layers
    assert summary["n_parameters"] == 78 * 39 + 39 + 39 * 19 + 19 + 19 + 1
    assert sum(layer["parameters"] for layer in summary["layers"]) == summary["n_parameters"]

    gi = json.loads(_download(rid, EXPL + "global_importance.json").read_text())
    assert gi["method"] == "dlbacktrace" and gi["primary_mode"] == "signed" and gi["n_samples"] == 300
    assert set(gi["modes"]) == {"default", "contrastive", "signed"}
    assert [f["rank"] for f in gi["features"]] == list(range(1, 79))
    assert set(gi["features"][0]) == TABLE_KEYS
    assert gi["features"] == gi["modes"]["signed"]["features"]
    for f in gi["features"]:
        assert f["ci_low"] <= f["importance"] <= f["ci_high"] and abs(f["signed"]) <= f["importance"] + 1e-12
    # mean |share| over features sums to one: each sample's shares were L1-normalised
    assert sum(f["importance"] for f in gi["features"]) == pytest.approx(1.0, abs=1e-6)
    assert set(gi["by_class"]) <= {"0", "1"} and sum(v["n_samples"] for v in gi["by_class"].values()) == 300
    assert gi["modality"] == "tabular" and gi["direction_sample"] == 300  # every row fits the sample
    for entries in [gi["features"]] + [v["features"] for v in gi["by_class"].values()]:
        for f in entries:
            rho = f["value_relevance_correlation"]
            assert f["direction"] == ("mixed" if rho is None or abs(rho) < 0.1 else "raises" if rho > 0 else "lowers")
    # the example's strongest risk drivers: a lower credit score and a higher debt burden raise the risk
    by_name = {f["feature"]: f for f in gi["features"]}
    assert by_name["fico_score"]["direction"] == "lowers" and by_name["debt_to_income"]["direction"] == "raises"
    datasets = json.loads(_download(rid, "governance/data_quality/datasets.json").read_text())["datasets"]
    assert [(d["role"], d["n_rows"], d["name"]) for d in datasets] == [("validation", 300, "valid")]
    assert datasets[0]["files"] == [{"path": "valid.parquet", "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                     "size": data.stat().st_size}]
    assert datasets[0]["mlflow_digest"] == mlflow.MlflowClient().get_run(rid).data.tags["governance.dataset_digest"]
    long = pd.read_parquet(_download(rid, EXPL + "global_importance.parquet"))
    assert list(long.columns) == ["mode", "class", "feature", "importance", "signed", "std", "ci_low", "ci_high",
                                  "rank", "direction", "value_relevance_correlation"]
    assert set(long["mode"]) == {"default", "contrastive", "signed"}
    assert len(long[long["class"] == "all"]) == 3 * 78

    local_path = _download(rid, EXPL + "local_relevance.parquet")
    assert pq.ParquetFile(local_path).num_row_groups == 3  # streamed: 128 + 128 + 44 rows
    local = pd.read_parquet(local_path)
    assert len(local) == 300 and list(local["sample_id"]) == list(range(300))
    assert list(local.columns[:5]) == ["sample_id", "prediction", "score", "target", "relevance_l1"]
    assert list(local.columns[5:]) == FEATURE_NAMES
    assert np.allclose(local[FEATURE_NAMES].abs().sum(1), local["relevance_l1"], rtol=1e-4)

    codes = pd.read_parquet(_download(rid, EXPL + "reason_codes.parquet"))
    assert len(codes) == 300
    for c in ("sample_id", "prediction", "supporting", "adverse", "supporting_1", "supporting_1_share",
              "supporting_1_text", "adverse_4", "adverse_4_text"):
        assert c in codes.columns
    assert codes.loc[0, "supporting_1"] == list(codes.loc[0, "supporting"])[0]
    assert set(codes["supporting_1_text"].dropna()) <= set(FEATURE_NAMES)  # no dictionary given

    layers = json.loads(_download(rid, EXPL + "layer_ranking.json").read_text())
    assert [d["rank"] for d in layers["layers"]] == list(range(1, len(layers["layers"]) + 1))
    assert {d["module"] for d in layers["layers"]} >= {"fc1", "fc2", "out"}
    fc1 = next(d for d in layers["layers"] if d["module"] == "fc1")
    assert fc1["n_units"] == 39 and len(fc1["top_units"]) == 5
    stab = json.loads(_download(rid, EXPL + "stability.json").read_text())
    assert -1 <= stab["stability"] <= 1 and set(stab["modes"]) == {"default", "contrastive", "signed"}
    assert _download(rid, EXPL + "plots/global_importance.png").read_bytes()[:4] == b"\x89PNG"
    cfg = yaml.safe_load(_download(rid, "governance/config.yaml").read_text())
    assert cfg["primary_mode"] == "signed" and cfg["batch_size"] == 128

    run = mlflow.MlflowClient().get_run(rid)
    assert run.data.tags["governance.status"] == "explained"
    assert run.data.tags["governance.model_uri"] == f"models:/{MODEL_NAME}/1"
    assert run.data.tags["governance.primary_mode"] == "signed"
    assert run.data.tags["governance.dataset_digest"]
    assert run.data.metrics["governance_n_samples"] == 300
    assert run.data.metrics["governance_top_feature_share"] == pytest.approx(gi["features"][0]["importance"])
    assert run.data.metrics["governance_stability"] == pytest.approx(stab["stability"])
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["valid"]
    assert run.info.status == "FINISHED"
    mv = mlflow.MlflowClient().get_model_version(MODEL_NAME, "1")
    assert mv.tags["governance.explained_run_id"] in {rid} | {mv.tags["governance.explained_run_id"]}
    assert mv.tags["governance.status"] == "explained"


def test_stage_is_deterministic(credit_store, tmp_path: Path) -> None:
    data = _small(credit_store, 200, tmp_path)
    a = explain_model(credit_store.runs_uri, data, target_column="default", log=False, quiet=True, config=FAST)
    b = explain_model(credit_store.runs_uri, data, target_column="default", log=False, quiet=True, config=FAST)
    assert a.global_importance == b.global_importance
    assert a.layer_ranking == b.layer_ranking and a.stability == b.stability


def _break(df: pd.DataFrame, how: str, path: Path) -> Path:
    if how == "missing column":
        df.drop(columns=["fico_score"]).to_parquet(path, index=False)
    elif how == "NaN":
        df.loc[5, "debt_to_income"] = np.nan
        df.to_parquet(path, index=False)
    elif how == "string":
        path = path.with_suffix(".csv")
        df.to_csv(path, index=False)
        lines = path.read_text().splitlines()
        cols = lines[0].split(",")
        j = cols.index("annual_income")
        row = lines[3].split(",")
        row[j] = "unknown"
        lines[3] = ",".join(row)
        path.write_text("\n".join(lines) + "\n")
    elif how == "empty file":
        path = path.with_suffix(".csv")
        path.write_text("")
    return path


@pytest.mark.parametrize("how, expectation, column", [
    ("missing column", "expect_table_columns_to_match_set", "fico_score"),
    ("NaN", "expect_column_values_to_not_be_null", "debt_to_income"),
    ("string", "expect_column_values_to_be_in_type_list", "annual_income"),
    ("empty file", "expect_table_row_count_to_be_between", None),
])
def test_broken_data_fails_the_gate_and_logs_no_explanation(credit_store, tmp_path: Path, how: str,
                                                            expectation: str, column: str | None) -> None:
    df = pd.read_parquet(credit_store.validation_parquet).head(100)
    path = _break(df, how, tmp_path / "broken.parquet")
    rid = mlflow.MlflowClient().create_run(credit_store.experiment_id).info.run_id
    result = CliRunner().invoke(cli, ["explain", "--model-uri", credit_store.runs_uri, "--data", str(path),
                                      "--target-column", "default", "--run-id", rid, "--quiet"])
    assert result.exit_code == 2, result.output
    assert "data contract failed" in result.output and expectation in result.output
    if column:
        assert column in result.output
    assert artifact_paths(rid) == {"governance/config.yaml", "governance/data_quality/validation_result.json",
                                   "governance/data_quality/datasets.json"}
    doc = json.loads(_download(rid, "governance/data_quality/validation_result.json").read_text())
    assert doc["success"] is False
    assert any(f["expectation"] == expectation for f in doc["failures"])
    assert doc["contract_source"].startswith("training data")
    assert mlflow.MlflowClient().get_run(rid).data.tags["governance.status"] == "failed"


def test_missing_model_uri_fails_clearly(credit_store, tmp_path: Path) -> None:
    data = _small(credit_store, 20, tmp_path)
    result = CliRunner().invoke(cli, ["explain", "--model-uri", "models:/does-not-exist/3", "--data", str(data),
                                      "--quiet"])
    assert result.exit_code == 1
    assert "model URI 'models:/does-not-exist/3' could not be resolved" in result.output
    result = CliRunner().invoke(cli, ["explain", "--model-uri", credit_store.runs_uri, "--data",
                                      str(tmp_path / "nope.parquet"), "--quiet"])
    assert result.exit_code == 1 and "data file not found" in result.output
    result = CliRunner().invoke(cli, ["explain", "--model-uri", credit_store.runs_uri, "--data", str(data),
                                      "--target-column", "default", "--run-id", "0" * 32, "--quiet"])
    assert result.exit_code == 1 and "MLflow:" in result.output and "0" * 32 in result.output


def test_a_local_path_that_is_not_an_mlflow_model_fails_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """A missing path, a bare weights file and a folder without MLmodel each get one line naming
    what the path is and what to give instead; nothing is written to a store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}).to_csv("data.csv", index=False)
    Path("weights.pt").write_bytes(b"not a model")
    Path("folder").mkdir()
    cases = {"missing.pt": "there is no file or folder 'missing.pt'",
             "weights.pt": "is a file, not an MLflow model",
             "folder": "is a folder without an MLmodel file",
             (tmp_path / "gone").as_uri(): f"there is no file or folder '{tmp_path / 'gone'}'"}
    for uri, says in cases.items():
        result = CliRunner().invoke(cli, ["explain", "--model-uri", uri, "--data", "data.csv", "--quiet"])
        assert result.exit_code == 1, (uri, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and says in lines[0] and "runs:/<run id>/<path>" in lines[0], (uri, result.output)
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "folder", "weights.pt"]


def test_cli_prints_the_run_id_last_and_honours_mlflow_run_id(credit_store, tmp_path: Path, monkeypatch) -> None:
    data = _small(credit_store, 64, tmp_path, "valid.csv")
    cfg = tmp_path / "governance.yaml"
    cfg.write_text(yaml.safe_dump({**FAST, "reason_codes": {"top_n": 2, "dictionary": {"fico_score": "Credit score"}}}))
    rid = mlflow.MlflowClient().create_run(credit_store.experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", rid)
    result = CliRunner().invoke(cli, ["explain", "--model-uri", f"models:/{MODEL_NAME}@champion", "--data", str(data),
                                      "--target-column", "default", "--config", str(cfg), "--modes", "signed,default",
                                      "--batch-size", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == rid
    gi = json.loads(_download(rid, EXPL + "global_importance.json").read_text())
    assert set(gi["modes"]) == {"signed", "default"}
    codes = pd.read_parquet(_download(rid, EXPL + "reason_codes.parquet"))
    assert "supporting_3" not in codes.columns


@pytest.mark.parametrize("primary", ["signed", "contrastive", "default"])
def test_reason_codes_lead_with_the_dominant_feature(credit_store, tmp_path: Path, primary: str) -> None:
    """Average applicants (all z-scores 0) with one feature pushed far out: that feature leads
    the codes in every primary mode (contrastive: from R+ / R-)."""
    base = pd.DataFrame(np.zeros((4, len(FEATURE_NAMES)), dtype=np.float32), columns=FEATURE_NAMES)
    base.loc[0, "fico_score"] = -4.0          # very low score: high risk
    base.loc[1, "debt_to_income"] = 4.0       # very high debt burden
    base.loc[2, "fico_score"] = 3.0           # very high score: low risk
    base.loc[3, "revolving_utilization"] = 3.5
    base["default"] = 0
    path = tmp_path / "dominant.parquet"
    base.to_parquet(path, index=False)
    res = explain_model(credit_store.runs_uri, path, target_column="default", quiet=True, primary_mode=primary,
                        config={**FAST, "reason_codes": {"dictionary": {"fico_score": "Credit score"}}})
    assert res.global_importance["primary_mode"] == primary
    codes = pd.read_parquet(_download(res.run_id, EXPL + "reason_codes.parquet"))
    assert codes.loc[0, "prediction"] == 1 and codes.loc[2, "prediction"] == 0
    expected = ["fico_score", "debt_to_income", "fico_score", "revolving_utilization"]
    if primary == "default":
        # the magnitude rule gives one-signed maps (all toward p), so it cannot say what supports a
        # "no default" decision: its codes put the driver on the adverse side there (spec 3b)
        predicted_1 = codes["prediction"] == 1
        assert list(codes.loc[predicted_1, "supporting_1"]) == [e for e, p in zip(expected, predicted_1) if p]
        assert list(codes.loc[~predicted_1, "adverse_1"]) == [e for e, p in zip(expected, predicted_1) if not p]
    else:
        assert list(codes["supporting_1"]) == expected
    assert codes.loc[0, "supporting_1_text"] == "Credit score"
    assert codes.loc[0, "supporting_1_share"] > 0.5


def test_python_api_on_an_in_memory_module(tmp_path: Path) -> None:
    import torch

    from examples.credit_risk.model import CreditRiskMLP

    torch.manual_seed(0)
    model = CreditRiskMLP(n_features=5, hidden=(6, 3)).eval()
    df = pd.DataFrame(np.random.default_rng(0).normal(size=(50, 5)), columns=list("abcde"))
    before = torch.get_num_threads()
    res = explain_model(model, df, log=False, quiet=True, modes="signed", config={**FAST, "cpu_threads": 1})
    assert torch.get_num_threads() == before  # the stage restores torch's thread setting
    assert res.run_id is None and res.n_samples == 50
    assert {f["feature"] for f in res.global_importance["features"]} == set("abcde")
    assert res.validation.contract_source == "validation data schema"


def test_a_failure_in_the_last_rows_only_logs_the_contract(credit_store, tmp_path: Path) -> None:
    """Checked in many blocks while the explanation streams: a NaN in the very last row still
    fails the stage with exit 2 and leaves only the contract's evidence."""
    df = pd.read_parquet(credit_store.validation_parquet).head(600)
    df.loc[599, "fico_score"] = np.nan
    path = tmp_path / "late.parquet"
    df.to_parquet(path, index=False)
    cfg = tmp_path / "governance.yaml"
    cfg.write_text(yaml.safe_dump({**FAST, "contract_block_cells": 5000}))
    rid = mlflow.MlflowClient().create_run(credit_store.experiment_id).info.run_id
    result = CliRunner().invoke(cli, ["explain", "--model-uri", credit_store.runs_uri, "--data", str(path),
                                      "--target-column", "default", "--run-id", rid, "--batch-size", "64",
                                      "--config", str(cfg), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "expect_column_values_to_not_be_null on column 'fico_score': 1 unexpected value(s)" in result.output
    assert artifact_paths(rid) == {"governance/config.yaml", "governance/data_quality/validation_result.json",
                                   "governance/data_quality/datasets.json"}
    doc = json.loads(_download(rid, "governance/data_quality/validation_result.json").read_text())
    assert doc["n_rows"] == 600 and doc["great_expectations"]["meta"]["blocks"]["n_blocks"] == 10  # 8 columns each
    assert doc["independent"] is True and doc["notes"] == []
    run = mlflow.MlflowClient().get_run(rid)
    assert run.data.tags["governance.status"] == "failed"
    assert run.data.tags["governance.contract_independent"] == "true"
