"""Section 9: appendix (regulatory crosswalk, configuration, run tags, evidence files)."""

from __future__ import annotations

from typing import Any

from governance.report.crosswalk import COLUMNS, crosswalk_rows
from governance.report.format import ftext, kv_rows, not_provided
from governance.report.inputs import ReportInputs


def build(inp: ReportInputs) -> dict[str, Any]:
    """The crosswalk over the report's own headings, and what the report was made from."""
    ev = inp.ev
    return {
        "config": ev.config_text or not_provided("the run has no governance/config.yaml"),
        "files": [{"path": k, "sha256": v} for k, v in sorted(ev.input_files.items())],
        "crosswalk_columns": list(COLUMNS),
        "crosswalk": crosswalk_rows(inp.headings),
        "tags": kv_rows(sorted(ev.tags.items())),
        "previous_version": ftext(ev.previous.version if ev.previous else None),
    }
