"""Section 8: change log against the previous audited version of the same registered model, and
the explanation-drift comparison logged into the run (``sections.drift``) when there is one."""

from __future__ import annotations

from typing import Any

from governance.report.format import fnum, fpct, ftext, not_provided
from governance.report.inputs import ReportInputs
from governance.report.sections import drift


#: Explanation-quality metrics of the run: compared in the quality table, not listed here one by one.
QUALITY_METRIC_PREFIX = "governance_quality_"


def build(inp: ReportInputs) -> dict[str, Any]:
    """Rank shifts and metric changes against the previous audited version, and the drift
    comparison when one was logged into the run."""
    ev, features, top = inp.ev, inp.features, inp.opts.top_features
    m = ev.model
    prev = ev.previous
    comparison = drift.build(inp)
    if prev is None:
        reason = ("the model is not registered" if not m.name else
                  f"no earlier version of {m.name} is marked audited")
        return {"missing": not_provided(reason), "ranks": [], "metrics": [], "drift": comparison}
    out: dict[str, Any] = {"missing": None, "version": prev.version, "run_id": ftext(prev.run_id), "drift": comparison}
    if prev.global_importance and prev.global_importance.get("features"):
        before = {str(f["feature"]): f for f in prev.global_importance["features"]}
        now = {str(f["feature"]): f for f in features}
        names = [str(f["feature"]) for f in features[:top]]
        names += [n for n, f in sorted(before.items(), key=lambda kv: kv[1].get("rank", 0))[:top] if n not in names]
        ranks = []
        for n in names:
            b, a = before.get(n), now.get(n)
            shift = "new" if b is None else "removed" if a is None else (
                f"{int(b['rank']) - int(a['rank']):+d}" if b.get("rank") is not None and a.get("rank") is not None else "n/a")
            ranks.append({"feature": n, "before": fnum(b.get("rank")) if b else "absent",
                          "after": fnum(a.get("rank")) if a else "absent",
                          "shift": shift, "imp_before": fpct(b.get("importance")) if b else "n/a",
                          "imp_after": fpct(a.get("importance")) if a else "n/a"})
        out["ranks"] = ranks
        out["ranks_missing"] = None
    else:
        out["ranks"] = []
        out["ranks_missing"] = not_provided(f"version {prev.version} has no readable global_importance.json")
    metrics = []
    for source, b_all, a_all in (("training", prev.training_metrics, m.training_metrics),
                                 ("explanation", prev.run_metrics, ev.metrics)):
        for k in sorted(k for k in set(b_all) | set(a_all) if not k.startswith(QUALITY_METRIC_PREFIX)):
            b, a = b_all.get(k), a_all.get(k)
            delta = "n/a" if b is None or a is None else f"{a - b:+.4f}"
            metrics.append({"source": source, "name": k, "before": fnum(b, 4), "after": fnum(a, 4), "delta": delta})
    out["metrics"] = metrics
    out["metrics_missing"] = None if metrics else not_provided("neither version logged metrics")
    return out
