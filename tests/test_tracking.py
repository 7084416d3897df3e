"""Everything that talks to MLflow, against a real sqlite store: model URIs of every kind,
logged datasets, run resolution, staged artifact logging, model-version tags."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
import torch

from explain_fixtures import MODEL_NAME, artifact_paths
from governance import tracking
from governance.data import DataLoadError, load_data
from governance.tracking import ModelLoadError, load_model


def test_load_model_by_every_kind_of_uri(credit_store) -> None:
    uris = [credit_store.runs_uri, credit_store.logged_uri, f"models:/{MODEL_NAME}/1",
            f"models:/{MODEL_NAME}@champion"]
    x = torch.zeros(3, 78)
    outputs = []
    for uri in uris:
        h = load_model(uri)
        assert h.source_run_id == credit_store.train_run
        assert h.model_id and h.model_id.startswith("m-")
        outputs.append(h.model(x))
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    h = load_model(f"models:/{MODEL_NAME}@champion")
    assert (h.registered_name, h.registered_version) == (MODEL_NAME, "1")


@pytest.mark.parametrize("uri", ["models:/no-such-model/1", "runs:/0123456789abcdef0123456789abcdef/model",
                                 f"models:/{MODEL_NAME}@no-such-alias"])
def test_missing_model_uri_fails_clearly(credit_store, uri: str) -> None:
    with pytest.raises(ModelLoadError, match="model URI '" + uri.replace("/", ".").replace("@", ".")):
        load_model(uri)


def test_logged_dataset_and_training_frame(credit_store) -> None:
    loaded = load_data(f"mlflow-dataset:{credit_store.train_run}/validation")
    expected = pd.read_parquet(credit_store.validation_parquet)
    pd.testing.assert_frame_equal(loaded.frame, expected)
    with pytest.raises(DataLoadError, match="no dataset named 'nope'.*train.*validation"):
        load_data(f"mlflow-dataset:{credit_store.train_run}/nope")
    train, where = tracking.training_frame(load_model(credit_store.runs_uri))
    assert len(train) == 5000 and "train" in where


def test_resolve_run_precedence(credit_store, monkeypatch) -> None:
    explicit = mlflow.MlflowClient().create_run(credit_store.experiment_id).info.run_id
    assert tracking.resolve_run(explicit) == (explicit, False)
    monkeypatch.setenv("MLFLOW_RUN_ID", explicit)
    assert tracking.resolve_run(None) == (explicit, False)
    monkeypatch.delenv("MLFLOW_RUN_ID")
    rid, created = tracking.resolve_run(None, "governance-tracking-test")
    assert created
    run = mlflow.MlflowClient().get_run(rid)
    assert mlflow.MlflowClient().get_experiment(run.info.experiment_id).name == "governance-tracking-test"
    tracking.finish_run(rid, ok=True)
    assert mlflow.MlflowClient().get_run(rid).info.status == "FINISHED"


def test_staging_area_logs_only_on_commit_and_tags_use_the_prefix(credit_store) -> None:
    rid = mlflow.MlflowClient().create_run(credit_store.experiment_id).info.run_id
    with tracking.StagingArea() as st:
        st.path("explanations/a.json").write_text("{}")
        st.path("explanations/plots/b.png").write_bytes(b"png")
        assert artifact_paths(rid) == set()
        st.commit(rid)
    assert artifact_paths(rid) == {"governance/explanations/a.json", "governance/explanations/plots/b.png"}
    tracking.set_tags(rid, {"status": "explained", "governance.primary_mode": "signed"})
    tracking.log_metrics(rid, {"governance_x": 1.5, "governance_nan": float("nan")})
    data = mlflow.MlflowClient().get_run(rid).data
    assert data.tags["governance.status"] == "explained" and data.tags["governance.primary_mode"] == "signed"
    assert data.metrics == {"governance_x": 1.5}


def test_model_version_tags_found_from_a_runs_uri(credit_store) -> None:
    h = load_model(credit_store.runs_uri)
    assert h.registered_name is None
    assert tracking.tag_model_version(h, {"probe": "yes"})
    mv = mlflow.MlflowClient().get_model_version(MODEL_NAME, "1")
    assert mv.tags["governance.probe"] == "yes"
    assert not tracking.tag_model_version(tracking.ModelHandle(model=None, uri="<mem>"), {"probe": "no"})


def test_pickle_format_model_loads_and_explains(credit_store, tmp_path) -> None:
    import mlflow.pytorch

    from examples.credit_risk.model import CreditRiskMLP
    from governance.pipeline import explain_model

    torch.manual_seed(1)
    model = CreditRiskMLP().eval()
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        info = mlflow.pytorch.log_model(model, name="pickled", serialization_format="pickle",
                                        pip_requirements=["torch"])
    h = load_model(info.model_uri)
    assert isinstance(h.model, torch.nn.Module) and not isinstance(h.model, torch.fx.GraphModule)
    df = pd.read_parquet(credit_store.validation_parquet).head(40)
    res = explain_model(h, df, target_column="default", modes="signed", log=False, quiet=True,
                        config={"quality": {"enabled": False}})
    assert res.n_samples == 40 and len(res.global_importance["features"]) == 78


def test_fast_dataset_digest_and_schema_match_mlflow(credit_store) -> None:
    from mlflow.data.digest_utils import compute_pandas_digest
    from mlflow.types.utils import _infer_schema

    df = pd.read_parquet(credit_store.validation_parquet)
    assert tracking.pandas_digest(df) == compute_pandas_digest(df)
    assert tracking._sample_schema(df, rows=50) == _infer_schema(df)
