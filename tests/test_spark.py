"""The stage on a real local Spark session (``local[2]``) with the credit-risk example logged to a real
MLflow sqlite store: the documents are identical (1e-12) across 1, 3 and 7 partitions and equal to
the single-machine result; the contract is checked by great-expectations on Spark with the local
path's verdicts and messages, and a failure stops before any executor explains; per-sample outputs
are folders of parquet files (or files under ``spark.output_uri`` recorded with their hashes);
and the command line explains on Spark, then `report` and `verify` pass on its artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("pyspark")

from mlflow_server import cli_env  # noqa: E402
from test_stage import assert_close  # noqa: E402

N_ROWS = 300
CONFIG = {"target_column": "default", "quality": {"enabled": False},
          "aggregation": {"n_bootstrap": 30, "sample_size": 120}, "cpu_threads": 1, "batch_size": 64}


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the module's tests, stopped at the end."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("governance-tests")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4")
               .config("spark.driver.memory", "1g").config("spark.python.worker.reuse", "true")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture()
def folder(credit_store, tmp_path: Path) -> Path:
    """N_ROWS validation rows as a folder of two parquet files (positions run across files)."""
    frame = pd.read_parquet(credit_store.validation_parquet).head(N_ROWS)
    out = tmp_path / "validation"
    out.mkdir()
    frame.iloc[:170].to_parquet(out / "part-a.parquet", index=False)
    frame.iloc[170:].to_parquet(out / "part-b.parquet", index=False)
    return out


def _docs(result: Any) -> dict[str, Any]:
    return json.loads(json.dumps({"global_importance": result.global_importance,
                                  "layer_ranking": result.layer_ranking, "stability": result.stability},
                                 default=float))


def test_documents_are_identical_across_partitions_and_equal_the_local_result(spark, credit_store, folder) -> None:
    from governance.pipeline import explain_model
    from governance.tracking import load_model

    handle = load_model(credit_store.logged_uri)
    local = explain_model(handle, str(folder), config=CONFIG, log=False, quiet=True)
    ref = _docs(local)
    gi = ref["global_importance"]
    assert gi["n_samples"] == N_ROWS and sum(gi["reason_code_leaders"]["supporting"].values()) > 0
    for parts in (1, 3, 7):
        result = explain_model(handle, str(folder), config={**CONFIG, "engine": "spark",
                                                              "spark": {"partitions": parts}},
                               log=False, quiet=True)
        assert result.n_samples == N_ROWS
        assert_close(_docs(result), ref, where=f"{parts} partitions")
        assert result.validation.success and result.validation.n_rows == N_ROWS
        assert [f.detail for f in result.validation.failures] == []


def test_a_spark_dataframe_with_an_id_column_gives_the_same_documents(spark, credit_store, folder) -> None:
    """A DataFrame handed over in Python (shuffled, ids in a column) equals the local run with that id column."""
    from governance.pipeline import explain_model
    from governance.tracking import load_model

    handle = load_model(credit_store.logged_uri)
    frame = pd.read_parquet(folder).reset_index(names="loan_id")
    cfg = {**CONFIG, "id_column": "loan_id"}
    local = explain_model(handle, frame, config=cfg, log=False, quiet=True)
    sdf = spark.createDataFrame(frame.sample(frac=1.0, random_state=3)).repartition(5)
    result = explain_model(handle, sdf, config=cfg, log=False, quiet=True)
    assert_close(_docs(result), _docs(local), where="dataframe")


def _broken(folder: Path, tmp_path: Path) -> Path:
    frame = pd.read_parquet(folder)
    cols = list(frame.columns)
    frame[cols[0]] = frame[cols[0]].astype("float64")
    frame.loc[[3, 40, 200], cols[0]] = float("nan")
    frame.loc[[7], cols[1]] = float("inf")
    out = tmp_path / "broken.parquet"
    frame.to_parquet(out, index=False)
    return out


def test_contract_failure_matches_the_local_path_and_stops_before_explaining(spark, credit_store, folder, tmp_path,
                                                                              monkeypatch) -> None:
    import mlflow

    from governance.pipeline import explain_model
    from governance.stage import spark as spark_stage
    from governance.tracking import load_model
    from governance.validation import ContractViolation

    handle = load_model(credit_store.logged_uri)
    bad = _broken(folder, tmp_path)
    with pytest.raises(ContractViolation) as local:
        explain_model(handle, str(bad), config=CONFIG, log=False, quiet=True)
    explained = []
    monkeypatch.setattr(spark_stage, "explain_partitions", lambda *a, **k: explained.append(a))
    with pytest.raises(ContractViolation) as on_spark:
        explain_model(handle, str(bad), config={**CONFIG, "engine": "spark"}, experiment_name="spark-contract",
                      quiet=True)
    assert explained == []  # no executor explained anything
    assert on_spark.value.exit_code == 2
    assert str(on_spark.value) == str(local.value)
    failures = on_spark.value.outcome.failures
    assert [str(f) for f in failures] == [str(f) for f in local.value.outcome.failures]
    assert {f.column for f in failures} >= {"fico_score", "debt_to_income"} or len(failures) >= 2
    # the run holds the contract's result and no explanation
    run = mlflow.search_runs(experiment_names=["spark-contract"], output_format="list")[0]
    assert run.data.tags["governance.status"] == "failed"
    listed = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "governance")}
    assert "governance/data_quality" in listed and "governance/explanations" not in listed


def test_a_non_numeric_column_fails_with_the_local_message(spark, credit_store, folder, tmp_path) -> None:
    from governance.pipeline import explain_model
    from governance.tracking import load_model
    from governance.validation import ContractViolation

    handle = load_model(credit_store.logged_uri)
    frame = pd.read_parquet(folder)
    col = frame.columns[2]
    frame[col] = frame[col].astype(str)
    frame.loc[5, col] = "n/a"
    bad = tmp_path / "text.parquet"
    frame.to_parquet(bad, index=False)
    outcomes = []
    for engine in ("local", "spark"):
        with pytest.raises(ContractViolation) as exc:
            explain_model(handle, str(bad), config={**CONFIG, "engine": engine}, log=False, quiet=True)
        outcomes.append(exc.value.outcome)
    local, spark_ = ([(f.expectation, f.column) for f in o.failures] for o in outcomes)
    assert local == spark_  # the same expectations fail, on the same column
    typed = [[str(f) for f in o.failures if "type" in f.expectation] for o in outcomes]
    assert typed[0] == typed[1] and "not numeric" in typed[1][0] and "n/a" in typed[1][0]
    # a range check on a text column cannot be evaluated by either engine (GX words it per engine)
    assert all("could not be evaluated" in f.detail for o in outcomes for f in o.failures if "between" in f.expectation)


def test_outputs_under_an_output_uri_are_recorded_with_their_hashes(spark, credit_store, folder, tmp_path) -> None:
    import mlflow

    from governance.data import sha256_file
    from governance.pipeline import explain_model
    from governance.stage.spark import SAMPLE_OUTPUTS
    from governance.tracking import load_model

    out = tmp_path / "outputs"
    cfg = {**CONFIG, "engine": "spark", "spark": {"partitions": 3, "output_uri": out.as_uri()}}
    result = explain_model(load_model(credit_store.logged_uri), str(folder), config=cfg,
                           experiment_name="spark-output-uri", quiet=True)
    local = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                     artifact_path=f"governance/explanations/{SAMPLE_OUTPUTS}",
                                                     dst_path=str(tmp_path / "dl")))
    record = json.loads(local.read_text())
    names = {o["name"] for o in record["outputs"]}
    assert names == {"local_relevance.parquet", "reason_codes.parquet"}
    for o in record["outputs"]:
        folder_out = out / o["name"]
        for f in o["files"]:
            assert sha256_file(folder_out / f["path"]) == f["sha256"]
            assert (folder_out / f["path"]).stat().st_size == f["size"]
    assert len(pd.read_parquet(out / "reason_codes.parquet")) == N_ROWS
    listed = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "governance/explanations")}
    assert "governance/explanations/local_relevance.parquet" not in listed  # left where Spark wrote it
    with pytest.raises(Exception, match="already exists"):
        explain_model(load_model(credit_store.logged_uri), str(folder), config=cfg, log=False, quiet=True)


@pytest.mark.slow
def test_cli_explains_on_spark_then_report_and_verify_pass(credit_store, folder, tmp_path) -> None:
    env = cli_env(credit_store.tracking_uri, tmp_path)
    env["MLFLOW_EXPERIMENT_ID"] = credit_store.experiment_id
    env["PYSPARK_PYTHON"] = sys.executable
    cmd = ["mlflow-governance", "explain", "--model-uri", "models:/credit-risk-test/1", "--data", str(folder),
           "--target-column", "default", "--engine", "spark", "--set", "spark.master=local[2]",
           "--set", "spark.conf={spark.ui.enabled: false}", "--set", "quality.enabled=false",
           "--set", "aggregation.n_bootstrap=30", "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.strip().splitlines()[-1]
    import mlflow

    client = mlflow.MlflowClient(credit_store.tracking_uri)
    tags = client.get_run(run_id).data.tags
    assert tags["governance.status"] == "explained" and tags["governance.engine"] == "spark"
    parts = [a.path for a in client.list_artifacts(run_id, "governance/explanations/local_relevance.parquet")]
    assert parts and all(p.endswith(".parquet") for p in parts)
    for step in (["report", "--run-id", run_id, "--output-dir", str(tmp_path / "report")],
                 ["verify", "--run-id", run_id]):
        done = subprocess.run(["mlflow-governance", *step], env=env, capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
        assert done.returncode == 0, (step[0], done.stdout[-2000:], done.stderr[-3000:])
    manifest = client.download_artifacts(run_id, "governance/manifest.json", str(tmp_path / "m"))
    text = Path(manifest).read_text()
    for p in parts:
        assert p.split("governance/", 1)[1] in text  # every part file is in the manifest
