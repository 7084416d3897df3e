"""Part: split-half stability of the global importance, and features with wide intervals."""

from __future__ import annotations

from typing import Any

from governance.report.inputs import ReportInputs


def build(inp: ReportInputs) -> dict[str, Any]:
    """The shared stability summary and the unstable features."""
    return {"stability": inp.stability, "unstable": inp.unstable}
