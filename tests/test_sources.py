"""`--data` references resolved to local files (governance.sources) against a real sqlite store:
local files and dataset folders, runs:/ and models:/ artifacts downloaded through MLflow,
mlflow-dataset: references, and the errors (said as the user wrote the reference)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from governance import sources
from governance.data import DataLoadError, load_data
from governance.sources import resolve_source


def _downloads() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob(sources.DOWNLOAD_PREFIX + "*")}


@pytest.fixture()
def frame(credit_store) -> pd.DataFrame:
    return pd.read_parquet(credit_store.validation_parquet)


def test_local_file_as_given(credit_store, frame, monkeypatch) -> None:
    monkeypatch.chdir(credit_store.validation_parquet.parent)
    with resolve_source("validation.parquet") as src:
        assert (src.kind, src.format, src.name, src.display) == ("file", "parquet", "validation", "validation.parquet")
        assert src.files == (credit_store.validation_parquet,) and src.uri == str(credit_store.validation_parquet)
        assert src.download_dir is None and src.relative_names() == ["validation.parquet"]
    loaded = load_data("validation.csv")
    assert loaded.source == "validation.csv" and loaded.name == "validation"
    assert np.allclose(loaded.frame.to_numpy(), frame.to_numpy(), atol=1e-6)
    assert credit_store.validation_parquet.is_file()  # cleanup never touches the user's files


def test_folder_of_parquet_files_ignores_bookkeeping(tmp_path: Path, frame) -> None:
    folder = tmp_path / "valid_ds"
    folder.mkdir()
    # what Spark / Hadoop write beside the data; pyarrow writes the parts
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 3)):
        pq.write_table(pa.Table.from_pandas(frame.iloc[part], preserve_index=False),
                       folder / f"part-{i:05d}-c000.snappy.parquet")
        (folder / f".part-{i:05d}-c000.snappy.parquet.crc").write_bytes(b"crc")
    (folder / "_SUCCESS").write_text("")
    (folder / "._SUCCESS.crc").write_bytes(b"crc")
    src = resolve_source(str(folder))
    assert src.kind == "folder" and src.format == "parquet" and src.name == "valid_ds"
    assert src.relative_names() == [f"part-{i:05d}-c000.snappy.parquet" for i in range(3)]
    loaded = load_data(str(folder))
    pd.testing.assert_frame_equal(loaded.frame, frame)
    # pyarrow's own dataset writer (nested partition folders are found too)
    ds_dir = tmp_path / "pa_ds"
    pq.write_to_dataset(pa.Table.from_pandas(frame, preserve_index=False), ds_dir)
    assert len(resolve_source(ds_dir).files) >= 1
    assert len(load_data(str(ds_dir)).frame) == len(frame)


@pytest.mark.parametrize("layout, message", [
    ({}, "is a folder but not a dataset: no .parquet or .csv data files (it is empty)"),
    ({"notes.txt.bak": "x", "model.pt": "y"}, "is a folder but not a dataset: no .parquet or .csv data files (it holds model.pt, notes.txt.bak)"),
    ({"_delta_log/0.json": "{}", "part-0.parquet": ""}, "is a Delta table"),
    ({"a.parquet": "", "b.csv": ""}, "mixes parquet and CSV files"),
    ({"a.parquet": "", "README.md": ""}, "files that are not parquet: README.md"),
])
def test_folder_that_is_not_a_dataset_says_so(tmp_path: Path, layout: dict, message: str) -> None:
    folder = tmp_path / "some folder"
    folder.mkdir()
    for name, text in layout.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    with pytest.raises(DataLoadError) as err:
        load_data(str(folder))
    assert message in str(err.value) and f"'{folder}'" in str(err.value)


def test_missing_file_and_odd_references_are_named_as_given(credit_store) -> None:
    with pytest.raises(DataLoadError, match="^data file not found: no/such.parquet$"):
        load_data("no/such.parquet")
    weird = f"runs:/{credit_store.train_run}//data/../nope.parquet"
    with pytest.raises(DataLoadError) as err:
        load_data(weird)
    assert str(err.value).startswith(f"could not download '{weird}' through MLflow: ")
    with pytest.raises(DataLoadError, match="mlflow-dataset:<run-id>/<dataset-name>, got 'mlflow-dataset:abc'"):
        load_data("mlflow-dataset:abc")
    with pytest.raises(DataLoadError, match="no data given"):
        load_data("  ")


def test_run_artifact_downloaded_then_removed(credit_store, frame) -> None:
    before = _downloads()
    uri = f"runs:/{credit_store.train_run}/data/validation.parquet"
    src = resolve_source(uri)
    try:
        assert src.display == uri and src.name == "validation" and src.uri == uri
        assert src.download_dir is not None and src.download_dir.name.startswith(sources.DOWNLOAD_PREFIX)
        pd.testing.assert_frame_equal(pd.read_parquet(src.files[0]), frame)
    finally:
        src.cleanup()
    assert not src.files[0].exists() and _downloads() == before
    # the run's data/ folder holds tables, a CSV dictionary and JSON: not one dataset; the download goes
    with pytest.raises(DataLoadError, match="data' mixes parquet and CSV files"):
        load_data(f"runs:/{credit_store.train_run}/data")
    assert _downloads() == before


def test_models_relative_artifact(credit_store, frame, tmp_path: Path) -> None:
    path = tmp_path / "holdout.parquet"
    frame.head(50).to_parquet(path, index=False)
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        mlflow.pytorch.log_model(torch.nn.Linear(3, 1), name="with-data", registered_model_name="sources-test",
                                 input_example=np.zeros((2, 3), np.float32), extra_files=[str(path)],
                                 pip_requirements=["torch"])
    loaded = load_data("models:/sources-test/1/extra_files/holdout.parquet")
    pd.testing.assert_frame_equal(loaded.frame, frame.head(50))
    assert loaded.source == "models:/sources-test/1/extra_files/holdout.parquet" and loaded.name == "holdout"


def test_logged_datasets(credit_store, frame) -> None:
    # logged with a local source: used in place, no copy
    with resolve_source(f"mlflow-dataset:{credit_store.train_run}/validation") as src:
        assert src.download_dir is None and src.name == "validation"
        artifacts = credit_store.root / "artifacts" / credit_store.train_run / "artifacts"
        assert src.files[0] == artifacts / "data" / "validation.parquet"
    client = mlflow.MlflowClient()
    rid = client.create_run(credit_store.experiment_id).info.run_id
    artifact = f"runs:/{credit_store.train_run}/data/validation.parquet"
    with mlflow.start_run(run_id=rid):
        mlflow.log_input(mlflow.data.from_pandas(frame, source=sources.MlflowArtifactDatasetSource(artifact),
                                                 name="by-uri"), context="validation")
        mlflow.log_input(mlflow.data.from_pandas(frame.head(10), name="no-source"), context="training")
    loaded = load_data(f"mlflow-dataset:{rid}/by-uri")
    pd.testing.assert_frame_equal(loaded.frame, frame)
    source = json.loads(next(d.dataset.source for d in client.get_run(rid).inputs.dataset_inputs
                             if d.dataset.name == "by-uri"))
    assert source == {"uri": artifact}
    with pytest.raises(DataLoadError, match="logged without a loadable source .*give the data itself"):
        load_data(f"mlflow-dataset:{rid}/no-source")
    with pytest.raises(DataLoadError, match=r"run .* logged no dataset named 'x' \(it has: by-uri, no-source\)"):
        load_data(f"mlflow-dataset:{rid}/x")
    with pytest.raises(DataLoadError, match="run 0123456789abcdef0123456789abcdef not found"):
        load_data("mlflow-dataset:0123456789abcdef0123456789abcdef/validation")


def test_dataset_source_recorded_for_each_reference(credit_store, monkeypatch) -> None:
    monkeypatch.chdir(credit_store.validation_parquet.parent)
    local = sources.dataset_source("validation.parquet")
    assert local.to_dict()["uri"] == str(credit_store.validation_parquet)
    remote = sources.dataset_source("mlflow-artifacts:/1/abc/artifacts/v.parquet")
    assert isinstance(remote, sources.MlflowArtifactDatasetSource)
    assert remote.to_dict() == {"uri": "mlflow-artifacts:/1/abc/artifacts/v.parquet"}
    logged = sources.dataset_source(f"mlflow-dataset:{credit_store.train_run}/validation")
    assert logged.to_dict()["uri"].endswith("/data/validation.parquet")
    assert sources.dataset_source("<dataframe>") is None


def test_registered_source_resolves_artifact_uris(credit_store, frame) -> None:
    """With the source registered (the plugin's mlflow.dataset_source entry point does it), MLflow
    itself takes an artifact URI as a dataset source and loads it back."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    sources.register()
    sources.register()
    assert get_registered_sources().count(sources.MlflowArtifactDatasetSource) == 1
    uri = f"runs:/{credit_store.train_run}/data/validation.parquet"
    ds = mlflow.data.from_pandas(frame, source=uri, name="v")
    assert isinstance(ds.source, sources.MlflowArtifactDatasetSource)
    rid = mlflow.MlflowClient().create_run(credit_store.experiment_id).info.run_id
    with mlflow.start_run(run_id=rid):
        mlflow.log_input(ds, context="validation")
    logged = mlflow.MlflowClient().get_run(rid).inputs.dataset_inputs[0]
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.data.get_source(logged).load(dst_path=tmp)
        pd.testing.assert_frame_equal(pd.read_parquet(local), frame)


def test_a_local_name_with_a_colon_stays_local(tmp_path: Path, frame, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    frame.head(5).to_parquet("v2:holdout.parquet")
    loaded = load_data("v2:holdout.parquet")
    assert loaded.source == "v2:holdout.parquet" and len(loaded.frame) == 5
