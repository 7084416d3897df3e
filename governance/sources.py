"""Where the data behind ``--data`` lives: turn what an MLflow user holds into local file(s).

A reference is a local parquet/CSV file, a folder of parquet (or CSV) files as Spark or pyarrow
write them, an artifact URI downloaded through MLflow (``runs:/<id>/path``,
``mlflow-artifacts:/...``, ``models:/<name>/<version>/path``, any other artifact-store URI), or
``mlflow-dataset:<run-id>/<name>`` (a dataset a run logged with ``mlflow.log_input``).
:func:`resolve_source` finds the file(s) without reading the table; the readers read
:attr:`ResolvedSource.files`. Downloads go into a temporary folder that
:meth:`ResolvedSource.cleanup` removes; nothing the user owns is ever removed.

:class:`MlflowArtifactDatasetSource` lets a dataset be logged with an artifact URI as its source
(MLflow itself has no dataset source for ``runs:/``, ``models:/`` or ``mlflow-artifacts:/``).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource

from governance.workdirs import make_owned_dir

DATASET_PREFIX = "mlflow-dataset:"
DOWNLOAD_PREFIX = "governance-data-"
ARTIFACT_SCHEMES = ("runs", "models", "mlflow-artifacts")
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".txt": "csv"}


def _error(message: str) -> Exception:
    from governance.data import DataLoadError  # data.py calls this module: import late

    return DataLoadError(message)


@dataclass
class ResolvedSource:
    """Local file(s) behind a data reference.

    ``path`` is a file or a folder; ``files`` are its data files in a stable order (sorted by
    their path relative to ``path``); ``format`` is ``parquet`` or ``csv``; ``kind`` is ``file``
    or ``folder``; ``display`` is the reference exactly as the user gave it (for messages and
    records); ``uri`` is what MLflow can record as the dataset's source (an absolute path or the
    artifact URI), None when unknown. Use as a context manager or call :meth:`cleanup`.
    """

    path: Path
    files: tuple[Path, ...]
    format: str
    kind: str
    display: str
    name: str
    uri: str | None = None
    download_dir: Path | None = field(default=None, repr=False)

    def relative_names(self) -> list[str]:
        """Each data file's name relative to ``path`` (its own name for a single file)."""
        if self.kind == "file":
            return [self.path.name]
        return [f.relative_to(self.path).as_posix() for f in self.files]

    def cleanup(self) -> None:
        """Remove the download folder this resolution created (nothing else)."""
        if self.download_dir is not None:
            shutil.rmtree(self.download_dir, ignore_errors=True)
            self.download_dir = None

    def __enter__(self) -> "ResolvedSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# ------------------------------------------------------------------------------- local files


def _hidden(relative: Path) -> bool:
    """Spark/Hadoop/pyarrow bookkeeping: ``_SUCCESS``, ``_committed_*``, ``.part-0.crc``, ``*.crc``."""
    return any(p.startswith(("_", ".")) for p in relative.parts) or relative.suffix == ".crc"


def _folder_files(folder: Path, display: str) -> tuple[tuple[Path, ...], str]:
    if (folder / "_delta_log").is_dir():
        raise _error(f"'{display}' is a Delta table (it has _delta_log/): its parquet files include "
                     "superseded versions; export the current version to parquet and give that")
    every = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    visible = [p for p in every if not _hidden(p.relative_to(folder))]
    data = [p for p in visible if p.suffix.lower() in FORMATS]
    if not data:
        seen = [p.relative_to(folder).as_posix() for p in visible][:5]
        what = f"it holds {', '.join(seen)}{' ...' if len(visible) > 5 else ''}" if seen else "it is empty"
        raise _error(f"'{display}' is a folder but not a dataset: no .parquet or .csv data files ({what}); "
                     "give a parquet/CSV file or a folder of parquet files")
    formats = sorted({FORMATS[p.suffix.lower()] for p in data})
    if len(formats) > 1:
        raise _error(f"'{display}' mixes parquet and CSV files; give a folder with one format")
    other = [p.relative_to(folder).as_posix() for p in visible if p.suffix.lower() not in FORMATS]
    if other:
        raise _error(f"'{display}' is a dataset folder with files that are not {formats[0]}: "
                     f"{', '.join(other[:5])}; remove them or give the files one by one")
    return tuple(data), formats[0]


def _local(path: Path, display: str, name: str | None, uri: str | None,
           download_dir: Path | None) -> ResolvedSource:
    if path.is_dir():
        files, fmt = _folder_files(path, display)
        return ResolvedSource(path=path, files=files, format=fmt, kind="folder", display=display,
                              name=name or path.name, uri=uri, download_dir=download_dir)
    if not path.is_file():
        raise _error(f"data file not found: {display}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise _error(f"unsupported data file type '{path.suffix}' for {display}: use .parquet or .csv "
                     "(or a folder of parquet files)")
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return ResolvedSource(path=path, files=(path,), format=fmt, kind="file", display=display,
                          name=name or stem, uri=uri, download_dir=download_dir)


def _file_uri_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path))


# ------------------------------------------------------------------------------- downloads


def _scheme(text: str) -> str | None:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", text)
    return m.group(1).lower() if m else None  # one letter is a Windows drive, not a scheme


def local_path(text: str) -> Path | None:
    """The local file or folder a reference names: a path (a local name with a colon too), or a
    ``file:`` URI; None for another scheme's URI (runs:/, models:/, s3://...)."""
    scheme = _scheme(text)
    if scheme is None or Path(text).exists():
        return Path(text)
    return _file_uri_path(text) if scheme == "file" else None


def _download(uri: str, display: str, name: str | None, tracking_uri: str | None) -> ResolvedSource:
    """Download an artifact URI through MLflow into a fresh temp folder (removed by cleanup)."""
    import mlflow

    tmp = make_owned_dir(DOWNLOAD_PREFIX)  # one a killed process leaves is removed at the next start
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp), tracking_uri=tracking_uri)
        return _local(Path(local), display, name or _uri_name(uri), uri, tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception) or type(exc).__name__ == "DataLoadError":
            raise
        reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise _error(f"could not download '{display}' through MLflow: {reason.splitlines()[0]}") from exc


def _uri_name(uri: str) -> str:
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in FORMATS:
        if last.lower().endswith(suffix):
            return last[: -len(suffix)]
    return last or "data"


# ------------------------------------------------------------------------------- logged datasets


def parse_dataset_reference(reference: str) -> tuple[str, str]:
    """``mlflow-dataset:<run-id>/<name>`` -> (run id, dataset name)."""
    ref = reference[len(DATASET_PREFIX):]
    if "/" not in ref or not ref.split("/", 1)[0] or not ref.split("/", 1)[1]:
        raise _error(f"expected {DATASET_PREFIX}<run-id>/<dataset-name>, got '{reference}'")
    run_id, name = ref.split("/", 1)
    return run_id, name


def logged_dataset(run_id: str, name: str, *, tracking_uri: str | None = None) -> Any:
    """The ``mlflow.entities.Dataset`` named ``name`` that run ``run_id`` logged as an input."""
    from mlflow.tracking import MlflowClient

    ref = f"{DATASET_PREFIX}{run_id}/{name}"
    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except Exception as exc:
        reason = getattr(exc, "message", None) or str(exc)
        raise _error(f"{ref}: run {run_id} not found ({reason.splitlines()[0]})") from exc
    inputs = run.inputs.dataset_inputs if run.inputs else []
    match = [d.dataset for d in inputs if d.dataset.name == name]
    if not match:
        names = sorted({d.dataset.name for d in inputs})
        raise _error(f"run {run_id} logged no dataset named '{name}' (it has: {', '.join(names) or 'none'})")
    digests = sorted({d.digest for d in match})
    if len(digests) > 1:
        raise _error(f"run {run_id} logged {len(digests)} different datasets named '{name}' "
                     f"(digests {', '.join(digests)}); give the data file instead")
    return match[0]


def source_location(dataset: Any) -> str | None:
    """The URI or path recorded as a logged dataset's source, when the source is a location
    (None for a dataset logged without one, e.g. ``mlflow.data.from_pandas(df)``)."""
    try:
        source = json.loads(dataset.source) if dataset.source else {}
    except ValueError:
        return None
    uri = source.get("uri") or source.get("url") if isinstance(source, dict) else None
    return str(uri) if uri else None


def _resolve_logged(reference: str, tracking_uri: str | None) -> ResolvedSource:
    run_id, name = parse_dataset_reference(reference)
    dataset = logged_dataset(run_id, name, tracking_uri=tracking_uri)
    uri = source_location(dataset)
    if uri is None:
        raise _error(f"{reference}: the dataset was logged without a loadable source (source type "
                     f"'{dataset.source_type}'), so MLflow holds its schema but not its rows; "
                     "give the data itself with --data <file>")
    scheme = _scheme(uri)
    if scheme is None:
        return _local(Path(uri), reference, name, uri, None)
    if scheme == "file":
        return _local(_file_uri_path(uri), reference, name, uri, None)
    return _download(uri, reference, name, tracking_uri)


# ------------------------------------------------------------------------------- entry point


def resolve_source(reference: str | Path, *, tracking_uri: str | None = None) -> ResolvedSource:
    """Turn a data reference into local file(s), without reading the table.

    Raises :class:`governance.data.DataLoadError` (exit 1) naming the reference as given when
    it cannot be found, downloaded, or is a folder that is not a dataset.
    """
    display = str(reference)
    if isinstance(reference, Path):
        return _local(reference.expanduser().absolute(), display, None, str(reference.resolve()), None)
    text = display.strip()
    if not text:
        raise _error("no data given: pass a parquet/CSV file, a folder of parquet files, an artifact URI "
                     f"(runs:/, mlflow-artifacts:/, models:/) or {DATASET_PREFIX}<run-id>/<name>")
    if text.startswith(DATASET_PREFIX):
        return _resolve_logged(text, tracking_uri)
    scheme = _scheme(text)
    if scheme is None or Path(text).exists():  # a local name with a colon is still local
        p = Path(text).expanduser().absolute()  # absolute: readers take "a:b.parquet" for a URI
        return _local(p, display, None, str(p.resolve()), None)
    if scheme == "file":
        p = _file_uri_path(text)
        return _local(p, display, None, str(p), None)
    return _download(text, display, None, tracking_uri)


def read_source(source: ResolvedSource) -> Any:
    """The whole table behind ``source`` as one DataFrame (its files concatenated in order).
    For small tables and the training data; the stage streams large ones in chunks."""
    import pandas as pd

    from governance.data import read_table

    frames = [read_table(f) for f in source.files]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------- MLflow dataset source


class MlflowArtifactDatasetSource(FileSystemDatasetSource):
    """A dataset stored as an MLflow artifact (``runs:/``, ``models:/``, ``mlflow-artifacts:/``),
    downloaded through the tracking server by :meth:`load`. Registered as the MLflow dataset
    source ``mlflow_artifact`` (entry point ``mlflow.dataset_source``)."""

    def __init__(self, uri: str) -> None:
        self._uri = uri

    @property
    def uri(self) -> str:
        """The artifact URI."""
        return self._uri

    @staticmethod
    def _get_source_type() -> str:
        return "mlflow_artifact"

    def load(self, dst_path: str | None = None) -> str:
        """Download the artifact; returns the local path (``dst_path`` or a new temp folder)."""
        from mlflow.artifacts import download_artifacts

        return download_artifacts(artifact_uri=self._uri, dst_path=dst_path)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and _scheme(raw_source) in ARTIFACT_SCHEMES

    @classmethod
    def _resolve(cls, raw_source: Any) -> "MlflowArtifactDatasetSource":
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "MlflowArtifactDatasetSource":
        return cls(str(source_dict["uri"]))


def dataset_source(reference: str, *, tracking_uri: str | None = None) -> Any | None:
    """The MLflow ``DatasetSource`` to record for data given as ``reference`` (None: unknown).

    A local path becomes MLflow's local source with the absolute path; an artifact URI becomes
    :class:`MlflowArtifactDatasetSource`; ``mlflow-dataset:`` reuses the logged dataset's own
    source; any other URI is resolved by MLflow's registry when it can."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json, resolve_dataset_source

    text = str(reference).strip()
    if not text or text.startswith("<"):
        return None
    try:
        if text.startswith(DATASET_PREFIX):
            run_id, name = parse_dataset_reference(text)
            ds = logged_dataset(run_id, name, tracking_uri=tracking_uri)
            if source_location(ds) is None:
                return None
            try:
                return get_dataset_source_from_json(ds.source, ds.source_type)
            except Exception:
                return dataset_source(source_location(ds) or "", tracking_uri=tracking_uri)
        scheme = _scheme(text)
        if scheme in ARTIFACT_SCHEMES:
            return MlflowArtifactDatasetSource(text)
        if scheme is None:
            text = str(Path(text).expanduser().resolve())
        return resolve_dataset_source(text)
    except Exception:
        return None


def register() -> None:
    """Register :class:`MlflowArtifactDatasetSource` with MLflow's dataset source registry (once)."""
    from mlflow.data.dataset_source_registry import get_registered_sources, register_dataset_source

    if MlflowArtifactDatasetSource not in get_registered_sources():
        register_dataset_source(MlflowArtifactDatasetSource)
