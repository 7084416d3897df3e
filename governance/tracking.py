"""Everything that talks to MLflow: load models and logged datasets, pick the run, log artifacts,
metrics, tags and inputs, and tag registered model versions.

All logging goes through ``MlflowClient`` with an explicit run id, so the stage works the same
inside ``mlflow run`` (``MLFLOW_RUN_ID``), inside a notebook's active run, inside
``mlflow.models.evaluate`` and on its own.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from governance.errors import InputError

ARTIFACT_ROOT = "governance"
TAG_PREFIX = "governance."


class ModelLoadError(InputError):
    """The model URI does not exist or is not a PyTorch model; the message names the URI."""


@dataclass
class ModelHandle:
    """A loaded model and what is known about where it came from."""

    model: Any
    uri: str
    model_id: str | None = None
    source_run_id: str | None = None
    registered_name: str | None = None
    registered_version: str | None = None


def client() -> MlflowClient:
    """A client for the current tracking URI (``MLFLOW_TRACKING_URI`` is honoured)."""
    return MlflowClient()


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))?/?$")


def _registered_version(uri: str) -> tuple[str | None, str | None]:
    m = _MODELS_URI.match(uri)
    if not m or m.group("name").startswith("m-") and not (m.group("version") or m.group("alias")):
        return None, None
    c = client()
    name = m.group("name")
    if m.group("alias"):
        mv = c.get_model_version_by_alias(name, m.group("alias"))
        return name, str(mv.version)
    version = m.group("version")
    if version is None or version == "latest":
        versions = c.search_model_versions(f"name='{name}'")
        if not versions:
            return name, None
        return name, str(max(int(v.version) for v in versions))
    return name, str(version)


def load_model(model_uri: str, device: str = "cpu") -> ModelHandle:
    """Load a PyTorch-flavour MLflow model (pt2 or pickle) from any model URI.

    Supports ``runs:/<id>/<path>``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``models:/m-<id>`` and local paths. Raises :class:`ModelLoadError` with the URI and the cause.
    """
    import mlflow.pytorch

    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as exc:
        raise ModelLoadError(f"model URI '{model_uri}' could not be resolved: {exc}") from exc
    if "pytorch" not in (info.flavors or {}):
        raise ModelLoadError(
            f"model URI '{model_uri}' is not a PyTorch model (flavours: {sorted(info.flavors or {})})"
        )
    try:
        model = mlflow.pytorch.load_model(model_uri)
    except Exception as exc:
        raise ModelLoadError(f"model URI '{model_uri}' could not be loaded: {exc}") from exc
    if device != "cpu" and hasattr(model, "to"):
        model = model.to(device)
    try:
        model.eval()
    except Exception:  # an exported (pt2) GraphModule is already in inference form
        pass
    name = version = None
    try:
        name, version = _registered_version(model_uri)
    except Exception:
        name = version = None
    return ModelHandle(
        model=model, uri=model_uri, model_id=getattr(info, "model_id", None),
        source_run_id=info.run_id, registered_name=name, registered_version=version,
    )


# ------------------------------------------------------------------------------- datasets


def _dataset_frame(dataset_input: Any) -> pd.DataFrame:
    from mlflow.data import get_source

    from governance.data import read_table

    source = get_source(dataset_input)
    local = source.load()
    p = Path(str(local))
    if p.is_dir():
        files = sorted(list(p.glob("*.parquet")) + list(p.glob("*.csv")))
        if not files:
            raise FileNotFoundError(f"no parquet or CSV file under {p}")
        p = files[0]
    return read_table(p)


def load_logged_dataset(run_id: str, name: str) -> pd.DataFrame:
    """The table behind a dataset that run ``run_id`` logged with ``mlflow.log_input``."""
    from governance.data import DataLoadError

    try:
        run = client().get_run(run_id)
    except Exception as exc:
        raise DataLoadError(f"mlflow-dataset:{run_id}/{name}: run not found ({exc})") from exc
    inputs = run.inputs.dataset_inputs if run.inputs else []
    names = sorted({d.dataset.name for d in inputs})
    match = [d for d in inputs if d.dataset.name == name]
    if not match:
        raise DataLoadError(f"run {run_id} logged no dataset named '{name}' (it has: {names or 'none'})")
    try:
        return _dataset_frame(match[0])
    except Exception as exc:
        raise DataLoadError(
            f"mlflow-dataset:{run_id}/{name}: the dataset's source could not be loaded ({exc})"
        ) from exc


def training_frame(handle: ModelHandle) -> tuple[pd.DataFrame, str] | None:
    """The training table logged (context ``training``) by the run that produced the model."""
    if not handle.source_run_id:
        return None
    try:
        run = client().get_run(handle.source_run_id)
    except Exception:
        return None
    for d in run.inputs.dataset_inputs if run.inputs else []:
        ctx = {t.key: t.value for t in d.tags}.get("mlflow.data.context")
        if ctx == "training":
            try:
                return _dataset_frame(d), f"training data '{d.dataset.name}' of run {handle.source_run_id}"
            except Exception:
                return None
    return None


# ------------------------------------------------------------------------------- runs


def resolve_run(run_id: str | None = None, experiment_name: str | None = None,
                run_name: str = "governance-explain") -> tuple[str, bool]:
    """The run to log into: ``run_id``, else ``MLFLOW_RUN_ID``, else the active run, else a new
    run in ``experiment_name`` (or ``MLFLOW_EXPERIMENT_ID`` / the default). Returns (id, created)."""
    if run_id:
        client().get_run(run_id)  # fail early on a wrong id
        return run_id, False
    env = os.environ.get("MLFLOW_RUN_ID")
    if env:
        return env, False
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    c = client()
    if experiment_name:
        exp = c.get_experiment_by_name(experiment_name)
        exp_id = exp.experiment_id if exp else c.create_experiment(experiment_name)
    else:
        from mlflow.tracking.fluent import _get_experiment_id

        exp_id = _get_experiment_id() or "0"
    run = c.create_run(exp_id, run_name=run_name, tags={"mlflow.source.name": "mlflow-governance"})
    return run.info.run_id, True


def finish_run(run_id: str, ok: bool) -> None:
    """Mark a run this package created as finished or failed."""
    client().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags; keys get the ``governance.`` prefix when they lack it."""
    items = [
        RunTag(k if k.startswith(TAG_PREFIX) else TAG_PREFIX + k, str(v))
        for k, v in sorted(tags.items())
    ]
    client().log_batch(run_id, tags=items)


def log_metrics(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log scalar metrics (non-finite values are skipped: MLflow cannot compare them)."""
    import math
    import time

    ts = int(time.time() * 1000)
    items = [
        Metric(k, float(v), ts, 0) for k, v in sorted(metrics.items())
        if v is not None and math.isfinite(float(v))
    ]
    for i in range(0, len(items), 900):
        client().log_batch(run_id, metrics=items[i:i + 900])


def log_artifact_tree(run_id: str, local_root: str | Path) -> None:
    """Log ``local_root/governance/**`` under the run's ``governance/`` artifact folder."""
    src = Path(local_root) / ARTIFACT_ROOT
    client().log_artifacts(run_id, str(src), ARTIFACT_ROOT)


class StagingArea:
    """A temporary folder mirroring the run's artifact tree; logged in one go, then removed."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="governance-")
        self.root = Path(self._tmp.name)

    def path(self, relative: str) -> Path:
        """A path under ``governance/`` with its parent folders created."""
        p = self.root / ARTIFACT_ROOT / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, run_id: str) -> None:
        """Log everything staged to the run."""
        log_artifact_tree(run_id, self.root)

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "StagingArea":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pandas_digest(frame: pd.DataFrame, n_rows: int | None = None) -> str:
    """MLflow's pandas dataset digest (``compute_pandas_digest``), with its string-column test run
    on the hashed first rows instead of the whole table; identical for numeric tables. ``n_rows``:
    the whole table's row count when ``frame`` holds only its first rows (a streamed table)."""
    import numpy as np
    from mlflow.data.digest_utils import MAX_ROWS, get_normalized_md5_digest

    trimmed = frame.head(MAX_ROWS)
    strings = trimmed.columns[(trimmed.map(type) == str).all(0)]
    numeric = trimmed.select_dtypes(include=[np.number]).columns
    trimmed = trimmed[strings.union(numeric)]
    return get_normalized_md5_digest(
        [pd.util.hash_pandas_object(trimmed).values, np.int64(len(frame) if n_rows is None else n_rows)]
        + [str(x).encode() for x in frame.columns]
    )


def _sample_schema(frame: pd.DataFrame, rows: int = 1000) -> Any:
    from mlflow.types.utils import _infer_schema

    try:
        return _infer_schema(frame.head(rows))
    except Exception:
        return None


def log_dataset(run_id: str, frame: pd.DataFrame, *, source: str, name: str,
                target_column: str | None, context: str = "validation") -> str:
    """Log ``frame`` as an MLflow dataset input of the run; returns its digest."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    kwargs: dict[str, Any] = {"name": name}
    if target_column and target_column in frame.columns:
        kwargs["targets"] = target_column
    if source and not source.startswith("<") and not source.startswith("mlflow-dataset:"):
        kwargs["source"] = source
    kwargs["digest"] = pandas_digest(frame)
    ds = mlflow.data.from_pandas(frame, **kwargs)
    # MLflow infers the schema from every row (9 s on 100k x 79); column types are the same on a sample
    ds.__dict__["schema"] = _sample_schema(frame)
    client().log_inputs(run_id, datasets=[
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    ])
    return ds.digest


def tag_model_version(handle: ModelHandle, tags: Mapping[str, Any]) -> bool:
    """Set ``governance.*`` tags on the registered version behind ``handle``; False if none."""
    name, version = handle.registered_name, handle.registered_version
    c = client()
    if not (name and version) and handle.source_run_id:
        try:
            found = c.search_model_versions(f"run_id='{handle.source_run_id}'")
        except Exception:
            found = []
        if handle.model_id:
            found = [v for v in found if getattr(v, "model_id", None) in (None, handle.model_id)]
        if found:
            mv = max(found, key=lambda v: int(v.version))
            name, version = mv.name, str(mv.version)
    if not (name and version):
        return False
    for k, v in sorted(tags.items()):
        c.set_model_version_tag(name, version, k if k.startswith(TAG_PREFIX) else TAG_PREFIX + k, str(v))
    return True


def artifact_files(run_id: str, path: str = ARTIFACT_ROOT) -> Iterator[str]:
    """Every artifact file path under ``path`` in the run (for tests and checks)."""
    c = client()
    for f in c.list_artifacts(run_id, path or None):
        if f.is_dir:
            yield from artifact_files(run_id, f.path)
        else:
            yield f.path


def log_streamed_dataset(run_id: str, head: pd.DataFrame, n_rows: int, *, source: str, name: str,
                         target_column: str | None, context: str = "validation") -> str:
    """Log a table that was read in chunks as an MLflow dataset input of the run, from its first
    rows (``head``, at least MLflow's 10,000 digest rows when the table has them) and its row
    count: the same digest and schema :func:`log_dataset` gives the whole table, the whole
    table's profile. Returns the digest."""
    import json

    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    kwargs: dict[str, Any] = {"name": name, "digest": pandas_digest(head, n_rows=n_rows)}
    if target_column and target_column in head.columns:
        kwargs["targets"] = target_column
    if source and not source.startswith("<") and not source.startswith("mlflow-dataset:"):
        kwargs["source"] = source
    ds = mlflow.data.from_pandas(head, **kwargs)
    ds.__dict__["schema"] = _sample_schema(head)
    d = ds.to_dict()
    entity = DatasetEntity(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                           schema=d.get("schema"),
                           profile=json.dumps({"num_rows": int(n_rows), "num_elements": int(n_rows) * head.shape[1]}))
    client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return ds.digest
