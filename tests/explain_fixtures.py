"""Fixtures of the explanation-stage tests: a real MLflow sqlite store in a temp folder holding
the credit-risk example (a trained MLP logged in pt2 format, registered, with its training and
validation tables logged as dataset inputs)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL_NAME = "credit-risk-test"


@dataclass
class CreditStore:
    """Where everything lives and the URIs that point at it."""

    root: Path
    tracking_uri: str
    experiment_id: str
    train_run: str
    runs_uri: str
    logged_uri: str
    validation_parquet: Path
    validation_csv: Path


@pytest.fixture(scope="session")
def credit_store_session(tmp_path_factory: pytest.TempPathFactory) -> CreditStore:
    """Build the store once per session (~10-20 s: training and one pt2 export)."""
    import mlflow

    from examples.credit_risk.train import train_and_log

    root = tmp_path_factory.mktemp("credit_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("credit-risk", artifact_location=(root / "artifacts").as_uri())
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name="train") as run:
            out = train_and_log(n_train=5000, n_valid=800, epochs=6, seed=0,
                                registered_model_name=MODEL_NAME, data_dir=root / "data")
        client.set_registered_model_alias(MODEL_NAME, "champion", "1")
    finally:
        mlflow.set_tracking_uri(previous_uri)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    import pandas as pd

    valid = Path(out["validation_path"])
    csv = root / "data" / "validation.csv"
    pd.read_parquet(valid).to_csv(csv, index=False)
    return CreditStore(root=root, tracking_uri=uri, experiment_id=exp_id, train_run=run.info.run_id,
                       runs_uri=out["runs_uri"], logged_uri=out["model_uri"],
                       validation_parquet=valid, validation_csv=csv)


@pytest.fixture()
def credit_store(credit_store_session: CreditStore, monkeypatch: pytest.MonkeyPatch) -> CreditStore:
    """The session store, made the current tracking URI and experiment for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", credit_store_session.tracking_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", credit_store_session.experiment_id)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(credit_store_session.tracking_uri)
    yield credit_store_session
    mlflow.set_tracking_uri(previous)


def artifact_paths(run_id: str) -> set[str]:
    """Every artifact file of the run."""
    from governance.tracking import artifact_files

    return set(artifact_files(run_id, ""))
