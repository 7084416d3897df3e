"""Part: the method (DLBacktrace, its modes, the parameters of this run)."""

from __future__ import annotations

from typing import Any

from governance.report.format import fnum, kv_rows
from governance.report.inputs import ReportInputs

MODE_TEXT = {
    "default": "Relevance is propagated backwards from the output through every layer in proportion "
    "to each input's contribution; magnitudes are kept, signs are not.",
    "contrastive": "Relevance is split into evidence for (R+) and against (R-) the predicted outcome; "
    "the reported relevance is R+ minus R-.",
    "signed": "One rule keeps the sign of every contribution, so inputs that push the output up and "
    "inputs that push it down cancel where they cancel inside the network.",
}


def build(inp: ReportInputs) -> dict[str, Any]:
    """Method rows and one sentence per mode."""
    gi, primary = inp.ev.global_importance, inp.primary
    return {
        "method_rows": kv_rows([("Method", "DLBacktrace (relevance propagation; rules in docs/relevance-rules.md of mlflow-governance)"),
                                ("Primary mode", primary),
                                ("Modes computed", sorted((gi.get("modes") or {}).keys()) or primary),
                                ("Multiplier (seed relevance)", fnum(inp.ev.config.get("multiplier"))),
                                ("Samples explained", fnum(gi.get("n_samples"))),
                                ("Normalisation", "each sample's relevance divided by its L1 norm")]),
        "mode_texts": [{"mode": k, "text": v, "primary": k == primary} for k, v in MODE_TEXT.items()],
    }
