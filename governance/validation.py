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

NUMERIC_TYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16",
    "UInt32", "UInt64", "Float32", "Float64", "boolean",
]
# Values outside the float64 range are +-inf: a between-check with these bounds means "finite".
FINITE_BOUND = 1.7976931348623157e308


class ContractViolation(RuntimeError):
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
        lines += [f"  - {f}" for f in self.failures]
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


def feature_checks(feature_columns: list[str]) -> list[dict[str, Any]]:
    """The checks every contract carries: each feature exists, is numeric, not null, finite."""
    out: list[dict[str, Any]] = [{"type": "expect_table_row_count_to_be_between", "min_value": 1}]
    for col in feature_columns:
        out += [
            {"type": "expect_column_to_exist", "column": col},
            {"type": "expect_column_values_to_be_in_type_list", "column": col, "type_list": NUMERIC_TYPES},
            {"type": "expect_column_values_to_not_be_null", "column": col},
            {"type": "expect_column_values_to_be_between", "column": col,
             "min_value": -FINITE_BOUND, "max_value": FINITE_BOUND},
        ]
    return out


def derive_contract(
    reference: pd.DataFrame, feature_columns: list[str], *, mostly: float = 0.99, margin: float = 0.05
) -> list[dict[str, Any]]:
    """A contract derived from reference (training) data: column set, numeric types, not-null,
    finiteness, and the observed range widened by ``margin`` of its width (``mostly`` of values
    must fall inside, so a few new extremes do not fail the gate but a shift does)."""
    out = feature_checks(feature_columns)
    for col in feature_columns:
        if col not in reference.columns:
            continue
        s = pd.to_numeric(reference[col], errors="coerce")
        lo, hi = float(s.min()), float(s.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        pad = (hi - lo) * margin
        out.append({"type": "expect_column_values_to_be_between", "column": col,
                    "min_value": lo - pad, "max_value": hi + pad, "mostly": mostly})
    return out


def _gx_context():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

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
    parts = []
    if "unexpected_count" in r:
        parts.append(f"{r['unexpected_count']} unexpected value(s) ({r.get('unexpected_percent', 0):.3g}%)")
    if r.get("partial_unexpected_list"):
        parts.append(f"e.g. {r['partial_unexpected_list'][:3]}")
    if "observed_value" in r:
        parts.append(f"observed {r['observed_value']!r}")
    return ", ".join(parts) or "failed"


def validate_table(
    df: pd.DataFrame, expectations: list[dict[str, Any]], *, contract_source: str = "config"
) -> ValidationOutcome:
    """Check ``df`` against ``expectations`` with great-expectations; never raises on failure."""
    gx, ctx = _gx_context()
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    asset = ctx.data_sources.add_pandas("governance").add_dataframe_asset("validation_data")
    batch_def = asset.add_batch_definition_whole_dataframe("whole")
    suite = ctx.suites.add(gx.ExpectationSuite(name="governance_contract"))
    by_id: dict[str, dict[str, Any]] = {}
    for spec in expectations:
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        exp = suite.add_expectation(ExpectationConfiguration(type=spec["type"], kwargs=kwargs).to_domain_obj())
        by_id[str(exp.id)] = spec
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="governance_validation", data=batch_def, suite=suite)
    )
    res = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
    failures = []
    for r in res.results:
        if r.success:
            continue
        spec = by_id.get(str(r.expectation_config.id), {})
        failures.append(Failure(
            expectation=r.expectation_config.type,
            column=spec.get("column", r.expectation_config.kwargs.get("column")),
            detail=_detail(r),
        ))
    failures.sort(key=lambda f: (str(f.column), f.expectation))
    doc = res.to_json_dict()
    doc.pop("id", None)
    return ValidationOutcome(
        success=bool(res.success), contract_source=contract_source,
        expectations=expectations, failures=failures, gx_result=doc,
    )
