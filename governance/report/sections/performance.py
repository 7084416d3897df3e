"""Section 4: performance (the metrics of the run that trained the model, overall and per class)."""

from __future__ import annotations

from typing import Any

from governance.report.format import fnum, ftext, not_provided
from governance.report.inputs import ReportInputs


def split_class_metric(name: str) -> tuple[str, str] | None:
    """(metric, class) for per-class metric names like ``precision_class_1``."""
    for marker in ("_class_", ".class_", "_label_", ".label_"):
        if marker in name:
            base, cls = name.split(marker, 1)
            if base and cls:
                return base, cls
    return None


def build(inp: ReportInputs) -> dict[str, Any]:
    """The model's own metrics, as its training run logged them (overall and per class)."""
    ev = inp.ev
    m = ev.model.training_metrics
    overall, per_class = [], {}
    for name, value in sorted(m.items()):
        split = split_class_metric(name)
        if split:
            per_class.setdefault(split[1], {})[split[0]] = value
        else:
            overall.append({"name": name, "value": fnum(value, 4)})
    class_metrics = sorted({k for d in per_class.values() for k in d})
    class_rows = [{"cls": c, "cells": [fnum(per_class[c].get(k), 4) for k in class_metrics]}
                  for c in sorted(per_class)]
    src = ev.model.source_run_id
    return {
        "source_run": ftext(src),
        "overall": overall,
        "overall_missing": None if overall else not_provided(
            "no metrics were logged by the run that trained the model" if src else
            "the model's training run is not known to this tracking store"),
        "class_metrics": class_metrics,
        "class_rows": class_rows,
        "class_missing": None if class_rows else not_provided(
            "no per-class metrics (names like precision_class_1) were logged"),
    }

