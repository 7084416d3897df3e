"""The explanation stage on Apache Spark: the same core, run by executors, merged by the driver.

    explain_spark(model_uri_or_handle, "s3://bucket/validation/", config={"engine": "spark", ...})
    explain_spark(handle, spark.table("db.loans"))                    # any Spark DataFrame

The driver reads the data with Spark (a parquet file or folder, ``spark-table:db.table``, or a
DataFrame), checks the data contract with great-expectations on Spark
(``governance.stage.spark_contract``) and stops there when it fails: no executor explains
anything. Then each executor task loads the model once per Python worker process from its
MLflow URI (:func:`executor_model`, a module-global cache keyed by URI), explains its
partition's Arrow batches in ``mapInArrow`` with :func:`governance.stage.batch.explain_batch`,
folds them into a :class:`StageState` and returns the per-sample rows plus one row holding the
serialised state. The driver merges the states (in a fixed order, by the bytes' SHA-256), and
the documents, plots, quality metrics and MLflow logging are the single-machine path's own.

Sample ids are what make the result independent of partitioning: an ``id_column``'s values, or
else each row's position as the single-machine reader numbers it (files in path order, rows in
file order; Spark's ``_metadata.file_path`` / ``row_index``); a DataFrame not read from files is
numbered in its partition order, which the run notes. Per-sample outputs
(``local_relevance.parquet``, ``reason_codes.parquet``) are written by Spark as folders of
parquet files, logged under the same names; with ``spark.output_uri`` they stay where Spark
wrote them and ``explanations/sample_outputs.json`` records each file's SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from governance.data import DataLoadError, InputFile, TableSource, files_sha256, sha256_file
from governance.modality import get_modality
from governance.modality.base import ModalityPlan
from governance.stage.batch import Explainer, StageError, explain_batch, torch_threads
from governance.stage.runner import PROBE_ROWS
from governance.stage.state import StageSettings, StageState
from governance.stage.writers import reason_code_table, write_json

TABLE_PREFIX = "spark-table:"
#: The internal column with each row's position (never a user column: reserved prefix).
ROW_COLUMN = "__governance_row"
STATE_COLUMN = "__governance_state"
SAMPLE_OUTPUTS = "sample_outputs.json"

_MODELS: dict[str, Any] = {}


def executor_model(uri: str, device: str, allow_pickle: bool, tracking_uri: str | None,
                   registry_uri: str | None) -> Any:
    """The model at ``uri``, loaded once per Python worker process (cached by URI)."""
    if uri not in _MODELS:
        import mlflow

        from governance.tracking import load_model

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        _MODELS[uri] = load_model(uri, device=device, allow_pickle=allow_pickle).model
    return _MODELS[uri]


# ----------------------------------------------------------------------------- executors


@dataclass
class ExecutorTask:
    """What an executor needs to explain its partition (plain values, shipped with the task).

    ``tables``: the per-sample files by name with their Arrow schemas (decided on the driver from
    a probe batch); in the output each file's columns are ``t<i>_<j>`` and the state is one
    extra row with :data:`STATE_COLUMN` set."""

    model_uri: str
    allow_pickle: bool
    tracking_uri: str | None
    registry_uri: str | None
    config: dict[str, Any]
    plan: ModalityPlan
    settings: dict[str, Any]
    threshold: float | None
    tables: list[tuple[str, Any]]
    out_schema: Any
    row_column: str | None

    def __call__(self, batches: Iterator[Any]) -> Iterator[Any]:
        import gc

        import pyarrow as pa

        from governance.config import config_from_dict

        cfg = config_from_dict(self.config)
        modality = get_modality(cfg)
        model = executor_model(self.model_uri, cfg.device, self.allow_pickle, self.tracking_uri, self.registry_uri)
        explainer = Explainer.from_config(model, cfg)
        explainer.threshold = self.threshold
        state = StageState.empty(StageSettings.from_dict(self.settings), modality.accumulators())
        dictionary = cfg.reason_codes.dictionary or {}
        with torch_threads(cfg.cpu_threads or 1):
            for rb in batches:
                for start in range(0, rb.num_rows, cfg.batch_size):
                    frame = rb.slice(start, cfg.batch_size).to_pandas()
                    if self.row_column is not None:
                        frame.index = pd.Index(frame.pop(self.row_column).to_numpy(dtype=np.int64))
                    result = explain_batch(explainer, modality, self.plan, modality.input_batch(frame, self.plan))
                    state.update(result)
                    tables = dict(modality.sample_tables(result, self.plan))
                    tables["reason_codes.parquet"] = reason_code_table(result, dictionary)
                    arrays = []
                    for name, schema in self.tables:
                        arrays += tables[name].cast(schema).columns
                    arrays.append(pa.nulls(len(result), pa.binary()))
                    yield pa.RecordBatch.from_arrays([a.combine_chunks() if hasattr(a, "combine_chunks") else a
                                                      for a in arrays], schema=self.out_schema)
                    del result, tables, frame
                    gc.collect(1)
        last = [pa.nulls(1, f.type) for f in self.out_schema][:-1] + [pa.array([state.to_bytes()], pa.binary())]
        yield pa.RecordBatch.from_arrays(last, schema=self.out_schema)


# ----------------------------------------------------------------------------- the data


def spark_session(cfg: Any) -> tuple[Any, bool]:
    """The active Spark session, else a new one with ``spark.master`` and ``spark.conf``;
    returns (session, whether this call created it)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName("mlflow-governance")
    if cfg.spark.master:
        builder = builder.master(cfg.spark.master)
    for key, value in (cfg.spark.conf or {}).items():
        builder = builder.config(str(key), str(value).lower() if isinstance(value, bool) else str(value))
    return builder.getOrCreate(), True


def _is_spark_frame(data: Any) -> bool:
    return type(data).__module__.startswith("pyspark.sql") and hasattr(data, "mapInArrow")


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path)) if parsed.scheme else Path(uri)
    return None


class SparkTable(TableSource):
    """The input as a Spark DataFrame with each row's position in :data:`ROW_COLUMN` (when it
    can be known) and what the stage records of it (source, name, files and their hashes)."""

    def __init__(self, spark: Any, frame: Any, source: str, name: str, note: str | None = None) -> None:
        super().__init__(source, name)
        from governance.stage.spark_contract import schema_frame

        self.spark = spark
        self.note = note
        self.input_files = sorted(frame.inputFiles()) if hasattr(frame, "inputFiles") else []
        self._rows: int | None = None
        self.frame = self._with_positions(frame)
        self.data = self.frame.drop(ROW_COLUMN).drop("__index_level_0__")
        self._schema = schema_frame(self.data)
        self._hashed: list[InputFile] | None = None

    def _with_positions(self, frame: Any) -> Any:
        """``frame`` with the single-machine reader's row position of each row (see the module
        docstring); the partition order when the rows come from no file."""
        from pyspark.sql import functions as F

        try:
            if not self.input_files:
                raise LookupError("no input files")
            meta = frame.select("*", F.col("_metadata.file_path").alias("__f"), F.col("_metadata.row_index").alias("__r"))
            counts = meta.groupBy("__f").count().collect()
        except Exception:  # not a file scan: number the rows in partition order
            self.note = self.note or ("the Spark DataFrame was not read from files: sample ids are the rows' "
                                      "positions in its partition order; set id_column for ids that do not depend "
                                      "on how the DataFrame was built")
            return frame.withColumn("__p", F.spark_partition_id()).withColumn("__m", F.monotonically_increasing_id()) \
                .transform(self._partition_positions)
        offsets, total = [], 0
        for path, count in sorted(((r["__f"], r["count"]) for r in counts), key=lambda t: unquote(t[0])):
            offsets.append((path, total))
            total += int(count)
        self._rows = total
        table = self.spark.createDataFrame(offsets, "__f string, __o long")
        return meta.join(F.broadcast(table), "__f").withColumn(ROW_COLUMN, F.col("__o") + F.col("__r")) \
            .drop("__f", "__r", "__o")

    def _partition_positions(self, frame: Any) -> Any:
        from pyspark.sql import functions as F

        counts = sorted((int(r["__p"]), int(r["count"])) for r in frame.groupBy("__p").count().collect())
        offsets, total = [], 0
        for p, count in counts:
            offsets.append((p, total))
            total += count
        self._rows = total
        table = self.spark.createDataFrame(offsets, "__p int, __o long")
        # monotonically_increasing_id: the partition index in the upper 31 bits, the row within it below
        return frame.join(F.broadcast(table), "__p").withColumn(
            ROW_COLUMN, F.col("__o") + (F.col("__m") - F.shiftleft(F.col("__p").cast("long"), 33))) \
            .drop("__p", "__m", "__o")

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self._schema.columns]

    @property
    def n_rows(self) -> int:
        if self._rows is None:
            self._rows = int(self.data.count())
        return self._rows

    def schema_frame(self) -> pd.DataFrame:
        return self._schema

    def iter_frames(self, rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        raise NotImplementedError("a Spark table is read by the executors")

    def head(self, n: int) -> pd.DataFrame:
        """The first ``n`` rows by position, every column, indexed by position."""
        frame = self.frame.orderBy(ROW_COLUMN).limit(n).toPandas()
        frame.index = pd.Index(frame.pop(ROW_COLUMN).to_numpy(dtype=np.int64))
        return frame[self.columns]

    def file_hashes(self) -> list[InputFile]:
        """The input files with their SHA-256: hashed on the driver when it sees them, by the
        executors (Spark's ``binaryFile`` reader and ``sha2``) otherwise."""
        if self._hashed is None:
            self._hashed = hash_files(self.spark, self.input_files, root=_common_root(self.input_files))
        return self._hashed

    def check_unchanged(self) -> None:
        for f in self.file_hashes():
            local = _local_path(str(f.path))
            if local is not None and local.exists():
                st = local.stat()
                if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
                    raise DataLoadError(f"input file {local} changed while it was being read; run again on a "
                                        "stable copy of the data")


def _common_root(paths: list[str]) -> str:
    if not paths:
        return ""
    if len(paths) == 1:
        return paths[0].rsplit("/", 1)[0]
    return os.path.commonprefix(paths).rsplit("/", 1)[0]


def hash_files(spark: Any, uris: list[str], root: str) -> list[InputFile]:
    """SHA-256 and size of each file (``relative``: its path below ``root``)."""
    def relative(uri: str) -> str:
        return unquote(uri[len(root):].lstrip("/")) if root and uri.startswith(root) else uri

    local = [_local_path(u) for u in uris]
    out = []
    if all(p is not None and p.is_file() for p in local):
        for uri, p in zip(uris, local):
            st = p.stat()
            out.append(InputFile(path=p, relative=relative(uri), size=st.st_size, mtime_ns=st.st_mtime_ns,
                                 sha256=sha256_file(p)))
        return out
    from pyspark.sql import functions as F

    rows = spark.read.format("binaryFile").load(uris).select(
        "path", "length", F.sha2("content", 256).alias("sha"), "modificationTime").collect()
    for r in sorted(rows, key=lambda r: r["path"]):
        out.append(InputFile(path=Path(r["path"]), relative=relative(r["path"]), size=int(r["length"]),
                             mtime_ns=0, sha256=r["sha"]))
    return out


def read_table(spark: Any, data: Any) -> SparkTable:
    """A :class:`SparkTable` from a parquet path or folder (any Hadoop URI), ``spark-table:...``
    or a DataFrame."""
    if _is_spark_frame(data):
        return SparkTable(spark, data, source="<spark dataframe>", name="spark_dataframe")
    if isinstance(data, pd.DataFrame):
        raise StageError("engine spark reads a Spark DataFrame, a parquet path or spark-table:<db.table>; "
                         "give a pandas DataFrame to the local engine (engine: local)")
    ref = str(data)
    try:
        if ref.startswith(TABLE_PREFIX):
            name = ref[len(TABLE_PREFIX):]
            if not name:
                raise StageError(f"expected {TABLE_PREFIX}<db.table>, got '{ref}'")
            frame = spark.table(name)
            return SparkTable(spark, frame, source=ref, name=name.rsplit(".", 1)[-1])
        local = _local_path(ref)
        if local is not None:
            if not local.exists():
                raise DataLoadError(f"data file not found: {ref}")
            if local.is_file() and local.suffix.lower() not in (".parquet", ".pq"):
                raise StageError(f"engine spark reads parquet files and folders (or {TABLE_PREFIX}<db.table>); "
                                 f"'{ref}' is not parquet: convert it, or use engine: local")
            path = str(local.resolve())
        else:
            path = ref
        frame = spark.read.parquet(path)
    except Exception as exc:
        if isinstance(exc, (StageError, DataLoadError)):
            raise
        reason = str(getattr(exc, "desc", None) or exc).strip().splitlines()[0]
        raise DataLoadError(f"Spark could not read '{ref}': {reason}") from exc
    name = Path(ref.rstrip("/")).name
    for suffix in (".parquet", ".pq"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return SparkTable(spark, frame, source=ref, name=name or "data")


# ----------------------------------------------------------------------------- outputs


def _tidy_spark_folder(folder: Path) -> None:
    """A folder Spark just wrote into the staging area: drop its bookkeeping files (``_SUCCESS``,
    ``.crc``) and name the parts ``part-00000.parquet`` ... (Spark adds a random job id)."""
    for p in sorted(folder.iterdir()):
        if p.name.startswith(("_", ".")) or p.suffix == ".crc":
            p.unlink()
    for i, p in enumerate(sorted(folder.glob("part-*"))):
        p.rename(folder / f"part-{i:05d}.parquet")


def _exists(spark: Any, uri: str) -> bool:
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return bool(path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).exists(path))


def write_sample_outputs(spark: Any, rows: Any, tables: list[tuple[str, Any]], expl: Path,
                         output_uri: str | None) -> dict[str, Any] | None:
    """Write each per-sample file as a folder of parquet files: into ``expl`` (logged with the
    run), or under ``output_uri``; returns the record of the latter (None for the former)."""
    from pyspark.sql import functions as F

    record: dict[str, Any] = {"output_uri": output_uri, "outputs": []}
    for i, (name, schema) in enumerate(tables):
        cols = [F.col(f"t{i}_{j}").alias(f.name) for j, f in enumerate(schema)]
        dest = f"{output_uri.rstrip('/')}/{name}" if output_uri else str(expl / name)
        rows.select(*cols).write.mode("errorifexists").parquet(dest)
        if output_uri is None:
            _tidy_spark_folder(expl / name)
            continue
        parts = [u for u in _list_files(spark, dest) if u.endswith(".parquet")]
        files = hash_files(spark, parts, root=parts[0].rsplit("/", 1)[0] if parts else dest)
        record["outputs"].append({"name": name, "uri": dest, "sha256": files_sha256(files),
                                  "files": [f.to_dict() for f in sorted(files, key=lambda f: f.relative)]})
    return record if output_uri else None


def _list_files(spark: Any, uri: str) -> list[str]:
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return sorted(str(s.getPath().toString()) for s in fs.listStatus(path) if s.isFile())


# ----------------------------------------------------------------------------- the stage


@dataclass
class SparkExplained:
    """The merged state, the per-sample files' schemas and the Spark timings."""

    state: StageState
    tables: list[tuple[str, Any]]
    rows: Any
    timings: dict[str, float] = field(default_factory=dict)


def merge_states(blobs: list[bytes], extras: Any = None) -> StageState:
    """The partial states merged in a fixed order (by their bytes' SHA-256)."""
    ordered = sorted(blobs, key=lambda b: hashlib.sha256(b).digest())
    state = StageState.from_bytes(ordered[0], extras() if extras else None)
    for b in ordered[1:]:
        state.merge(StageState.from_bytes(b, extras() if extras else None))
    return state


def explain_partitions(table: SparkTable, handle: Any, cfg: Any, plan: ModalityPlan, settings: StageSettings,
                       modality: Any) -> SparkExplained:
    """Calibrate on the first rows, then explain every partition in ``mapInArrow``."""
    import mlflow
    import pyarrow as pa
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    t = time.perf_counter()
    read = list(plan.columns) + [ROW_COLUMN]
    probe_frame = table.frame.select(*[F.col(f"`{c}`") for c in read]).orderBy(ROW_COLUMN).limit(PROBE_ROWS) \
        .toPandas()
    probe_frame.index = pd.Index(probe_frame.pop(ROW_COLUMN).to_numpy(dtype=np.int64))
    explainer = Explainer.from_config(handle.model, cfg)
    probe = modality.input_batch(probe_frame, plan)
    with torch_threads(cfg.cpu_threads or 1):
        explainer.calibrate(modality, probe)
        result = explain_batch(explainer, modality, plan, probe)
    sample = dict(modality.sample_tables(result, plan))
    sample["reason_codes.parquet"] = reason_code_table(result, cfg.reason_codes.dictionary or {})
    tables = [(name, sample[name].schema) for name in sorted(sample)]
    fields = [pa.field(f"t{i}_{j}", f.type) for i, (_, s) in enumerate(tables) for j, f in enumerate(s)]
    out_schema = pa.schema(fields + [pa.field(STATE_COLUMN, pa.binary())])
    task = ExecutorTask(
        model_uri=handle.uri, allow_pickle=bool(getattr(handle, "allow_pickle", False)),
        tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri(), config=cfg.to_dict(),
        plan=plan, settings=settings.to_dict(), threshold=explainer.threshold, tables=tables,
        out_schema=out_schema, row_column=None if cfg.id_column else ROW_COLUMN)
    src = table.frame.select(*[F.col(f"`{c}`") for c in (plan.columns if cfg.id_column else read)])
    if cfg.spark.partitions:
        src = src.repartition(cfg.spark.partitions)
    rows = src.mapInArrow(task, from_arrow_schema(out_schema)).persist(StorageLevel.DISK_ONLY)
    blobs = [bytes(r[0]) for r in rows.where(F.col(STATE_COLUMN).isNotNull()).select(STATE_COLUMN).collect()]
    state = merge_states(blobs, modality.accumulators if modality.accumulators() else None)
    return SparkExplained(state=state, tables=tables, rows=rows.where(F.col(STATE_COLUMN).isNull()),
                          timings={"explain": time.perf_counter() - t})


def explain_spark(model: Any, data: Any, *, config: Any = None, run_id: str | None = None,
                  experiment_name: str | None = None, quiet: bool = False, log: bool = True,
                  ground_truth: Any = None, **overrides: Any) -> Any:
    """The explanation stage on Spark (module docstring); returns a
    :class:`governance.pipeline.StageResult` and logs the single-machine path's artifacts."""
    from governance import pipeline, tracking
    from governance.stage.runner import frozen_gc
    from governance.stage.spark_contract import SparkContractRun
    from governance.validation import ContractViolation

    t0 = time.perf_counter()
    cfg = pipeline._resolve_config(config, {**overrides, "engine": "spark"})
    handle = pipeline._resolve_model(model, cfg)
    if str(handle.uri).startswith("<"):
        raise StageError("engine spark loads the model on every executor from its MLflow URI; give a model URI "
                         "(models:/<name>/<version>, runs:/<id>/model) instead of an in-memory module")
    modality = get_modality(cfg)
    if not hasattr(modality, "input_batch"):
        raise StageError(f"engine spark explains tables; the {cfg.modality} modality runs on engine: local")
    spark, created = spark_session(cfg)
    table = read_table(spark, data)
    rid, made_run = None, False
    ok = False
    rows = None
    try:
        plan = modality.plan(table, handle)
        if table.note:
            plan.notes.append(table.note)
            print(f"note: {table.note}", file=sys.stderr)
        p = pipeline._decide(cfg, handle, modality, table, plan)
        cfg = p.cfg
        timings: dict[str, float] = {"load": time.perf_counter() - t0}
        if cfg.spark.output_uri:
            for name in ("local_relevance.parquet", "reason_codes.parquet"):
                dest = f"{cfg.spark.output_uri.rstrip('/')}/{name}"
                if _exists(spark, dest):
                    raise StageError(f"spark.output_uri: {dest} already exists; give a new location (the stage "
                                     "never overwrites earlier outputs)")
        t = time.perf_counter()
        with frozen_gc():
            outcome = SparkContractRun(table.data, table.n_rows, plan.expectations, source=table.source,
                                       name=table.name, contract_source=plan.contract_source,
                                       independent=plan.independent, notes=plan.notes).run()
        timings["contract"] = time.perf_counter() - t
        rid, made_run = pipeline._open_run(p, log, run_id, experiment_name, "governance-explain")
        with tracking.StagingArea() as first:
            digest = pipeline._log_validation(rid if log else None, p, outcome, first)
        if not outcome.success:
            raise ContractViolation(outcome)
        if rid is not None:
            tracking.set_tags(rid, {"engine": "spark"})

        k = max(cfg.aggregation.sample_size, cfg.quality.n_samples if cfg.quality.enabled else 0)
        settings = StageSettings.from_config(cfg, plan.units, sample_size=k)
        explained = explain_partitions(table, handle, cfg, plan, settings, modality)
        rows = explained.rows
        timings.update(explained.timings)
        state = explained.state
        with tracking.StagingArea() as stage:
            expl = stage.path(pipeline.EXPLANATIONS)
            expl.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            record = write_sample_outputs(spark, rows, explained.tables, expl, cfg.spark.output_uri)
            if record is not None:
                write_json(expl / SAMPLE_OUTPUTS, record)
            timings["write"] = time.perf_counter() - t
            table.check_unchanged()
            evidence = pipeline.write_evidence(p, state, expl, ground_truth, timings)
            t = time.perf_counter()
            if log:
                pipeline._log_explanation(rid, p, stage, evidence.docs.global_importance, evidence.metrics,
                                          evidence.gates, evidence.note, digest, state.n_samples)
            timings["logging"] = time.perf_counter() - t
        ok = True
        timings["total"] = time.perf_counter() - t0
        return evidence.result(rid, outcome, plan, timings)
    except BaseException:
        pipeline._mark_failed(rid)
        raise
    finally:
        if rows is not None:
            rows.unpersist()
        pipeline._release(rid, made_run, ok)
        if created:
            spark.stop()

