"""The change log's explanation-drift block, from ``governance/drift/drift.json`` when ``compare``
logged one into the run (``governance.drift``): the verdict and why, the overall measures and
the units with the largest shifts. Printed by ``sections/drift.html.j2`` inside the change log."""

from __future__ import annotations

from typing import Any

from governance.report.format import fnum, fpct, ftext, not_provided
from governance.report.inputs import ReportInputs
from governance.report.plots import data_uri

#: Units listed: every flagged one, then the largest other shifts up to this many rows.
MAX_ROWS = 15
KINDS = {"runs": "two explain runs", "models": "two models on the same rows", "data": "one model on two data sets",
         "monitor": "a production batch against the audited explanation"}


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def _baseline_text(b: dict[str, Any]) -> str:
    parts = [f"run {b['run_id']}" if b.get("run_id") else None, b.get("model_uri"), b.get("data")]
    return ftext(", ".join(str(p) for p in parts if p) or b.get("label"))


def build(inp: ReportInputs) -> dict[str, Any] | None:
    """The drift verdict, overall measures and largest shifts; None when the run holds no
    comparison (the change log then prints nothing about drift: a report of a run without one
    is the same as before comparisons existed)."""
    d = inp.ev.drift
    if not d:
        return None
    if not isinstance(d.get("units"), list):
        return {"missing": not_provided("governance/drift/drift.json has no units: it was not written by "
                                        "`mlflow-governance compare`")}
    o = d.get("overall") or {}
    units = d["units"]
    flagged = [u for u in units if u.get("significant") or u.get("rank_shift") or u.get("direction_flip")]
    rest = [u for u in units if u not in flagged]
    chosen = (flagged + rest)[:max(MAX_ROWS, len(flagged))]
    rows = [{"unit": ftext(u["unit"]), "before": fpct(u.get("importance_before")), "after": fpct(u.get("importance_after")),
             "difference": fpct(u.get("difference"), 2),
             "interval": f"{fpct(u.get('ci_low'), 2)} .. {fpct(u.get('ci_high'), 2)}",
             "ranks": f"{fnum(u.get('rank_before'))} -> {fnum(u.get('rank_after'))}",
             "directions": f"{ftext(u.get('direction_before') or 'n/a')} -> {ftext(u.get('direction_after') or 'n/a')}",
             "significant": _yes(u.get("significant")), "rank_shift": _yes(u.get("rank_shift")),
             "direction_flip": _yes(u.get("direction_flip"))} for u in chosen]
    leaders = [{"side": ftext(x.get("side")), "before": ftext(x.get("before") or "none"),
                "after": ftext(x.get("after") or "none"), "changed": _yes(x.get("changed"))}
               for x in o.get("leaders") or []]
    layers = [{"module": ftext(x.get("module")), "before": fpct(x.get("share_before")), "after": fpct(x.get("share_after")),
               "shift": fpct(x.get("shift"), 2)} for x in (o.get("layer_shifts") or [])[:8]]
    trc = o.get("top_reason_changed")
    measures = [
        ("Compared", KINDS.get(str(d.get("kind")), ftext(d.get("kind")))),
        ("Baseline", _baseline_text(d.get("baseline") or {})),
        ("Intervals", f"{'paired' if d.get('paired') else 'unpaired'} {fpct(d.get('confidence'), 0)} bootstrap "
                      f"({fnum(d.get('n_bootstrap'))} replicates): {ftext(d.get('pairing'))}"),
        ("Spearman correlation of importance", fnum(o.get("spearman"))),
        ("Jensen-Shannon divergence", fnum(o.get("js_divergence"), 4)),
        (f"Top-{fnum(o.get('top_k'))} overlap", fpct(o.get("top_k_overlap"), 0)),
        ("Significant shifts (all units / top units)", f"{fnum(o.get('n_significant'))} / {fnum(o.get('n_significant_top'))}"),
        ("Largest layer-share shift", fpct(o.get("max_layer_shift"), 2)),
        ("Samples whose top reason changed", "not measured (unpaired)" if trc is None else
         f"{fpct(trc)} of {fnum(o.get('n_top_reason_samples'))}"),
    ]
    return {"missing": None, "verdict": str(d.get("verdict")), "reasons": [ftext(r) for r in d.get("reasons") or []],
            "measures": [{"label": k, "value": v} for k, v in measures], "rows": rows,
            "n_units": len(units), "n_flagged": len(flagged), "leaders": leaders, "layers": layers,
            "chart": data_uri(inp.ev.drift_plot) if inp.ev.drift_plot else None}
