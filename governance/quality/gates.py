"""Policy gates over a quality document (``quality_report``'s output).

A gate is a dict from the configuration::

    {"name": "primary beats random", "metric": "delta_auc", "method": "backtrace_signed",
     "op": ">", "threshold": "random"}

``method`` may be ``"primary"`` (the document's ``primary_method``). ``threshold`` is a number, or
the name of another method in the document (e.g. ``"random"``), whose value of the same metric is
then the threshold. A gate whose value (or threshold) is missing or not finite fails, with a
``reason``; a malformed gate raises ``ValueError`` (a configuration error, reported early).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne,
}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _metric_value(quality: dict, method: str, metric: str) -> Any:
    return quality.get("methods", {}).get(method, {}).get(metric)


def validate_gate(gate: dict) -> None:
    """Raise ``ValueError`` naming what is wrong with one gate's configuration."""
    if not isinstance(gate, dict):
        raise ValueError(f"a gate must be a mapping, got {type(gate).__name__}")
    missing = [k for k in ("metric", "method", "op", "threshold") if k not in gate]
    if missing:
        raise ValueError(f"gate {gate.get('name', gate)!r} lacks {', '.join(missing)}")
    if gate["op"] not in OPS:
        raise ValueError(f"gate {gate.get('name', '')!r}: op {gate['op']!r} is not one of {', '.join(OPS)}")
    thr = gate["threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float, str)):
        raise ValueError(f"gate {gate.get('name', '')!r}: threshold must be a number or a method name")


def evaluate_gates(quality: dict, gates: list[dict]) -> dict:
    """Evaluate every gate: ``{"passed": all passed, "gates": [{"name", "metric", "method",
    "op", "threshold", "value", "passed"} (+ "threshold_value", "reason")]}``."""
    results = []
    for gate in gates or []:
        validate_gate(gate)
        method = gate["method"]
        if method == "primary":
            method = quality.get("primary_method") or method
        metric, op, thr = gate["metric"], gate["op"], gate["threshold"]
        name = gate.get("name") or f"{method} {metric} {op} {thr}"
        value = _metric_value(quality, method, metric)
        reason = None
        if isinstance(thr, str):
            try:
                thr_value: Any = float(thr)
            except ValueError:
                if thr not in quality.get("methods", {}):
                    reason = f"threshold method {thr!r} is not in the quality document"
                thr_value = _metric_value(quality, thr, metric)
        else:
            thr_value = float(thr)
        if reason is None and method not in quality.get("methods", {}):
            err = quality.get("errors", {}).get(method)
            reason = f"method {method!r} has no results" + (f": {err}" if err else "")
        elif reason is None and not _finite(value):
            reason = f"metric {metric!r} is missing or undefined for {method!r}"
        elif reason is None and not _finite(thr_value):
            reason = f"threshold {thr!r} has no finite value for {metric!r}"
        passed = reason is None and bool(OPS[op](float(value), float(thr_value)))
        row = {"name": name, "metric": metric, "method": method, "op": op, "threshold": thr,
               "value": float(value) if _finite(value) else None, "passed": passed,
               "threshold_value": float(thr_value) if _finite(thr_value) else None}
        if reason is not None:
            row["reason"] = reason
        elif not passed:
            row["reason"] = f"{row['value']:.4g} {op} {row['threshold_value']:.4g} is false"
        results.append(row)
    return {"passed": all(r["passed"] for r in results), "gates": results}
