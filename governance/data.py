"""Tables the stage reads: whole (small tables) or streamed in chunks (validation data of any size).

``open_table`` turns what the user gave (a parquet or CSV file, a folder of parquet or CSV files
read as one dataset, a pandas DataFrame, ``mlflow-dataset:<run-id>/<name>``) into a
:class:`TableSource` that yields the rows in chunks of bounded size, so memory does not grow
with the number of rows. Rows are numbered 0, 1, ... in reading order (files of a folder in
sorted order); chunk frames carry those global positions as their index.

Every input file is hashed (SHA-256 of its bytes) when the table is opened, and its size and
modification time are checked again after reading (:meth:`TableSource.check_unchanged`), so
the recorded hashes are those of the bytes that were read.

An empty or header-only file opens as an empty table (so the data contract, not a parser
traceback, reports it). ``read_table`` / ``load_data`` load a whole table (small tables: the
training data a contract is derived from, logged datasets).
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from governance.errors import InputError

DATASET_PREFIX = "mlflow-dataset:"
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".txt")


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
    if suffix in PARQUET_SUFFIXES:
        try:
            return pd.read_parquet(p)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataLoadError(f"cannot read parquet file {p}: {exc}") from exc
    if suffix in CSV_SUFFIXES:
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


# ----------------------------------------------------------------------------- streamed tables


@dataclass
class InputFile:
    """One file of a dataset: its path relative to the dataset, SHA-256 and size when opened."""

    path: Path
    relative: str
    size: int
    mtime_ns: int
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.relative, "sha256": self.sha256, "size": self.size}


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_sha256(files: list[InputFile]) -> str | None:
    """One hash for a dataset: SHA-256 over the sorted ``"path\\0sha256\\n"`` lines of its files."""
    if not files:
        return None
    lines = sorted(f"{f.relative}\0{f.sha256}\n" for f in files)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


class TableSource(ABC):
    """A table read in chunks. ``columnar`` sources read a subset of columns cheaply and know
    their row count up front; the others (CSV) are read row chunk by row chunk, all columns."""

    columnar: bool = True

    def __init__(self, source: str, name: str, files: list[InputFile] | None = None) -> None:
        self.source = source
        self.name = name
        self.files = files or []
        self._hashing: threading.Thread | None = None
        self._hash_error: BaseException | None = None
        self.resolved: Any = None  # the governance.sources.ResolvedSource behind a reference

    def close(self) -> None:
        """Wait for the hashing thread and remove the folder a download created (nothing else)."""
        if self._hashing is not None:
            self._hashing.join()
        if self.resolved is not None:
            self.resolved.cleanup()

    @property
    @abstractmethod
    def columns(self) -> list[str]:
        """Column names in file order."""

    @property
    @abstractmethod
    def n_rows(self) -> int | None:
        """The number of rows, or None until a full pass has counted them."""

    @abstractmethod
    def schema_frame(self) -> pd.DataFrame:
        """A zero-row frame with every column and its type (for schema-level checks)."""

    @abstractmethod
    def iter_frames(self, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """Frames of at most ``rows`` rows (``columns`` only, default all), indexed by the
        rows' global positions."""

    def read_columns(self, columns: list[str], start: int, stop: int) -> pd.DataFrame:
        """Rows ``start .. stop - 1`` of ``columns`` (columnar sources)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read a column subset")

    def head(self, n: int) -> pd.DataFrame:
        """The first ``n`` rows, every column."""
        for frame in self.iter_frames(n):
            return frame
        return self.schema_frame()

    # -- file hashes --------------------------------------------------------------------------
    def start_hashing(self) -> None:
        """Hash every input file in a background thread (hashlib releases the GIL)."""
        if self._hashing is not None or not self.files:
            return

        def work() -> None:
            try:
                for f in self.files:
                    f.sha256 = sha256_file(f.path)
            except BaseException as exc:  # reported by file_hashes()
                self._hash_error = exc

        self._hashing = threading.Thread(target=work, name="governance-hash", daemon=True)
        self._hashing.start()

    def file_hashes(self) -> list[InputFile]:
        """The input files with their SHA-256 (waits for the hashing thread)."""
        self.start_hashing()
        if self._hashing is not None:
            self._hashing.join()
        if self._hash_error is not None:
            raise DataLoadError(f"cannot hash the input files of {self.source}: {self._hash_error}")
        return self.files

    def check_unchanged(self) -> None:
        """Raise when an input file changed (size or modification time) since it was hashed."""
        for f in self.files:
            st = f.path.stat()
            if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
                raise DataLoadError(f"input file {f.path} changed while it was being read; run again on a "
                                    "stable copy of the data")


class FrameSource(TableSource):
    """A pandas DataFrame already in memory (rows are its positions, whatever its index)."""

    def __init__(self, frame: pd.DataFrame, source: str = "<dataframe>", name: str = "dataframe") -> None:
        super().__init__(source, name)
        self.frame = frame

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    @property
    def n_rows(self) -> int:
        return len(self.frame)

    def schema_frame(self) -> pd.DataFrame:
        return self._slice(0, 0, None)

    def _slice(self, start: int, stop: int, columns: list[str] | None) -> pd.DataFrame:
        part = self.frame.iloc[start:stop]
        if columns is not None:
            part = part[columns]
        part = part.copy()
        part.columns = [str(c) for c in part.columns]
        part.index = pd.RangeIndex(start, start + len(part))
        return part

    def iter_frames(self, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        for start in range(0, len(self.frame), rows):
            yield self._slice(start, start + rows, columns)

    def read_columns(self, columns: list[str], start: int, stop: int) -> pd.DataFrame:
        return self._slice(start, stop, columns)


def _input_file(path: Path, root: Path) -> InputFile:
    st = path.stat()
    rel = path.name if path == root else path.relative_to(root).as_posix()
    return InputFile(path=path, relative=rel, size=st.st_size, mtime_ns=st.st_mtime_ns)


class ParquetSource(TableSource):
    """One parquet file, or every parquet file under a folder (sorted by path) as one table.
    Read record batch by record batch without pre-buffering whole row groups, so memory is
    bounded by the chunk and the pages being decoded, not by the row-group size."""

    def __init__(self, paths: list[Path], root: Path, source: str, name: str) -> None:
        import pyarrow.parquet as pq

        super().__init__(source, name, [_input_file(p, root) for p in paths])
        self._counts = []
        self._schema = None
        for p in paths:
            try:
                meta = pq.read_metadata(p)
                schema = pq.read_schema(p)
            except Exception as exc:
                raise DataLoadError(f"cannot read parquet file {p}: {exc}") from exc
            if self._schema is None:
                self._schema = schema
            elif schema.names != self._schema.names:
                raise DataLoadError(f"parquet files under {root} have different columns: {paths[0].name} has "
                                    f"{self._schema.names}, {p.relative_to(root)} has {schema.names}")
            self._counts.append(meta.num_rows)

    @property
    def columns(self) -> list[str]:
        return [n for n in self._schema.names if n != "__index_level_0__"]

    @property
    def n_rows(self) -> int:
        return int(sum(self._counts))

    def schema_frame(self) -> pd.DataFrame:
        frame = self._schema.empty_table().to_pandas()
        return frame[self.columns].reset_index(drop=True)

    def _batches(self, path: Path, rows: int, columns: list[str] | None) -> Iterator[Any]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 16)
        yield from pf.iter_batches(batch_size=rows, columns=columns or self.columns, use_threads=False)

    def iter_frames(self, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        offset = 0
        for f in self.files:
            for batch in self._batches(f.path, rows, columns):
                frame = batch.to_pandas(use_threads=False)  # Arrow's pool threads cost more CPU than they save
                frame.index = pd.RangeIndex(offset, offset + len(frame))
                offset += len(frame)
                yield frame

    def read_columns(self, columns: list[str], start: int, stop: int) -> pd.DataFrame:
        import pyarrow as pa

        parts = []
        offset = 0
        for f, count in zip(self.files, self._counts):
            if offset + count <= start or offset >= stop:
                offset += count
                continue
            for batch in self._batches(f.path, 1 << 16, columns):
                lo, hi = max(start - offset, 0), min(stop - offset, batch.num_rows)
                if hi > lo:
                    parts.append(batch.slice(lo, hi - lo))
                offset += batch.num_rows
                if offset >= stop:
                    break
            else:
                continue
            break
        table = pa.Table.from_batches(parts) if parts else self._schema.empty_table().select(columns)
        frame = table.to_pandas(use_threads=False)
        frame.index = pd.RangeIndex(start, start + len(frame))
        return frame


class CsvSource(TableSource):
    """One CSV file, or every CSV file under a folder (sorted by path; same header) as one table,
    read with pandas' chunked reader: each chunk's column types are inferred from that chunk."""

    columnar = False

    def __init__(self, paths: list[Path], root: Path, source: str, name: str) -> None:
        super().__init__(source, name, [_input_file(p, root) for p in paths])
        self._rows: int | None = None
        self._columns: list[str] | None = None
        self._empty = all(f.size == 0 for f in self.files)
        for p in paths:
            cols = self._header(p)
            if self._columns is None:
                self._columns = cols
            elif cols != self._columns:
                raise DataLoadError(f"CSV files under {root} have different headers: {self._columns} and {cols}")

    @staticmethod
    def _header(path: Path) -> list[str]:
        if path.stat().st_size == 0:
            return []
        try:
            return [str(c) for c in pd.read_csv(path, nrows=0).columns]
        except pd.errors.EmptyDataError:
            return []
        except Exception as exc:
            raise DataLoadError(f"cannot read CSV file {path}: {exc}") from exc

    @property
    def columns(self) -> list[str]:
        return list(self._columns or [])

    @property
    def n_rows(self) -> int | None:
        return 0 if self._empty else self._rows

    def schema_frame(self) -> pd.DataFrame:
        if self._empty or not self._columns:
            return pd.DataFrame()
        return pd.read_csv(self.files[0].path, nrows=100).iloc[:0]

    def iter_frames(self, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        if self._empty or not self._columns:
            self._rows = 0
            return
        offset = 0
        for f in self.files:
            if f.size == 0:
                continue
            try:
                reader = pd.read_csv(f.path, chunksize=rows, usecols=columns)
                for frame in reader:
                    if columns is not None:
                        frame = frame[columns]
                    frame.index = pd.RangeIndex(offset, offset + len(frame))
                    offset += len(frame)
                    yield frame
            except pd.errors.EmptyDataError:
                continue
            except (pd.errors.ParserError, UnicodeDecodeError) as exc:
                raise DataLoadError(f"cannot read CSV file {f.path}: {exc}") from exc
        self._rows = offset


def open_table(data: str | Path | pd.DataFrame | LoadedData | TableSource, *,
               source: str | None = None, tracking_uri: str | None = None) -> TableSource:
    """A :class:`TableSource` over ``data``: a DataFrame, or any reference
    :func:`governance.sources.resolve_source` takes (file, dataset folder, ``runs:/``,
    ``mlflow-artifacts:/``, ``models:/`` artifact URIs, ``mlflow-dataset:<run-id>/<name>``).
    ``source`` is how the user named it, recorded as is (defaults to the reference as given).
    Starts hashing its files; call :meth:`TableSource.close` to drop a download folder."""
    if isinstance(data, TableSource):
        return data
    if isinstance(data, LoadedData):
        return FrameSource(data.frame, source=source or data.source, name=data.name)
    if isinstance(data, pd.DataFrame):
        return FrameSource(data, source=source or "<dataframe>")
    from governance.sources import resolve_source

    src = resolve_source(data, tracking_uri=tracking_uri)
    try:
        root = src.path.resolve()
        paths = [q.resolve() for q in src.files]
        label = source or src.display
        if src.format == "parquet" and not (len(paths) == 1 and paths[0].stat().st_size == 0):
            table: TableSource = ParquetSource(paths, root, label, src.name)
        elif src.format == "parquet":
            table = FrameSource(pd.DataFrame(), source=label, name=src.name)
            table.files = [_input_file(q, root) for q in paths]
        else:
            table = CsvSource(paths, root, label, src.name)
    except BaseException:
        src.cleanup()
        raise
    table.resolved = src
    table.start_hashing()
    return table


@dataclass
class DatasetRecord:
    """One entry of ``data_quality/datasets.json``: what was read, with its hashes."""

    role: str
    source: str
    name: str
    n_rows: int
    mlflow_digest: str | None
    files: list[InputFile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "source": self.source, "name": self.name, "n_rows": int(self.n_rows),
                "mlflow_digest": self.mlflow_digest, "sha256": files_sha256(self.files),
                "files": [f.to_dict() for f in sorted(self.files, key=lambda f: f.relative)]}
