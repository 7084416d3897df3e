"""The data contract on a Spark DataFrame, checked by great-expectations' Spark data source.

The same contract, the same verdicts and the same messages as the single-machine
:class:`governance.validation.ContractRun`, whose planning and merging this reuses:

* the table schema (column set, ordered list, column count, column exists, expectations on a
  column the data lacks) and the row count are checked by GX exactly as on one machine, on a
  zero-row pandas frame with the data's column types (the pandas types pyarrow gives the Spark
  schema, which is what the parquet reader gives locally) and on a frame of ``n_rows`` rows
  with no columns;
* every other expectation is checked by GX's Spark execution engine on the whole DataFrame at
  once (its metrics are Spark aggregations run by the executors), ``BOOLEAN_ONLY`` first and
  ``SUMMARY`` for what fails, as a local table that fits one contract block is.

Two differences of Spark are bridged so the verdicts match: NaN is a value in Spark but a
missing value in pandas (NaN becomes null in float columns before the check, and float columns
are checked as doubles, as the local path widens them to float64), and GX on Spark knows column
types by Spark's type names (``DoubleType``), so each pandas type name of a type list gains its
Spark name. A failed type check reports the column's pandas type and counts its non-numeric
values with a Spark aggregation, as the local path does with pandas.
"""

from __future__ import annotations

import math

from typing import Any

import pandas as pd

from governance.data import TableSource
from governance.validation import (
    TYPE_TYPES,
    ContractRun,
    ValidationOutcome,
    _config_key,
    _for_validation,
    _gx_context,
    _no_batch_fingerprints,
    whole_frame_batch,
)

#: The Spark type that holds each pandas dtype named in a contract's type lists.
SPARK_TYPE_NAMES = {
    "bool": "BooleanType", "boolean": "BooleanType",
    "int8": "ByteType", "Int8": "ByteType", "uint8": "ShortType", "UInt8": "ShortType",
    "int16": "ShortType", "Int16": "ShortType", "uint16": "IntegerType", "UInt16": "IntegerType",
    "int32": "IntegerType", "Int32": "IntegerType", "uint32": "LongType", "UInt32": "LongType",
    "int64": "LongType", "Int64": "LongType", "uint64": "DecimalType", "UInt64": "DecimalType",
    "float16": "FloatType", "float32": "FloatType", "Float32": "FloatType",
    "float64": "DoubleType", "Float64": "DoubleType",
    "object": "StringType", "str": "StringType", "string": "StringType",
    "datetime64[ns]": "TimestampType", "datetime64[us]": "TimestampType",
}


def schema_frame(frame: Any) -> pd.DataFrame:
    """A zero-row pandas frame with the Spark DataFrame's columns, typed as pyarrow converts the
    Spark schema (the types the local parquet reader gives the same data)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(frame.schema)
    return schema.empty_table().to_pandas().reset_index(drop=True)


def for_contract(frame: Any) -> Any:
    """The DataFrame as the contract sees it: NaN as null and float columns as doubles (pandas
    semantics, see the module docstring)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, FloatType

    cols = []
    for f in frame.schema.fields:
        c = F.col(f"`{f.name}`")
        if isinstance(f.dataType, (FloatType, DoubleType)):
            c = F.when(F.isnan(c), F.lit(None)).otherwise(c.cast("double")).alias(f.name)
        cols.append(c)
    return frame.select(*cols)


def spark_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` as GX's Spark engine reads it: type lists also name the Spark types."""
    if spec["type"] not in TYPE_TYPES:
        return spec
    out = dict(spec)
    if "type_list" in spec and spec["type_list"] is not None:
        names = list(spec["type_list"])
        out["type_list"] = names + sorted({SPARK_TYPE_NAMES[t] for t in names if t in SPARK_TYPE_NAMES} - set(names))
    elif "type_" in spec:
        out["type_"] = SPARK_TYPE_NAMES.get(spec["type_"], spec["type_"])
    return out


_PLAIN_ARGS = {"type", "column", "mostly", "min_value", "max_value", "type_list", "value_set"}


def precheck(frame: Any, checks: list[Any]) -> dict[int, bool]:
    """Verdicts of the contract's plain column checks (numeric type, not null, a numeric range,
    with or without ``mostly``) from ONE Spark aggregation over the rows, by check index.

    GX on Spark runs a Spark job per metric (~0.2 s each on a busy 2-core machine: a minute for a
    78-feature contract); the verdict of these checks is a count, taken here with GX's own
    ``mostly`` rule. A check that passes needs nothing more (its result holds no counts, as a
    ``BOOLEAN_ONLY`` result does not); one that fails is evaluated by GX (``SUMMARY``) for its
    message. Any other expectation, or one with other arguments, is left to GX (absent here)."""
    from great_expectations.expectations.expectation import _mostly_success
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in frame.schema.fields}
    verdicts: dict[int, bool] = {}
    exprs, counted = [], []
    for c in checks:
        col = c.column
        if col not in fields or not set(c.spec) <= _PLAIN_ARGS:
            continue
        dtype = fields[col]
        if c.type == "expect_column_values_to_be_in_type_list" and c.spec.get("type_list"):
            known = tuple(getattr(T, t) for t in spark_spec(c.spec)["type_list"] if isinstance(getattr(T, t, None), type))
            if known and c.mostly >= 1.0:
                verdicts[c.index] = isinstance(dtype, known)
            continue
        ref = F.col(f"`{col}`")
        if c.type == "expect_column_values_to_not_be_in_set" and c.mostly >= 1.0 and c.spec.get("value_set") \
                and all(isinstance(v, float) and math.isinf(v) for v in c.spec["value_set"]):
            if not isinstance(dtype, T.NumericType):  # no text value equals an infinity (as in pandas)
                verdicts[c.index] = True
                continue
            exprs.append(F.sum(F.when(ref.isin(*[F.lit(v) for v in c.spec["value_set"]]), 1).otherwise(0)))
        elif c.type == "expect_column_values_to_not_be_null" and c.mostly >= 1.0:
            exprs.append(F.sum(F.when(ref.isNull(), 1).otherwise(0)))
        elif c.type == "expect_column_values_to_be_between" and isinstance(dtype, T.NumericType) and all(
                isinstance(c.spec.get(k), (int, float, type(None))) and not isinstance(c.spec.get(k), bool)
                for k in ("min_value", "max_value")):
            lo, hi = c.spec.get("min_value"), c.spec.get("max_value")
            out = F.lit(False)
            if lo is not None:
                out = out | (ref < F.lit(float(lo)))
            if hi is not None:
                out = out | (ref > F.lit(float(hi)))
            exprs.append(F.sum(F.when(ref.isNotNull() & out, 1).otherwise(0)))
            exprs.append(F.count(ref))
        else:
            continue
        counted.append(c)
    if not counted:
        return verdicts
    row = frame.agg(*exprs).collect()[0]
    i = 0
    for c in counted:
        unexpected = int(row[i] or 0)
        i += 1
        if c.type == "expect_column_values_to_be_between":
            nonnull = int(row[i] or 0)
            i += 1
            verdicts[c.index] = nonnull == 0 or bool(_mostly_success(nonnull, unexpected, c.mostly))
        else:
            verdicts[c.index] = unexpected == 0
    return verdicts


class SparkTableShape(TableSource):
    """What contract planning needs of a Spark DataFrame: its columns, types and row count."""

    columnar = True

    def __init__(self, frame: Any, n_rows: int, source: str, name: str) -> None:
        super().__init__(source, name)
        self.frame = frame
        self._rows = int(n_rows)
        self._schema = schema_frame(frame)

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self._schema.columns]

    @property
    def n_rows(self) -> int:
        return self._rows

    def schema_frame(self) -> pd.DataFrame:
        return self._schema

    def iter_frames(self, rows: int, columns: list[str] | None = None):
        raise NotImplementedError("a Spark table is checked on Spark, not read on the driver")


class SparkContractRun(ContractRun):
    """:class:`ContractRun` with the data checks evaluated by GX on Spark (module docstring).
    Runs in the caller's thread: on Spark nothing is explained until it has passed."""

    def __init__(self, frame: Any, n_rows: int, expectations: list[dict[str, Any]], *, source: str, name: str,
                 contract_source: str = "config", independent: bool = True, notes: list[str] | None = None) -> None:
        shape = SparkTableShape(frame, n_rows, source, name)
        # one block holding every row and column: each GX result on Spark is final
        budget = max(1, n_rows) * max(1, len(shape.columns))
        super().__init__(shape, expectations, contract_source=contract_source, cell_budget=budget,
                         independent=independent, notes=notes)
        self.frame = frame

    def run(self) -> ValidationOutcome:
        outcome = super().run()
        meta = outcome.gx_result.get("meta", {})
        meta["batch_spec"] = {"batch_data": "SparkDataFrame"}
        meta["blocks"] = {"engine": "spark", "n_blocks": 1}
        return outcome

    def _run_all(self) -> ValidationOutcome:
        gx, _ = _gx_context()

        pandas_batch = whole_frame_batch
        plan = self.plan
        n = self.table.n_rows
        schema = _for_validation(self.table.schema_frame())
        if plan.schema:
            self._final(gx, pandas_batch(schema), plan.schema)
        data = [c for _, cs in plan.groups for c in cs]
        if data and n == 0:
            self._final(gx, pandas_batch(schema), data)
        elif data:
            self.frame_for_contract = for_contract(self.frame)
            batch = whole_frame_batch(self.frame_for_contract, "spark")
            self._spark_checks(gx, batch, data)
            self.n_blocks = 1
        self.n_rows = n
        if plan.rows:
            self._final(gx, pandas_batch(pd.DataFrame(index=pd.RangeIndex(n))), plan.rows)
        return self._outcome_from_merged()

    def _spark_run(self, gx: Any, batch: Any, checks: list[Any], result_format: str) -> list[dict[str, Any]]:
        """GX's result documents for ``checks`` on Spark, each with the contract's own config."""
        from governance.validation import _suite

        if not checks:
            return []
        suite, keys = _suite(gx, [spark_spec(c.spec) for c in checks])
        with _no_batch_fingerprints():
            results = batch.validate(suite, result_format=result_format).results
        by_key = {_config_key(r.expectation_config.type, r.expectation_config.kwargs): r for r in results}
        out = []
        for c, k in zip(checks, keys):
            doc = by_key[k].to_json_dict()
            config = dict(doc.get("expectation_config") or {})
            config["kwargs"] = {**(config.get("kwargs") or {}), **{a: v for a, v in c.spec.items() if a != "type"}}
            doc["expectation_config"] = config
            out.append(doc)
        return out

    def _spark_checks(self, gx: Any, batch: Any, checks: list[Any]) -> None:
        verdicts = precheck(self.frame_for_contract, checks)
        failed = [c for c in checks if verdicts.get(c.index) is False]
        rest = [c for c in checks if c.index not in verdicts]
        for c in checks:
            if verdicts.get(c.index) is True:
                m = self._merged[c.index]
                m.config = m.config or {"type": c.type, "kwargs": {a: v for a, v in c.spec.items() if a != "type"}}
        for c, doc in zip(rest, self._spark_run(gx, batch, rest, "BOOLEAN_ONLY")):
            m = self._merged[c.index]
            m.config = m.config or doc["expectation_config"]
            if not doc.get("success"):
                failed.append(c)
        for c, doc in zip(failed, self._spark_run(gx, batch, failed, "SUMMARY")):
            m = self._merged[c.index]
            m.final = doc
            m.success = bool(doc.get("success"))
            if c.type in TYPE_TYPES and c.column in self.table.columns:
                m.type_scan = self._type_scan(c.column)
            self.failed_early.set()

    def _type_scan(self, column: str) -> tuple[str, int, list[str]]:
        """(pandas dtype, number of non-numeric values, up to three of them), as
        ``governance.validation._type_scan`` gives locally, counted by Spark."""
        from pyspark.sql import functions as F

        c = F.col(f"`{column}`")
        bad = self.frame.where(c.isNotNull() & c.try_cast("double").isNull())
        examples = [str(r[0]) for r in bad.select(c).limit(3).collect()]
        return str(self.table.schema_frame()[column].dtype), int(bad.count()), examples
