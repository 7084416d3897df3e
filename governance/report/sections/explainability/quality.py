"""Part: explanation-quality metrics per method, and the policy gates."""

from __future__ import annotations

from typing import Any

from governance.report.format import breakable, fnum, not_provided
from governance.report.inputs import ReportInputs
from governance.report.evidence import RunEvidence


def quality_table(ev: RunEvidence) -> dict[str, Any]:
    """Explanation-quality table: one row per metric, one column per method."""
    q = ev.quality
    if not q or not q.get("methods"):
        return {"missing": not_provided("the run has no explanations/quality.json (explanation-quality metrics)")}
    methods = sorted(q["methods"])
    metrics = sorted(set(q.get("metrics") or {}) | {k for v in q["methods"].values() for k in v})
    rows = []
    for name in metrics:
        meta = (q.get("metrics") or {}).get(name) or {}
        cells = []
        for m in methods:
            v = (q["methods"][m] or {}).get(name)
            cells.append(fnum(v) if v is None or isinstance(v, (int, float)) else "see evidence")
        rows.append({"metric": breakable(name), "direction": f"{meta.get('direction', 'n/a')} is better",
                     "cells": cells})
    return {"missing": None, "methods": [breakable(m) for m in methods], "rows": rows,
            "n_samples": fnum(q.get("n_samples")), "wide": len(methods) > 4}


def build(inp: ReportInputs) -> dict[str, Any]:
    """The quality table and the gates."""
    return {"quality": quality_table(inp.ev), "gates": inp.gates}
