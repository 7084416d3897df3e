"""Parts: global importance, comparison of modes, per-feature distribution, per-class importance."""

from __future__ import annotations

from typing import Any

from governance.report import plots
from governance.report.format import fnum, fpct, not_provided
from governance.report.inputs import DIRECTION_NOT_RECORDED, ReportInputs, effect, shares


EFFECT_NOTE = ("Effect: how a feature's value relates to its signed relevance over the samples (Spearman \u03c1); "
               "raises: higher values push the explained output up; lowers: down; mixed: |\u03c1| < 0.1.")
EFFECT_NOTE_MISSING = ("Effect: direction not recorded (the explanation run predates the value-relevance "
                       "correlation); the sign of the mean signed share is not shown as a direction, since it is "
                       "near zero for any centred feature.")


def feature_rows(features: list[dict[str, Any]], top: int) -> list[dict[str, str]]:
    """Formatted rows of the global importance table (top ``top``)."""
    return [{"rank": fnum(f.get("rank")), "feature": str(f.get("feature")),
             "importance": fpct(f.get("importance")), "signed": fnum(f.get("signed")),
             "std": fnum(f.get("std")), "ci": f"{fpct(f.get('ci_low'))} to {fpct(f.get('ci_high'))}",
             "direction": effect(f)} for f in features[:top]]


def build_global(inp: ReportInputs) -> dict[str, Any]:
    """The top features' table and chart."""
    top = inp.features[: inp.opts.top_features]
    rows = feature_rows(inp.features, inp.opts.top_features)
    chart = plots.data_uri(plots.importance_chart(
        inp.top_names, [float(f.get("importance") or 0) for f in top],
        [float(f.get("ci_low", f.get("importance")) or 0) for f in top],
        [float(f.get("ci_high", f.get("importance")) or 0) for f in top]))
    recorded = any(r["direction"] != DIRECTION_NOT_RECORDED for r in rows)
    return {"features": rows, "n_features": fnum(len(inp.features)), "shown": fnum(len(rows)), "chart": chart,
            "effect_note": EFFECT_NOTE if recorded else EFFECT_NOTE_MISSING,
            "chart_alt": "Bar chart of global importance with 95% confidence intervals for the top "
                         f"{len(rows)} features"}


def modes_table(ev, features: list[str]) -> dict[str, Any]:
    """Rank of the primary mode's top features in every mode."""
    modes = ev.global_importance.get("modes") or {}
    names = sorted(modes, key=lambda m: (m != ev.global_importance.get("primary_mode"), m))
    if len(names) < 2:
        return {"missing": not_provided("only one mode was computed; there is nothing to compare"), "rows": []}
    lookup = {m: {str(f["feature"]): f for f in (modes[m] or {}).get("features", [])} for m in names}
    rows = []
    for feat in features:
        rows.append({"feature": feat, "cells": [
            f"{fnum(lookup[m][feat].get('rank'))} ({fpct(lookup[m][feat].get('importance'))})" if feat in lookup[m]
            else "n/a" for m in names]})
    tops = {m: [str(f["feature"]) for f in sorted((modes[m] or {}).get("features", []),
                                                   key=lambda f: f.get("rank", 0))[:5]] for m in names}
    primary = names[0]
    agree = [{"mode": m, "overlap": f"{len(set(tops[m]) & set(tops[primary]))} of {len(tops[primary])}"}
             for m in names[1:]]
    return {"missing": None, "modes": names, "rows": rows, "agreement": agree, "primary": primary}



def build_modes(inp: ReportInputs) -> dict[str, Any]:
    """Rank of the top ten features in every mode."""
    return {"modes": modes_table(inp.ev, inp.top_names[:10])}


def build_distribution(inp: ReportInputs) -> dict[str, Any]:
    """Quantiles and a strip chart of the per-sample signed shares of the top features."""
    ev = inp.ev
    dist, missing = shares(ev, inp.top_names[: inp.opts.distribution_features])
    distribution: dict[str, Any] = {"missing": missing and not_provided(missing), "rows": []}
    if dist is not None and len(dist.columns):
        qs = dist.quantile([0.05, 0.5, 0.95])
        distribution["rows"] = [{"feature": f, "p5": fnum(qs[f].iloc[0]), "median": fnum(qs[f].iloc[1]),
                                 "p95": fnum(qs[f].iloc[2]), "positive": fpct((dist[f] > 0).mean())}
                                for f in dist.columns]
        distribution["chart"] = plots.data_uri(plots.distribution_chart(
            list(dist.columns), [dist[f].to_numpy() for f in dist.columns]))
        total = (ev.local_relevance.attrs or {}).get("n_rows_total", len(dist))
        distribution["n"] = fnum(len(dist)) if total == len(dist) else \
            f"{len(dist):,} evenly spaced of {total:,}"
    return {"distribution": distribution}


def build_per_class(inp: ReportInputs) -> dict[str, Any]:
    """Importance per predicted class."""
    return {"per_class": inp.per_class}
