"""Section 3: data and data quality (datasets with their hashes, the data contract)."""

from __future__ import annotations

from typing import Any

from governance.report.format import fnum, ftext, not_provided
from governance.report.evidence import NOT_RECORDED
from governance.report.inputs import ReportInputs


def build(inp: ReportInputs) -> dict[str, Any]:
    """The validation and training datasets, and the great-expectations result."""
    ev = inp.ev
    datasets = [{"name": ftext(d.get("name")), "context": ftext(d.get("role") or d.get("context")),
                 "rows": fnum(d.get("rows")), "digest": ftext(d.get("digest")),
                 "sha256": d.get("sha256") or NOT_RECORDED, "recorded": bool(d.get("sha256")),
                 "source": ftext(d.get("recorded_source") or ((d.get("source") or {}).get("uri")
                                 if isinstance(d.get("source"), dict) else d.get("source")))}
                for d in ev.datasets]
    train = [{"name": ftext(d.get("name")), "context": ftext(d.get("context")), "rows": fnum(d.get("rows")),
              "digest": ftext(d.get("digest"))} for d in ev.model.training_datasets]
    return {"datasets": datasets,
            "datasets_missing": None if datasets else not_provided("no dataset was logged as an input of the run"),
            "sha_note": "SHA-256 over the sorted lines \"path\\0sha256\\n\" of each input's files, taken when "
                        "explain read the data (governance/data_quality/datasets.json); never recomputed by the "
                        "report. \"" + NOT_RECORDED + "\": the run predates that record.",
            "training": train,
            "training_missing": None if train else not_provided("the training run logged no dataset"),
            "validation": inp.validation}
