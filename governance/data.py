"""Load the validation table: a parquet or CSV file, or a dataset a training run logged to MLflow.

An empty or header-only file loads as an empty table (so the data contract, not a parser
traceback, reports it). ``mlflow-dataset:<run-id>/<name>`` is resolved by ``governance.tracking``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from governance.errors import InputError

DATASET_PREFIX = "mlflow-dataset:"


class DataLoadError(InputError):
    """The data could not be found or read; the message says what and where."""


@dataclass
class LoadedData:
    """A table and where it came from (``source`` is the path or dataset reference)."""

    frame: pd.DataFrame
    source: str
    name: str


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a parquet or CSV file; an empty file gives an empty table."""
    p = Path(path)
    if not p.is_file():
        raise DataLoadError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    if p.stat().st_size == 0:
        return pd.DataFrame()
    if suffix in (".parquet", ".pq"):
        try:
            return pd.read_parquet(p)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataLoadError(f"cannot read parquet file {p}: {exc}") from exc
    if suffix in (".csv", ".txt"):
        try:
            return pd.read_csv(p)
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
        except Exception as exc:
            raise DataLoadError(f"cannot read CSV file {p}: {exc}") from exc
    raise DataLoadError(f"unsupported data file type '{suffix}' for {p}: use .parquet or .csv")


def load_data(data: str | Path | pd.DataFrame, *, tracking_uri: str | None = None) -> LoadedData:
    """Load ``data``: a DataFrame, or any reference :func:`governance.sources.resolve_source` takes."""
    if isinstance(data, pd.DataFrame):
        return LoadedData(frame=data, source="<dataframe>", name="dataframe")
    from governance.sources import read_source, resolve_source

    with resolve_source(data, tracking_uri=tracking_uri) as src:
        return LoadedData(frame=read_source(src), source=src.display, name=src.name)
