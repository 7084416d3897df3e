"""Part: limitations of the method (bias absorption and saturation figures from the layer ranking)."""

from __future__ import annotations

from typing import Any

from governance.report.inputs import ReportInputs


def build(inp: ReportInputs) -> dict[str, Any]:
    """Nothing of its own: the template reads the layer summary (``x.layers``)."""
    return {}
