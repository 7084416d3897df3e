"""Part: the layer ranking (share of relevance per module, bias and saturation figures)."""

from __future__ import annotations

from typing import Any

from governance.report.inputs import ReportInputs


def build(inp: ReportInputs) -> dict[str, Any]:
    """The shared layer summary."""
    return {"layers": inp.layers}
