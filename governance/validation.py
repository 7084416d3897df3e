"""The data contract: great-expectations (GX Core 1.x) expectations checked before any explanation.

A contract is a list of plain expectation dicts, ``{"type": "expect_...", **kwargs}``. It comes
from the config (``expectations``), else it is derived from the training data (column set,
types, not-null, observed min/max), else from the validation data's own schema. Feature
columns must always be numeric and finite, so those checks are part of every contract.

The data is checked in *blocks* so memory stays flat in the number of rows: GX validates each
block and the per-block results are merged into one :class:`ValidationOutcome`. GX's cost is a
fixed price per expectation and call (building its metric graph: ~7 ms per expectation, 2.2 s for
the 314 expectations of a 78-feature contract) plus a cost per value, so blocks are made as *long*
as possible: all rows of a few columns each, as many columns per block as ``cell_budget`` cells
allow (a columnar source: parquet, a DataFrame); the fixed price is then paid once per
expectation, as for one whole-table call, and a table of up to ``cell_budget`` rows is checked
exactly as one whole-table run would (``BOOLEAN_ONLY``, then ``SUMMARY`` for what failed). Each
block gets a fresh GX context (its execution engine caches every metric it computed, masks
included, by column) and GX's per-batch data fingerprint is skipped (an md5 of the whole frame,
twice per call: half the time on large tables). A row-oriented source (CSV), or more rows than a
block holds, is checked in row ranges whose results merge:

* column map expectations (``expect_column_values_to_*``, column pair and multicolumn maps):
  element, missing and unexpected counts are summed, the first unexpected values and their row
  positions kept in row order, and ``mostly`` re-evaluated on the totals with GX's own rule;
  those without ``mostly`` are checked ``BOOLEAN_ONLY`` and re-run for counts only where a block
  fails (a pass there means zero unexpected values); for CSV, a column's type is inferred per
  chunk, so a type failure's message counts the non-numeric values exactly but GX's unexpected
  count covers only the chunks read as text;
* column min / max / sum / mean: the observed values are merged (min, max, sum, count-weighted
  mean) and the expectation is evaluated by GX on the merged value;
* anything else (uniqueness, medians, quantiles, distinct values) needs every row at once: it
  is allowed while all rows fit one row range and refused with a clear message otherwise.

Whatever the blocks, the table row count is evaluated by GX on the total number of rows (a frame
with no columns), and the table schema (column set, ordered list, column count, column exists)
and every expectation on a column the data lacks once on a zero-row frame with the data's
columns.

A failure that no later block can undo (a map expectation without ``mostly``, a type or schema
failure) sets :attr:`ContractRun.failed_early`, so the caller can stop explaining; the run still
checks every block, so the counts are those of the whole table.
"""

from __future__ import annotations

import gc
import math
import os
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import pandas as pd

from governance.config import ConfigError
from governance.data import FrameSource, TableSource
from governance.errors import ContractError

NUMERIC_TYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16",
    "UInt32", "UInt64", "Float32", "Float64", "boolean",
]
#: A feature value must not be one of these (with not-null: the value is finite). A set, not a
#: between-check with the float64 range: a contract shows no bounds that mean nothing.
NON_FINITE = [float("inf"), float("-inf")]
#: Cells (rows x columns) one contract block holds: 32 MB of float64.
DEFAULT_CELL_BUDGET = 4_000_000

ROW_COUNT_TYPES = {"expect_table_row_count_to_be_between", "expect_table_row_count_to_equal"}
SCHEMA_TYPES = {"expect_table_columns_to_match_set", "expect_table_columns_to_match_ordered_list",
                "expect_table_column_count_to_equal", "expect_table_column_count_to_be_between",
                "expect_column_to_exist"}
AGGREGATE_MERGE = {"expect_column_min_to_be_between": "min", "expect_column_max_to_be_between": "max",
                   "expect_column_sum_to_be_between": "sum", "expect_column_mean_to_be_between": "mean"}
TYPE_TYPES = {"expect_column_values_to_be_in_type_list", "expect_column_values_to_be_of_type"}
WHOLE_TABLE_METRICS = {"column_values.unique", "compound_columns.unique"}


class ContractViolation(ContractError):
    """The data broke its contract; ``outcome`` holds the full result and the failures."""

    def __init__(self, outcome: "ValidationOutcome") -> None:
        self.outcome = outcome
        super().__init__(outcome.message())


@dataclass
class Failure:
    """One failed expectation: its type, the column it checks, and what was observed."""

    expectation: str
    column: str | None
    detail: str

    def __str__(self) -> str:
        where = f" on column '{self.column}'" if self.column else ""
        return f"{self.expectation}{where}: {self.detail}"


@dataclass
class ValidationOutcome:
    """The result of checking one table against a contract."""

    success: bool
    contract_source: str
    expectations: list[dict[str, Any]]
    failures: list[Failure] = field(default_factory=list)
    gx_result: dict[str, Any] = field(default_factory=dict)
    n_rows: int = 0
    independent: bool = True
    notes: list[str] = field(default_factory=list)

    def message(self, shown: int = 5) -> str:
        """One line: the verdict, then the first ``shown`` failed expectations with their columns
        (every failure is in validation_result.json)."""
        if self.success:
            return f"data contract passed ({len(self.expectations)} expectations, {self.contract_source})"
        head = (f"data contract failed ({self.contract_source}): {len(self.failures)} of "
                f"{len(self.expectations)} expectations: ")
        text = "; ".join(" ".join(str(f).split()) for f in self.failures[:shown])
        more = len(self.failures) - shown
        tail = (f"; and {more} more" if more > 0 else "") + " (all in governance/data_quality/validation_result.json)"
        return head + text + tail

    def to_dict(self) -> dict[str, Any]:
        """The document logged as ``governance/data_quality/validation_result.json``."""
        return {
            "success": self.success,
            "contract_source": self.contract_source,
            "independent": self.independent,
            "notes": list(self.notes),
            "n_rows": self.n_rows,
            "n_expectations": len(self.expectations),
            "expectations": spell_infinities(self.expectations),
            "failures": [
                {"expectation": f.expectation, "column": f.column, "detail": f.detail}
                for f in self.failures
            ],
            "great_expectations": spell_infinities(self.gx_result),
        }


def _table_checks(columns: list[str]) -> list[dict[str, Any]]:
    return [
        {"type": "expect_table_row_count_to_be_between", "min_value": 1},
        {"type": "expect_table_columns_to_match_set", "column_set": list(columns), "exact_match": False},
    ]


def _column_checks(col: str) -> list[dict[str, Any]]:
    return [
        {"type": "expect_column_values_to_be_in_type_list", "column": col, "type_list": NUMERIC_TYPES},
        {"type": "expect_column_values_to_not_be_null", "column": col},
        {"type": "expect_column_values_to_not_be_in_set", "column": col, "value_set": list(NON_FINITE)},
    ]


def feature_checks(feature_columns: list[str]) -> list[dict[str, Any]]:
    """The checks every contract carries: rows exist, every feature column exists and is numeric,
    not null and not infinite."""
    out = _table_checks(feature_columns)
    for col in feature_columns:
        out += _column_checks(col)
    return out


def spell_infinities(obj: Any) -> Any:
    """``obj`` with float infinities as the strings ``"inf"`` / ``"-inf"`` (JSON has no infinity;
    written as null, the finiteness check's value set would read as "not null")."""
    if isinstance(obj, dict):
        return {k: spell_infinities(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [spell_infinities(v) for v in obj]
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    return obj


def derive_contract(
    reference: pd.DataFrame, feature_columns: list[str], *, margin: float = 0.5, mostly: float = 0.999
) -> list[dict[str, Any]]:
    """A contract derived from reference (training) data: the column set, and per feature the
    numeric type, not-null, finite, and the observed min/max widened by ``margin`` times the
    observed width on each side, which at least ``mostly`` of the values must respect. Rare new
    extremes (a count one above the training maximum) pass; a shifted or rescaled column fails."""
    out = feature_checks(feature_columns)
    for col in feature_columns:
        if col not in reference.columns:
            continue
        s = pd.to_numeric(reference[col], errors="coerce")
        lo, hi = float(s.min()), float(s.max())
        if math.isfinite(lo) and math.isfinite(hi):
            pad = max((hi - lo) * margin, 1e-9)
            out.append({"type": "expect_column_values_to_be_between", "column": col,
                        "min_value": lo - pad, "max_value": hi + pad, "mostly": mostly})
    return out


#: pandas tests membership in a small value set with numpy's ``==`` loop only for more than a
#: million values and takes a hash table below that (``pandas.core.algorithms.isin``), which is
#: ten times slower there: 30 against 3 ms per 1M-row column of ``not_be_in_set`` [inf, -inf], a
#: contract block's exact height. Both are pandas' own exact paths; this lowers its size cut.
ISIN_NUMPY_FROM = 10_000


def _fast_small_set_isin() -> None:
    import pandas.core.algorithms as algorithms

    if getattr(algorithms, "_MINIMUM_COMP_ARR_LEN", 0) > ISIN_NUMPY_FROM:
        algorithms._MINIMUM_COMP_ARR_LEN = ISIN_NUMPY_FROM


def _gx_context():
    import logging

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)  # GX pins this module's logger to INFO

    _fast_small_set_isin()
    ctx = gx.get_context(mode="ephemeral")
    # an ephemeral context "saves" its project config as YAML into an in-memory store that
    # nothing reads back; it does so on every datasource, asset and batch definition added,
    # which is 22 of the 32 ms each contract block spends making its batch
    ctx._save_project_config = lambda: None
    try:
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except Exception:  # pragma: no cover - older/newer GX without the setter
        pass
    return gx, ctx


def whole_frame_batch(frame: Any, engine: str = "pandas") -> Any:
    """A GX batch of the whole ``frame`` (``engine``: ``pandas`` or ``spark``) in a fresh
    ephemeral context (~45 ms): GX's execution engine caches every metric it computed (condition
    masks, indexes) by column, so with one engine a run over column groups would keep every
    block's masks alive."""
    _, ctx = _gx_context()
    source = getattr(ctx.data_sources, f"add_{engine}")("governance")
    return source.add_dataframe_asset("validation_data").add_batch_definition_whole_dataframe(
        "whole").get_batch(batch_parameters={"dataframe": frame})


def _detail(result: dict[str, Any]) -> str:
    """The failure's detail from a GX result in its JSON form."""
    info = result.get("exception_info") or {}
    raised = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    if info.get("raised_exception"):
        raised.append(info)
    if raised:
        return "could not be evaluated: " + str(raised[0].get("exception_message", "error"))
    r = result.get("result") or {}
    missing = (r.get("details") or {}).get("mismatched", {}).get("missing")
    if missing:
        return f"missing column(s) {sorted(missing)}"
    parts = []
    if "unexpected_count" in r:
        parts.append(f"{r['unexpected_count']} unexpected value(s) ({r.get('unexpected_percent') or 0:.3g}%)")
    if r.get("partial_unexpected_list"):
        parts.append(f"e.g. {r['partial_unexpected_list'][:3]}")
    if "observed_value" in r:
        parts.append(f"observed {r['observed_value']!r}")
    return ", ".join(parts) or "failed"


@contextmanager
def _no_batch_fingerprints() -> Iterator[None]:
    """GX's pandas engine fingerprints every batch it loads (an md5 over ``hash_pandas_object``
    of the whole frame, twice per ``validate``): half the contract's time on a large table, for a
    batch marker the outcome drops. Skipped while the contract runs (frames of any size count as
    "too large to hash", GX's own rule), restored after."""
    from great_expectations.execution_engine import pandas_execution_engine as engine

    before = engine.HASH_THRESHOLD
    engine.HASH_THRESHOLD = 0
    try:
        yield
    finally:
        engine.HASH_THRESHOLD = before


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Each block's GX temporaries (masks, filtered copies: several times the block) are freed in
    this thread's malloc arena, which keeps them: over many blocks that is a few hundred MB of
    RSS the process no longer uses. Trimming after each block keeps memory flat (~1 ms)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _raised(info: dict[str, Any]) -> bool:
    """Whether a GX ``exception_info`` (flat, or per metric) records a raised exception."""
    return bool(info.get("raised_exception")) or any(
        isinstance(v, dict) and v.get("raised_exception") for v in info.values())


def _for_validation(df: pd.DataFrame) -> pd.DataFrame:
    """Small floats widened to float64 (GX's vectorised range check only takes native floats)."""
    small = [c for c in df.columns if str(df[c].dtype) in ("float32", "float16")]
    if not small:
        return df
    return df.astype({c: "float64" for c in small})


def _suite(gx: Any, specs: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    """A GX suite of ``specs`` and each expectation's key (see :func:`_config_key`)."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    exps = [
        ExpectationConfiguration(type=s["type"], kwargs={k: v for k, v in s.items() if k != "type"}).to_domain_obj()
        for s in specs
    ]
    keys = [_config_key(e.configuration.type, e.configuration.kwargs) for e in exps]
    return gx.ExpectationSuite(name="governance_contract", expectations=exps), keys


def _type_scan(col: pd.Series) -> tuple[str, int, list[str]]:
    """(dtype, number of non-numeric values, up to three of them) of a column."""
    bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
    return str(col.dtype), int(len(bad)), [str(v) for v in bad.head(3)]


# ----------------------------------------------------------------------------- planning


@dataclass
class _Check:
    """One expectation of the contract and how its block results merge."""

    index: int
    spec: dict[str, Any]
    kind: str  # rows | schema | map | aggregate | whole
    columns: tuple[str, ...]
    mostly: float
    counted: bool  # evaluated with counts (SUMMARY) in every block

    @property
    def type(self) -> str:
        return self.spec["type"]

    @property
    def column(self) -> str | None:
        c = self.spec.get("column")
        return None if c is None else str(c)


def _config_key(etype: str, kwargs: dict[str, Any]) -> str:
    """Identifies an expectation by its type and arguments (GX adds ``batch_id``)."""
    import json

    args = {k: v for k, v in kwargs.items() if k not in ("type", "batch_id")}
    return etype + json.dumps(args, sort_keys=True, default=str)


def _columns_of(spec: dict[str, Any]) -> tuple[str, ...]:
    cols = [spec[k] for k in ("column", "column_A", "column_B") if k in spec]
    cols += list(spec.get("column_list") or [])
    return tuple(str(c) for c in cols)


def _classify(index: int, spec: dict[str, Any]) -> _Check:
    from great_expectations.expectations.expectation import (
        ColumnMapExpectation,
        ColumnPairMapExpectation,
        MulticolumnMapExpectation,
    )
    from great_expectations.expectations.registry import get_expectation_impl

    t = spec["type"]
    cols = _columns_of(spec)
    mostly = float(spec.get("mostly", 1.0) if spec.get("mostly") is not None else 1.0)
    if t in ROW_COUNT_TYPES:
        return _Check(index, spec, "rows", cols, mostly, False)
    if t in SCHEMA_TYPES:
        return _Check(index, spec, "schema", cols, mostly, False)
    if t in AGGREGATE_MERGE:
        return _Check(index, spec, "aggregate", cols, mostly, True)
    try:
        impl = get_expectation_impl(t)
    except Exception:  # an unknown type: GX reports it when the block is evaluated
        return _Check(index, spec, "whole", cols, mostly, True)
    if issubclass(impl, (ColumnMapExpectation, ColumnPairMapExpectation, MulticolumnMapExpectation)) \
            and getattr(impl, "map_metric", None) not in WHOLE_TABLE_METRICS:
        single = issubclass(impl, ColumnMapExpectation)
        return _Check(index, spec, "map", cols, mostly, counted=mostly < 1.0 or not single)
    return _Check(index, spec, "whole", cols, mostly, True)


@dataclass
class ContractPlan:
    """How a contract is checked on one table: which expectations run on the zero-row schema
    frame, on the total row count, and on which column groups in blocks of how many rows."""

    checks: list[_Check]
    schema: list[_Check]
    rows: list[_Check]
    groups: list[tuple[list[str], list[_Check]]]
    rows_per_block: int
    columnar: bool
    cell_budget: int
    n_rows: int | None

    @property
    def single_range(self) -> bool:
        """Every block covers all rows (a columnar table of at most ``cell_budget`` rows): each
        block's GX result is final, so nothing needs counts (``BOOLEAN_ONLY`` first, ``SUMMARY``
        only for what fails, as for one whole-table run)."""
        return self.columnar and self.n_rows is not None and self.n_rows <= self.rows_per_block


def plan_contract(expectations: list[dict[str, Any]], table: TableSource,
                  cell_budget: int = DEFAULT_CELL_BUDGET) -> ContractPlan:
    """Split the contract over blocks of at most ``cell_budget`` cells (see the module doc)."""
    checks = [_classify(i, dict(s)) for i, s in enumerate(expectations)]
    present = set(table.columns)
    schema = [c for c in checks if c.kind == "schema" or (c.kind != "rows" and not set(c.columns) <= present)]
    rows = [c for c in checks if c.kind == "rows"]
    data = [c for c in checks if c not in schema and c not in rows]
    # columns that must share a block (pair and multicolumn expectations) are clustered
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        while parent.setdefault(c, c) != c:
            c = parent[c]
        return c

    for c in data:
        for col in c.columns[1:]:
            parent[find(col)] = find(c.columns[0])
    used = [col for col in table.columns if any(col in c.columns for c in data)]
    clusters: dict[str, list[str]] = defaultdict(list)
    for col in used:
        clusters[find(col)].append(col)
    table_wide = [c for c in data if not c.columns]
    n = table.n_rows
    if table.columnar and n is not None:
        rows_per_block = max(1, min(n, cell_budget))
        width = max(1, cell_budget // rows_per_block)
    else:
        rows_per_block = max(1, cell_budget // max(1, len(used)))
        width = max(1, len(used))
    col_groups: list[list[str]] = []
    for cluster in clusters.values():
        if col_groups and len(col_groups[-1]) + len(cluster) <= width:
            col_groups[-1].extend(cluster)
        else:
            col_groups.append(list(cluster))
    if table_wide and not col_groups:
        col_groups.append([])
    groups = [(cols, [c for c in data if set(c.columns) <= set(cols) and (c.columns or i == 0)])
              for i, cols in enumerate(col_groups)]
    whole = [c for c in data if c.kind == "whole"]
    if whole and n is not None and n > rows_per_block:
        raise ContractPlanError(whole[0], n, cell_budget)
    return ContractPlan(checks, schema, rows, groups, rows_per_block, table.columnar and n is not None, cell_budget,
                        n)


class ContractPlanError(ConfigError):
    """An expectation needs every row at once and the table does not fit one block."""

    def __init__(self, check: _Check, n_rows: int | None, cell_budget: int) -> None:
        rows = f"{n_rows:,} rows" if n_rows is not None else "more rows than one block holds"
        super().__init__(
            f"expectation '{check.type}' needs every row at once (uniqueness, medians, quantiles, distinct "
            f"values) and the data ({rows}) does not fit one contract block of {cell_budget:,} cells; raise "
            "contract_block_cells in the configuration or drop that expectation")


# ----------------------------------------------------------------------------- running


@dataclass
class _Merged:
    """Everything the blocks said about one expectation."""

    config: dict[str, Any] | None = None
    success: bool = True
    exception: dict[str, Any] | None = None
    template: dict[str, Any] | None = None  # a SUMMARY result (its keys shape the merged one)
    element: int = 0
    missing: int = 0
    unexpected: int = 0
    values: list[Any] = field(default_factory=list)
    indices: list[Any] = field(default_factory=list)
    observed: list[tuple[Any, int]] = field(default_factory=list)  # (value, non-null count) per block
    final: dict[str, Any] | None = None  # a result taken as is (whole-table, schema, rows checks)
    failed_uncounted: dict[str, Any] | None = None  # a block's failure without counts (a column's type)
    type_scan: tuple[str, int, list[str]] | None = None


class ContractRun:
    """Checks one table against a contract block by block (see the module doc).

    ``run()`` returns the merged :class:`ValidationOutcome`; ``start()`` runs it in a background
    thread and ``result()`` waits for it. ``failed_early`` is set as soon as a failure no later
    block can undo is seen."""

    def __init__(self, table: TableSource, expectations: list[dict[str, Any]], *, contract_source: str = "config",
                 cell_budget: int = DEFAULT_CELL_BUDGET, independent: bool = True,
                 notes: list[str] | None = None) -> None:
        self.table = table
        self.expectations = [dict(e) for e in expectations]
        self.contract_source = contract_source
        self.independent = independent
        self.notes = list(notes or [])
        self.plan = plan_contract(self.expectations, table, cell_budget)
        self.failed_early = threading.Event()
        self._thread: threading.Thread | None = None
        self._outcome: ValidationOutcome | None = None
        self._error: BaseException | None = None
        self._merged = {c.index: _Merged() for c in self.plan.checks}
        self.n_rows = 0
        self.n_blocks = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0

    # -- threads -----------------------------------------------------------------------------
    def start(self) -> "ContractRun":
        def work() -> None:
            try:
                self._outcome = self.run()
            except BaseException as exc:  # re-raised by result()
                self._error = exc
                self.failed_early.set()

        self._thread = threading.Thread(target=work, name="governance-contract", daemon=True)
        self._thread.start()
        return self

    def result(self) -> ValidationOutcome:
        """The outcome (waits for the background run; re-raises its error)."""
        if self._thread is not None:
            self._thread.join()
        elif self._outcome is None:
            self._outcome = self.run()
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    # -- the checks ---------------------------------------------------------------------------
    def run(self) -> ValidationOutcome:
        """Check every block and merge (see the module doc); records its wall and CPU seconds."""
        import time

        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            with _no_batch_fingerprints():
                return self._run_all()
        finally:
            self.wall_s, self.cpu_s = time.perf_counter() - wall, time.thread_time() - cpu

    def _run_all(self) -> ValidationOutcome:
        gx, _ = _gx_context()

        batch = whole_frame_batch
        plan = self.plan
        schema_frame = _for_validation(self.table.schema_frame())
        if plan.schema:
            self._final(gx, batch(schema_frame), plan.schema)
        for frame, checks in self._blocks():
            self._block(gx, batch(_for_validation(frame)), frame, checks)
            self.n_blocks += 1
            del frame  # before the next block is read: one block in memory at a time
            gc.collect()  # the block's GX context holds it in reference cycles (fast under frozen_gc)
            _release_freed_memory()
        if self.n_blocks == 0:  # no rows: every data check on the zero-row frame, as GX would
            self._final(gx, batch(schema_frame), [c for _, cs in plan.groups for c in cs])
        n = self.table.n_rows
        if n is None:
            n = self.n_rows if plan.groups else sum(len(f) for f in self.table.iter_frames(1 << 16, []))
        self.n_rows = int(n)
        if plan.rows:
            self._final(gx, batch(pd.DataFrame(index=pd.RangeIndex(self.n_rows))), plan.rows)
        aggregates = [c for c in plan.checks if c.kind == "aggregate" and c not in plan.schema
                      and not plan.single_range]
        for c in aggregates:
            value = self._merged_aggregate(c)
            frame = pd.DataFrame({c.column: [value] if value is not None else []})
            self._final(gx, batch(frame), [c])
        return self._outcome_from_merged()

    def _blocks(self) -> Iterator[tuple[pd.DataFrame, list[_Check]]]:
        plan = self.plan
        if plan.columnar:
            n = self.table.n_rows or 0
            for cols, checks in plan.groups:
                for start in range(0, n, plan.rows_per_block):
                    yield self.table.read_columns(cols, start, min(n, start + plan.rows_per_block)), checks
            return
        cols = sorted({col for cs, _ in plan.groups for col in cs}, key=self.table.columns.index)
        checks = [c for _, cs in plan.groups for c in cs]
        whole = [c for c in checks if c.kind == "whole"]
        count = 0
        for i, frame in enumerate(self.table.iter_frames(plan.rows_per_block, cols)):
            if i == 1 and whole:
                raise ContractPlanError(whole[0], None, plan.cell_budget)
            count += len(frame)
            self.n_rows = count
            yield frame, checks

    def _run(self, gx: Any, batch: Any, checks: list[_Check], result_format: str) -> list[Any]:
        """GX's result for each check, in the order of ``checks`` (GX may reorder its results)."""
        if not checks:
            return []
        suite, keys = _suite(gx, [c.spec for c in checks])
        results = batch.validate(suite, result_format=result_format).results
        by_key = {_config_key(r.expectation_config.type, r.expectation_config.kwargs): r for r in results}
        return [by_key[k] for k in keys]

    def _final(self, gx: Any, batch: Any, checks: list[_Check]) -> None:
        """Checks evaluated once, on a frame that stands for the whole table."""
        for c, r in zip(checks, self._run(gx, batch, checks, "SUMMARY")):
            m = self._merged[c.index]
            doc = r.to_json_dict()
            m.config = m.config or doc["expectation_config"]
            m.final = doc
            m.success = bool(r.success)
            if not r.success and c.kind == "schema":
                self.failed_early.set()

    def _block(self, gx: Any, batch: Any, frame: pd.DataFrame, checks: list[_Check]) -> None:
        nulls = frame.isna().sum()
        if self.plan.single_range:
            self._whole_rows_block(gx, batch, frame, checks, nulls)
            return
        quick = [c for c in checks if not c.counted]
        failed: list[_Check] = []
        for c, r in zip(quick, self._run(gx, batch, quick, "BOOLEAN_ONLY")):
            m = self._merged[c.index]
            if m.config is None:
                m.config = r.to_json_dict()["expectation_config"]
            if r.success:
                m.element += len(frame)
                m.missing += int(nulls.get(c.column, 0)) if c.column else 0
            else:
                failed.append(c)
        summaries = list(zip(failed, self._run(gx, batch, failed, "SUMMARY")))
        counted = [c for c in checks if c.counted]
        summaries += list(zip(counted, self._run(gx, batch, counted, "SUMMARY")))
        for c, r in summaries:
            self._add_summary(c, r.to_json_dict(), frame, nulls)

    def _whole_rows_block(self, gx: Any, batch: Any, frame: pd.DataFrame, checks: list[_Check],
                          nulls: pd.Series) -> None:
        """A block holding every row of its columns: GX's results are final."""
        failed = []
        for c, r in zip(checks, self._run(gx, batch, checks, "BOOLEAN_ONLY")):
            m = self._merged[c.index]
            m.config = m.config or r.to_json_dict()["expectation_config"]
            if not r.success:
                failed.append(c)
        for c, r in zip(failed, self._run(gx, batch, failed, "SUMMARY")):
            doc = r.to_json_dict()
            self._add_summary(c, doc, frame, nulls)
            self._merged[c.index].final = doc
            self.failed_early.set()

    def _add_summary(self, c: _Check, doc: dict[str, Any], frame: pd.DataFrame, nulls: pd.Series) -> None:
        m = self._merged[c.index]
        m.config = m.config or doc["expectation_config"]
        info = doc.get("exception_info") or {}
        if _raised(info) and m.exception is None:
            m.exception = info
            self.failed_early.set()
        res = doc.get("result") or {}
        if not doc.get("success"):
            m.success = False
            if c.kind != "map" or c.mostly >= 1.0 or c.type in TYPE_TYPES:
                self.failed_early.set()
        if c.kind == "whole":
            m.final = doc
            return
        if c.kind == "aggregate":
            m.observed.append((res.get("observed_value"), len(frame) - int(nulls.get(c.column, 0))))
            return
        if c.type in TYPE_TYPES and c.column in frame.columns and not doc.get("success"):
            dtype, bad, examples = _type_scan(frame[c.column])
            if m.type_scan is None:
                m.type_scan = (dtype, bad, examples)
            else:
                m.type_scan = (m.type_scan[0], m.type_scan[1] + bad, (m.type_scan[2] + examples)[:3])
        if "unexpected_count" in res:
            m.template = m.template or res
            m.element += int(res.get("element_count") or 0)
            m.missing += int(res.get("missing_count") or 0) if "missing_count" in res else (
                int(nulls.get(c.column, 0)) if c.column else 0)
            m.unexpected += int(res.get("unexpected_count") or 0)
            m.values.extend(res.get("partial_unexpected_list") or [])
            m.indices.extend(res.get("partial_unexpected_index_list") or [])
        else:  # a type check reports the column's dtype, not counts, unless the column holds objects
            if not doc.get("success") and m.failed_uncounted is None:
                m.failed_uncounted = doc
            m.element += len(frame)
            m.missing += int(nulls.get(c.column, 0)) if c.column else 0

    def _merged_aggregate(self, c: _Check) -> Any:
        seen = [(v, k) for v, k in self._merged[c.index].observed if v is not None]
        if not seen:
            return None
        how = AGGREGATE_MERGE[c.type]
        values = [v for v, _ in seen]
        if how == "min":
            return min(values)
        if how == "max":
            return max(values)
        if how == "sum":
            return sum(values)
        total = sum(k for _, k in seen)
        return sum(v * k for v, k in seen) / total if total else None

    def _map_result(self, c: _Check, m: _Merged) -> tuple[bool, dict[str, Any]]:
        from great_expectations.expectations.expectation import _format_map_output, _mostly_success
        from great_expectations.expectations.expectation_configuration import parse_result_format

        with_missing = m.template is None or "missing_count" in m.template
        nonnull = m.element - m.missing if with_missing else None
        considered = m.element if nonnull is None else nonnull
        if m.element == 0 or considered == 0:
            success = True
        else:
            success = _mostly_success(considered, m.unexpected, c.mostly)
        result = _format_map_output(
            result_format=parse_result_format("SUMMARY"), success=success, element_count=m.element,
            nonnull_count=nonnull, unexpected_count=m.unexpected, unexpected_list=m.values[:20],
            unexpected_index_list=m.indices[:20] if m.indices else None)
        return success, result.get("result", {})

    def _outcome_from_merged(self) -> ValidationOutcome:
        results, failed_docs, failures = [], [], []
        for c in self.plan.checks:
            m = self._merged[c.index]
            config = m.config or {"type": c.type, "kwargs": {k: v for k, v in c.spec.items() if k != "type"}}
            info = m.exception or {"raised_exception": False, "exception_traceback": None, "exception_message": None}
            if m.final is not None:
                success, result, info = bool(m.final.get("success")), m.final.get("result") or {}, \
                    m.final.get("exception_info") or info
            elif m.exception is not None:
                success, result = False, {}
            elif m.failed_uncounted is not None:
                success, result = False, m.failed_uncounted.get("result") or {}
            elif m.success and not c.counted:
                success, result = True, {}
            else:
                success, result = self._map_result(c, m)
            entry = {"success": success, "expectation_config": config, "result": {}, "meta": {},
                     "exception_info": info}
            results.append(entry)
            if not success:
                full = dict(entry, result=result)
                failed_docs.append(full)
                detail = _detail(full)
                if m.type_scan is not None and not _raised(info or {}):
                    dtype, bad, examples = m.type_scan
                    example = f", non-numeric value(s) such as {examples}" if bad else ""
                    detail = f"column type '{dtype}' is not numeric{example} ({bad} row(s))"
                failures.append(Failure(expectation=c.type, column=c.column, detail=detail))
        failures.sort(key=lambda f: (str(f.column), f.expectation))
        ok = sum(r["success"] for r in results)
        success = ok == len(results)
        from great_expectations import __version__ as gx_version

        doc: dict[str, Any] = {
            "success": success,
            "suite_name": "governance_contract",
            "suite_parameters": {},
            "statistics": {"evaluated_expectations": len(results), "successful_expectations": ok,
                           "unsuccessful_expectations": len(results) - ok,
                           "success_percent": 100.0 * ok / len(results) if results else None},
            "meta": {"great_expectations_version": gx_version, "batch_spec": {"batch_data": "PandasDataFrame"},
                     "blocks": {"n_blocks": self.n_blocks, "rows_per_block": self.plan.rows_per_block,
                                "column_groups": len(self.plan.groups), "cell_budget": self.plan.cell_budget,
                                "columnar": self.plan.columnar}},
            "results": results,
        }
        if failed_docs:
            doc["failed_expectations"] = failed_docs
        return ValidationOutcome(success=success, contract_source=self.contract_source,
                                 expectations=self.expectations, failures=failures, gx_result=doc,
                                 n_rows=self.n_rows, independent=self.independent, notes=self.notes)


def validate_source(table: TableSource, expectations: list[dict[str, Any]], *, contract_source: str = "config",
                    cell_budget: int = DEFAULT_CELL_BUDGET, independent: bool = True,
                    notes: list[str] | None = None) -> ValidationOutcome:
    """Check a table (streamed in blocks) against ``expectations``; never raises on failure."""
    return ContractRun(table, expectations, contract_source=contract_source, cell_budget=cell_budget,
                       independent=independent, notes=notes).run()


def validate_table(
    df: pd.DataFrame, expectations: list[dict[str, Any]], *, contract_source: str = "config",
    cell_budget: int = DEFAULT_CELL_BUDGET,
) -> ValidationOutcome:
    """Check a DataFrame against ``expectations`` with great-expectations; never raises on failure."""
    return validate_source(FrameSource(df), expectations, contract_source=contract_source, cell_budget=cell_budget)
