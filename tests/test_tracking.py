"""Everything that talks to MLflow, against a real sqlite store: model URIs of every kind,
logged datasets, run resolution, staged artifact logging, model-version tags."""

from __future__ import annotations

import mlflow
import numpy as np
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


def test_pickle_format_model_loads_and_explains_only_with_opt_in(credit_store, tmp_path) -> None:
    import mlflow.pytorch

    from examples.credit_risk.model import CreditRiskMLP
    from governance.pipeline import explain_model

    torch.manual_seed(1)
    model = CreditRiskMLP().eval()
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        info = mlflow.pytorch.log_model(model, name="pickled", serialization_format="pickle",
                                        pip_requirements=["torch"])
    with pytest.raises(tracking.PickleRefused, match="stored as a pickle.*serialization_format='pt2'.*--allow-pickle"):
        load_model(info.model_uri)
    h = load_model(info.model_uri, allow_pickle=True)
    assert (h.serialization, h.allow_pickle) == ("pickle", True)
    assert isinstance(h.model, torch.nn.Module) and not isinstance(h.model, torch.fx.GraphModule)
    df = pd.read_parquet(credit_store.validation_parquet).head(40)
    res = explain_model(h, df, target_column="default", modes="signed", log=False, quiet=True,
                        config={"quality": {"enabled": False}})
    assert res.n_samples == 40 and len(res.global_importance["features"]) == 78


def test_a_pickle_runs_no_code_without_opt_in(credit_store, tmp_path, monkeypatch) -> None:
    """Unpickling MarkerMLP writes a file: refused, the file never appears; opted in, it does."""
    import mlflow.pytorch

    from pickle_models import MARKER_ENV, MarkerMLP

    marker = tmp_path / "marker.txt"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        info = mlflow.pytorch.log_model(MarkerMLP(), name="marker", serialization_format="pickle",
                                        registered_model_name="marker-model", pip_requirements=["torch"])
    for uri in (info.model_uri, "models:/marker-model/1"):
        with pytest.raises(tracking.PickleRefused, match=f"model '{uri}' is stored as a pickle"):
            load_model(uri)
        assert not marker.exists()
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" not in __import__("os").environ
    h = load_model("models:/marker-model/1", allow_pickle=True)
    assert marker.read_text() == "code ran while unpickling\n"  # the test can see the code run
    assert h.serialization == "pickle" and h.allow_pickle


def test_pt2_handle_carries_serialization_and_signature(credit_store) -> None:
    h = load_model(credit_store.runs_uri)
    assert (h.serialization, h.allow_pickle) == ("pt2", False)
    assert h.feature_names is None  # a pt2 signature has tensors, not named columns
    assert h.output_shape == (-1, 1)
    assert h.inputs == [tracking.ModelInputSpec(name="x", dtype="float32", shape=(-1, 78))]


def test_named_signature_columns_become_feature_names(credit_store) -> None:
    import mlflow.pytorch

    from examples.credit_risk.model import CreditRiskMLP

    df = pd.read_parquet(credit_store.validation_parquet).drop(columns="default")
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        info = mlflow.pytorch.log_model(CreditRiskMLP().eval(), name="named", serialization_format="pickle",
                                        input_example=df.head(3), pip_requirements=["torch"])
    h = load_model(info.model_uri, allow_pickle=True)
    assert h.feature_names == list(df.columns) and h.feature_names_source == "model signature"


def test_task_hint_from_tags_and_metadata(credit_store) -> None:
    import mlflow.pytorch

    c = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        mlflow.set_tag("governance.task", "regression")
        info = mlflow.pytorch.log_model(torch.nn.Linear(4, 2), name="hinted", input_example=torch.zeros(3, 4).numpy(),
                                        registered_model_name="hinted-model", pip_requirements=["torch"],
                                        metadata={"governance.task": "multiclass-classification"})
    h = load_model(info.model_uri)
    assert (h.task_hint, h.task_hint_source) == ("multiclass-classification", "governance.task in the MLmodel metadata")
    c.set_logged_model_tags(info.model_id, {"governance.task": "classifier"})
    h = load_model(info.model_uri)
    assert (h.task_hint, h.task_hint_source) == ("classifier", f"governance.task tag on logged model {info.model_id}")
    c.set_model_version_tag("hinted-model", "1", "governance.task", "binary-classification")
    h = load_model("models:/hinted-model/1")
    assert (h.task_hint, h.task_hint_source) == (
        "binary-classification", "governance.task tag on registered version hinted-model/1")
    other = c.create_run(credit_store.experiment_id, tags={"governance.task": "regression"}).info.run_id
    assert tracking.task_hint(tracking.ModelHandle(model=None, uri="x", source_run_id=other)) == (
        "regression", f"governance.task tag on run {other}")
    assert load_model(credit_store.runs_uri).task_hint is None


def test_model_input_links_the_run_to_the_logged_model(credit_store) -> None:
    h = load_model(credit_store.runs_uri)
    rid = mlflow.MlflowClient().create_run(credit_store.experiment_id).info.run_id
    assert tracking.log_model_input(rid, h)
    run = mlflow.MlflowClient().get_run(rid)
    assert [m.model_id for m in run.inputs.model_inputs] == [h.model_id]
    assert not tracking.log_model_input(rid, tracking.ModelHandle(model=None, uri="<mem>"))


def test_training_schema_without_a_loadable_source(credit_store) -> None:
    import mlflow.pytorch

    df = pd.read_parquet(credit_store.validation_parquet)
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        mlflow.log_input(mlflow.data.from_pandas(df.head(100), name="train-no-source"), context="training")
        info = mlflow.pytorch.log_model(torch.nn.Linear(78, 1), name="m", input_example=torch.zeros(2, 78).numpy(),
                                        pip_requirements=["torch"])
    h = load_model(info.model_uri)
    assert tracking.training_frame(h) is None  # no rows to load
    schema = tracking.training_schema(h)
    assert schema.columns == list(df.columns) and schema.types["default"] == "long"
    assert schema.types["fico_score"] == "float" and schema.profile["num_rows"] == 100
    assert not schema.loadable and schema.where == f"training data 'train-no-source' of run {h.source_run_id}"
    full = tracking.training_schema(load_model(credit_store.runs_uri))
    assert full.loadable and full.profile["num_rows"] == 5000 and full.columns[-1] == "default"


def test_fast_dataset_digest_and_schema_match_mlflow(credit_store) -> None:
    from mlflow.data.digest_utils import compute_pandas_digest
    from mlflow.types.utils import _infer_schema

    df = pd.read_parquet(credit_store.validation_parquet)
    assert tracking.pandas_digest(df) == compute_pandas_digest(df)
    assert tracking._sample_schema(df, rows=50) == _infer_schema(df)
    # only object / string columns are tested value by value: every kind of column gives MLflow's digest
    n = 40
    mixed = pd.DataFrame({"num": np.arange(n, dtype=float), "obj": ["a"] * n, "str": pd.array(["b"] * n, dtype="string"),
                          "mixed": [1, "z"] * (n // 2), "cat": pd.Categorical(["p", "q"] * (n // 2)),
                          "none": [None] + ["s"] * (n - 1), "flag": [True] * n})
    for frame in (mixed, mixed[["num", "flag"]], mixed[["obj", "none"]]):
        assert tracking.pandas_digest(frame) == compute_pandas_digest(frame)
