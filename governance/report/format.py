"""Formatting of report values: every number and text the templates print is made here."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

import numpy as np

from governance.report.options import NOT_PROVIDED


def is_missing(v: Any) -> bool:
    """None or a NaN float."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def fnum(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant decimals, or "n/a"."""
    if is_missing(v):
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and abs(x) < 10 ** (-digits):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}"


def fpct(v: Any, digits: int = 1) -> str:
    """A share as a percentage, or "n/a"."""
    if is_missing(v):
        return "n/a"
    return f"{100.0 * float(v):.{digits}f}%"


def breakable(name: str) -> str:
    """A label that may wrap after underscores (zero-width spaces), for narrow table headers."""
    return str(name).replace("_", "_\u200b")


def ftext(v: Any) -> str:
    """Text of any value; empty -> "not provided"."""
    if v is None or v == "" or v == [] or v == {}:
        return NOT_PROVIDED
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def kv_rows(pairs: Iterable[tuple[str, Any]]) -> list[dict[str, str]]:
    """Label/value rows for a key-value table."""
    return [{"label": k, "value": ftext(v)} for k, v in pairs]


def not_provided(reason: str) -> str:
    """The explicit "Not provided: <reason>" sentence."""
    return f"{NOT_PROVIDED.capitalize()}: {reason}"
