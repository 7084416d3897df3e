"""The data contract: great-expectations (GX Core 1.x) expectations checked before any explanation.

A contract is a list of plain expectation dicts, ``{"type": "expect_...", **kwargs}``. It comes
from the config (``expectations``), else it is derived from the training data (column set,
types, not-null, observed min/max), else from the validation data's own schema. Feature
columns must always be numeric and finite, so those checks are part of every contract.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from governance.errors import ContractError

NUMERIC_TYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16",
    "UInt32", "UInt64", "Float32", "Float64", "boolean",
]
# Values outside the float64 range are +-inf: a between-check with these bounds means "finite".
FINITE_BOUND = 1.7976931348623157e308


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

    def message(self) -> str:
        """A human-readable summary naming every failed expectation and column."""
        if self.success:
            return f"data contract passed ({len(self.expectations)} expectations, {self.contract_source})"
        lines = [f"data contract failed: {len(self.failures)} of {len(self.expectations)} expectations"]
        lines += [f"  - {f}" for f in self.failures[:40]]
        if len(self.failures) > 40:
            lines.append(f"  ... and {len(self.failures) - 40} more (see validation_result.json)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The document logged as ``governance/data_quality/validation_result.json``."""
        return {
            "success": self.success,
            "contract_source": self.contract_source,
            "n_expectations": len(self.expectations),
            "expectations": self.expectations,
            "failures": [
                {"expectation": f.expectation, "column": f.column, "detail": f.detail}
                for f in self.failures
            ],
            "great_expectations": self.gx_result,
        }


def _table_checks(columns: list[str]) -> list[dict[str, Any]]:
    return [
        {"type": "expect_table_row_count_to_be_between", "min_value": 1},
        {"type": "expect_table_columns_to_match_set", "column_set": list(columns), "exact_match": False},
    ]


def _column_checks(col: str, low: float, high: float) -> list[dict[str, Any]]:
    return [
        {"type": "expect_column_values_to_be_in_type_list", "column": col, "type_list": NUMERIC_TYPES},
        {"type": "expect_column_values_to_not_be_null", "column": col},
        {"type": "expect_column_values_to_be_between", "column": col, "min_value": low, "max_value": high},
    ]


def feature_checks(feature_columns: list[str]) -> list[dict[str, Any]]:
    """The checks every contract carries: rows exist, every feature column exists and is numeric,
    not null and finite (a between-check with the float64 range)."""
    out = _table_checks(feature_columns)
    for col in feature_columns:
        out += _column_checks(col, -FINITE_BOUND, FINITE_BOUND)
    return out


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


def _gx_context():
    import logging

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)  # GX pins this module's logger to INFO

    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except Exception:  # pragma: no cover - older/newer GX without the setter
        pass
    return gx, ctx


def _detail(result: Any) -> str:
    info = result.exception_info or {}
    raised = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    if info.get("raised_exception"):
        raised.append(info)
    if raised:
        return "could not be evaluated: " + str(raised[0].get("exception_message", "error"))
    r = result.result or {}
    missing = (r.get("details") or {}).get("mismatched", {}).get("missing")
    if missing:
        return f"missing column(s) {sorted(missing)}"
    parts = []
    if "unexpected_count" in r:
        parts.append(f"{r['unexpected_count']} unexpected value(s) ({r.get('unexpected_percent', 0):.3g}%)")
    if r.get("partial_unexpected_list"):
        parts.append(f"e.g. {r['partial_unexpected_list'][:3]}")
    if "observed_value" in r:
        parts.append(f"observed {r['observed_value']!r}")
    return ", ".join(parts) or "failed"


def _for_validation(df: pd.DataFrame) -> pd.DataFrame:
    """Small floats widened to float64 (GX's vectorised range check only takes native floats)."""
    small = [c for c in df.columns if str(df[c].dtype) in ("float32", "float16")]
    if not small:
        return df
    return df.astype({c: "float64" for c in small})


def _run_suite(gx: Any, batch: Any, specs: list[dict[str, Any]], result_format: str) -> Any:
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    exps = [
        ExpectationConfiguration(type=s["type"], kwargs={k: v for k, v in s.items() if k != "type"}).to_domain_obj()
        for s in specs
    ]
    suite = gx.ExpectationSuite(name="governance_contract", expectations=exps)
    return batch.validate(suite, result_format=result_format)


def _spec_of(result: Any) -> dict[str, Any]:
    cfg = result.expectation_config
    return {"type": cfg.type, **{k: v for k, v in cfg.kwargs.items() if k != "batch_id"}}


def _type_detail(col: pd.Series) -> str:
    bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
    example = f", non-numeric value(s) such as {[str(v) for v in bad.head(3)]}" if len(bad) else ""
    return f"column type '{col.dtype}' is not numeric{example} ({len(bad)} row(s))"


def validate_table(
    df: pd.DataFrame, expectations: list[dict[str, Any]], *, contract_source: str = "config"
) -> ValidationOutcome:
    """Check ``df`` against ``expectations`` with great-expectations; never raises on failure.

    The whole suite runs once with ``BOOLEAN_ONLY`` results (GX's per-expectation cost is the
    bottleneck on wide tables); only when something fails are the failed expectations run again
    with ``SUMMARY`` results, whose counts and examples go into the messages and the document.
    """
    gx, ctx = _gx_context()
    batch_def = ctx.data_sources.add_pandas("governance").add_dataframe_asset(
        "validation_data").add_batch_definition_whole_dataframe("whole")
    batch = batch_def.get_batch(batch_parameters={"dataframe": _for_validation(df)})
    quick = _run_suite(gx, batch, expectations, "BOOLEAN_ONLY")
    doc = quick.to_json_dict()
    failures: list[Failure] = []
    if not quick.success:
        failed_specs = [_spec_of(r) for r in quick.results if not r.success]
        detailed = _run_suite(gx, batch, failed_specs, "SUMMARY")
        for r in detailed.results:
            if r.success:
                continue
            failures.append(Failure(
                expectation=r.expectation_config.type,
                column=r.expectation_config.kwargs.get("column"),
                detail=_detail(r),
            ))
        for f in failures:
            if f.expectation == "expect_column_values_to_be_in_type_list" and f.column in df.columns:
                f.detail = _type_detail(df[f.column])
        failures.sort(key=lambda f: (str(f.column), f.expectation))
        doc["failed_expectations"] = detailed.to_json_dict()["results"]
    doc.pop("id", None)
    return ValidationOutcome(
        success=bool(quick.success), contract_source=contract_source,
        expectations=expectations, failures=failures, gx_result=doc,
    )
