"""Section 7: risks, limitations and human oversight (configured) plus the automatic flags."""

from __future__ import annotations

from typing import Any

from governance.report.format import not_provided
from governance.report.inputs import ReportInputs


def build(inp: ReportInputs) -> dict[str, Any]:
    """What the configuration says, and every flag raised from the evidence."""
    opts, flags = inp.opts, inp.flags
    return {
        "risks": opts.risks, "risks_missing": None if opts.risks else not_provided("set report.risks"),
        "limitations": opts.limitations,
        "limitations_missing": None if opts.limitations else not_provided("set report.limitations"),
        "oversight": opts.human_oversight,
        "oversight_missing": None if opts.human_oversight else not_provided("set report.human_oversight"),
        "flags": flags,
        "flags_missing": None if flags else "No automatic flag was raised (gates, data contract, stability, "
                                            "confidence intervals, class support, bias absorption).",
    }
