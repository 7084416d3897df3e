"""Turn :class:`RunEvidence` into the template context: every number formatted here.

Templates never compute: they loop over rows and print strings prepared by this module. Where
the run has no data for a part of a section, the context says so explicitly ("not provided"
plus the reason), never leaves it blank.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from governance import __version__
from governance.archive import package_versions
from governance.report import plots
from governance.report.crosswalk import COLUMNS as CROSSWALK_COLUMNS
from governance.report.crosswalk import crosswalk_rows
from governance.report.evidence import RunEvidence
from governance.report.options import NOT_PROVIDED, ReportError, ReportOptions, parse_report_options

SECTIONS = [
    ("cover", "Cover and control block"),
    ("system", "System description"),
    ("data", "Data and data quality"),
    ("performance", "Performance"),
    ("explainability", "Explainability"),
    ("decisions", "Individual decisions"),
    ("risks", "Risks, limitations and human oversight"),
    ("changes", "Change log"),
    ("appendix", "Appendix"),
]

MODE_TEXT = {
    "default": "Relevance is propagated backwards from the output through every layer in proportion "
    "to each input's contribution; magnitudes are kept, signs are not.",
    "contrastive": "Relevance is split into evidence for (R+) and against (R-) the predicted outcome; "
    "the reported relevance is R+ minus R-.",
    "signed": "One rule keeps the sign of every contribution, so inputs that push the output up and "
    "inputs that push it down cancel where they cancel inside the network.",
}


# ----------------------------------------------------------------------------- formatting


def is_missing(v: Any) -> bool:
    """None or a NaN float."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def fnum(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant decimals, or "n/a"."""
    if is_missing(v):
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and abs(x) < 10 ** (-digits):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}"


def fpct(v: Any, digits: int = 1) -> str:
    """A share as a percentage, or "n/a"."""
    if is_missing(v):
        return "n/a"
    return f"{100.0 * float(v):.{digits}f}%"


def breakable(name: str) -> str:
    """A label that may wrap after underscores (zero-width spaces), for narrow table headers."""
    return str(name).replace("_", "_\u200b")


def ftext(v: Any) -> str:
    """Text of any value; empty -> "not provided"."""
    if v is None or v == "" or v == [] or v == {}:
        return NOT_PROVIDED
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _rows(pairs: Iterable[tuple[str, Any]]) -> list[dict[str, str]]:
    """Label/value rows for a key-value table."""
    return [{"label": k, "value": ftext(v)} for k, v in pairs]


def _missing(reason: str) -> str:
    """The explicit "Not provided: <reason>" sentence."""
    return f"{NOT_PROVIDED.capitalize()}: {reason}"


# ----------------------------------------------------------------------------- sections


def _feature_rows(features: list[dict[str, Any]], top: int) -> list[dict[str, str]]:
    """Formatted rows of the global importance table (top ``top``)."""
    out = []
    for f in features[:top]:
        signed = f.get("signed")
        direction = "n/a" if is_missing(signed) else ("raises the output" if signed > 0 else
                                                       "lowers the output" if signed < 0 else "neutral")
        out.append({
            "rank": fnum(f.get("rank")), "feature": str(f.get("feature")),
            "importance": fpct(f.get("importance")), "signed": fnum(signed),
            "std": fnum(f.get("std")),
            "ci": f"{fpct(f.get('ci_low'))} to {fpct(f.get('ci_high'))}",
            "direction": direction,
        })
    return out


def _shares(ev: RunEvidence, features: list[str]) -> tuple[pd.DataFrame | None, str | None]:
    """Per-sample L1-normalised signed shares for ``features`` from local_relevance.parquet."""
    df = ev.local_relevance
    if df is None:
        return None, "the run has no explanations/local_relevance.parquet"
    all_features = [str(f["feature"]) for f in ev.global_importance["features"]]
    cols = {}
    for f in all_features:
        for cand in (f, f"relevance_{f}", f"relevance.{f}", f"r_{f}"):
            if cand in df.columns:
                cols[f] = cand
                break
    if not cols:
        return None, "local_relevance.parquet has no column per feature"
    rel = df[[cols[f] for f in all_features if f in cols]].to_numpy(dtype=float)
    if "relevance_l1" in df.columns:  # the stored norm over every feature (only some are read)
        l1 = df["relevance_l1"].to_numpy(dtype=float)[:, None]
    else:
        l1 = np.abs(rel).sum(axis=1, keepdims=True)
    share = rel / np.where(l1 > 0, l1, 1.0)
    out = pd.DataFrame(share, columns=[f for f in all_features if f in cols])
    return out[[f for f in features if f in out.columns]], None


def _id_column(df: pd.DataFrame) -> str | None:
    """The sample-id column of a per-sample table, if any."""
    for c in ("sample_id", "id", "sample", "row", "index"):
        if c in df.columns:
            return c
    return None


def _pred_column(df: pd.DataFrame) -> str | None:
    """The prediction column of a per-sample table, if any."""
    for c in ("prediction", "predicted", "predicted_class", "pred", "label"):
        if c in df.columns:
            return c
    return None


def _reason_list(row: pd.Series, side: str) -> list[tuple[str, str, str | None]]:
    """(feature, share, text) of one side ("supporting" / "adverse") of a reason-codes row.

    The explanation stage writes numbered slots ``<side>_k``, ``<side>_k_share`` and
    ``<side>_k_text`` (empty slots are None / NaN); a list column ``<side>`` of names or of
    ``{feature, share}`` objects is accepted too.
    """
    out: list[tuple[str, str, str | None]] = []
    numbered = sorted((c for c in row.index if str(c).startswith(f"{side}_") and str(c)[len(side) + 1:].isdigit()),
                      key=lambda c: int(str(c)[len(side) + 1:]))
    if numbered:
        for c in numbered:
            v = row[c]
            if v is None or is_missing(v) or str(v) == "":
                continue
            share = row.get(f"{c}_share")
            text = row.get(f"{c}_text")
            out.append((str(v), "" if share is None or is_missing(share) else fpct(share),
                        None if text is None or is_missing(text) else str(text)))
        return out
    if side in row.index:
        v = row[side]
        if v is None or is_missing(v):
            return []
        for it in (list(v) if not isinstance(v, str) else [v]):
            if isinstance(it, dict):
                val = it.get("share", it.get("relevance"))
                out.append((str(it.get("feature")), "" if is_missing(val) else fpct(val), it.get("text")))
            else:
                out.append((str(it), "", None))
    return out


def _leaders(ev: RunEvidence, dictionary: dict[str, str], top: int = 8) -> list[dict[str, str]]:
    """Features that most often lead the reason codes (global_importance.json reason_code_leaders)."""
    doc = ev.global_importance.get("reason_code_leaders") or {}
    n = ev.global_importance.get("n_samples") or 0
    sides = {}
    for side in ("supporting", "adverse"):
        counts = doc.get(side) or {}
        sides[side] = sorted(((str(k), int(v)) for k, v in counts.items()), key=lambda kv: (-kv[1], kv[0]))[:top]
    rows = []
    for i in range(max((len(v) for v in sides.values()), default=0)):
        row = {}
        for side, items in sides.items():
            if i < len(items):
                f, c = items[i]
                row[side] = f"{f} ({dictionary[f]})" if f in dictionary else f
                row[f"{side}_n"] = f"{c:,}" + (f" ({100.0 * c / n:.1f}%)" if n else "")
            else:
                row[side], row[f"{side}_n"] = "", ""
        rows.append(row)
    return rows


def _decisions(ev: RunEvidence, opts: ReportOptions, dictionary: dict[str, str]) -> dict[str, Any]:
    """Section 6: the configured sample of decisions with their reason codes."""
    rc = ev.reason_codes
    cfg = opts.sample_decisions
    dict_rows = [{"feature": k, "text": v} for k, v in sorted(dictionary.items())]
    base = {"dictionary": dict_rows, "leaders": _leaders(ev, dictionary),
            "dictionary_missing": None if dict_rows else _missing(
                "no plain-language dictionary in the configuration (reason_codes.dictionary); "
                "reasons are shown by feature name")}
    if rc is None or rc.empty:
        return dict(base, rows=[], selection=None, undefined=[],
                    missing=_missing("the run has no explanations/reason_codes.parquet"))
    idc, pc = _id_column(rc), _pred_column(rc)
    df = rc.copy()
    if idc is None:
        df["_id"] = np.arange(len(df))
        idc = "_id"
    df = df.sort_values(idc, kind="stable")
    if cfg.select == "adverse":
        if pc is None:
            return dict(base, rows=[], selection=None, undefined=[],
                        missing=_missing("reason_codes.parquet has no prediction column to select adverse decisions"))
        wanted = {str(v) for v in cfg.adverse_predictions}
        sel = df[df[pc].astype(str).isin(wanted)]
        what = (f"adverse decisions (prediction in {', '.join(sorted(wanted))}): "
                f"{len(sel):,} of {len(df):,}; the first {min(cfg.n, len(sel)):,} by sample id are shown")
    elif cfg.select == "ids":
        wanted = {str(v) for v in cfg.ids}
        sel = df[df[idc].astype(str).isin(wanted)]
        what = f"the configured sample ids ({len(sel):,} of {len(wanted):,} found)"
    elif cfg.select == "all":
        sel = df
        what = f"all decisions ({len(df):,}); the first {min(cfg.n, len(df)):,} by sample id are shown"
    else:
        sel = df
        what = f"the first {min(cfg.n, len(df)):,} decisions by sample id (of {len(df):,})"
    rows = []
    undefined: set[str] = set()
    for _, r in sel.head(cfg.n).iterrows():
        sides = {}
        for side in ("supporting", "adverse"):
            items = []
            for feat, share, given in _reason_list(r, side):
                text = dictionary.get(feat) or (given if given and given != feat else None)
                if text is None:
                    undefined.add(feat)
                items.append({"feature": feat, "text": text or "no plain-language text configured",
                              "value": share})
            sides[side] = items
        rows.append({"id": ftext(r[idc]), "prediction": ftext(r[pc]) if pc else "n/a",
                     "adverse": sides["adverse"], "supporting": sides["supporting"]})
    note = None if rows else _missing(f"no decision matched the selection ({what})")
    return dict(base, rows=rows, selection=what, missing=note,
                undefined=sorted(undefined), n_total=fnum(len(df)))


def stability_value(st: dict[str, Any] | None) -> float | None:
    """The primary mode's split-half rank correlation from stability.json (None if absent)."""
    st = st or {}
    for key in ("stability", "spearman", "rank_correlation"):
        v = st.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _param_text(value: Any) -> str:
    """A short text for an expectation parameter (long lists summarised)."""
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} values]" if len(value) > 6 else "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _validation(ev: RunEvidence, max_rows: int = 40) -> dict[str, Any]:
    """The data-contract section: summary, expectations by type, failures, and every row when few.

    Accepts the explanation stage's wrapper (``success``, ``contract_source``, ``failures``,
    ``great_expectations``: the GX result) or a bare GX ``to_json_dict`` result.
    """
    doc = ev.validation
    if not doc:
        return {"missing": _missing("the run has no data_quality/validation_result.json"), "rows": [], "by_type": [],
                "failures": []}
    v = doc.get("great_expectations") if isinstance(doc.get("great_expectations"), dict) else doc
    rows = []
    by_type: dict[str, dict[str, Any]] = {}
    for r in v.get("results", []) or []:
        ec = r.get("expectation_config") or {}
        kwargs = dict(ec.get("kwargs") or {})
        etype = str(ec.get("type") or ec.get("expectation_type") or "unknown")
        column = kwargs.pop("column", None) or "table"
        kwargs.pop("batch_id", None)
        res = r.get("result") or {}
        observed = res.get("observed_value")
        ok = bool(r.get("success"))
        t = by_type.setdefault(etype, {"n": 0, "passed": 0, "columns": set()})
        t["n"] += 1
        t["passed"] += ok
        t["columns"].add(str(column))
        rows.append({
            "expectation": etype, "column": str(column),
            "parameters": ", ".join(f"{k}={_param_text(kwargs[k])}" for k in sorted(kwargs)) or "none",
            "success": "pass" if ok else "FAIL", "failed": not ok,
            "unexpected": fnum(res.get("unexpected_count")) if "unexpected_count" in res else "n/a",
            "observed": _param_text(observed) if observed is not None else "n/a",
        })
    failures = [{"expectation": str(f.get("expectation")), "column": str(f.get("column") or "table"),
                 "detail": str(f.get("detail") or "")} for f in doc.get("failures", []) or []]
    if not failures:
        failures = [{"expectation": r["expectation"], "column": r["column"],
                     "detail": f"unexpected {r['unexpected']}, observed {r['observed']}"} for r in rows if r["failed"]]
    stats = v.get("statistics") or {}
    success = doc.get("success", v.get("success"))
    return {
        "missing": None,
        "success": "passed" if success else "FAILED",
        "failed": not success,
        "suite": ftext(v.get("suite_name") or (v.get("meta") or {}).get("expectation_suite_name")),
        "source": ftext(doc.get("contract_source")),
        "stats": _rows([
            ("Contract derived from", doc.get("contract_source")),
            ("Expectations evaluated", fnum(stats.get("evaluated_expectations", doc.get("n_expectations")))),
            ("Successful", fnum(stats.get("successful_expectations"))),
            ("Unsuccessful", fnum(stats.get("unsuccessful_expectations", len(failures)))),
            ("Success rate", "n/a" if stats.get("success_percent") is None else f"{float(stats['success_percent']):.1f}%"),
        ]),
        "by_type": [{"type": k, "n": fnum(t["n"]), "passed": fnum(t["passed"]), "failed": fnum(t["n"] - t["passed"]),
                     "columns": fnum(len(t["columns"])), "alert": t["n"] != t["passed"]}
                    for k, t in sorted(by_type.items())],
        "failures": failures,
        "rows": rows if len(rows) <= max_rows else [],
        "rows_note": None if len(rows) <= max_rows else (
            f"{len(rows):,} expectations: the full list is in governance/data_quality/validation_result.json "
            "(listed in the manifest and attached to the PDF)."),
    }


_PER_CLASS = ("_class_", ".class_", "_class", "_label_")


def _split_class_metric(name: str) -> tuple[str, str] | None:
    """(metric, class) for per-class metric names like ``precision_class_1``."""
    for marker in ("_class_", ".class_", "_label_", ".label_"):
        if marker in name:
            base, cls = name.split(marker, 1)
            if base and cls:
                return base, cls
    return None


def _performance(ev: RunEvidence) -> dict[str, Any]:
    """Section 4: training-run metrics (overall and per class) and the explanation run's metrics."""
    m = ev.model.training_metrics
    overall, per_class = [], {}
    for name, value in sorted(m.items()):
        split = _split_class_metric(name)
        if split:
            per_class.setdefault(split[1], {})[split[0]] = value
        else:
            overall.append({"name": name, "value": fnum(value, 4)})
    class_metrics = sorted({k for d in per_class.values() for k in d})
    class_rows = [{"cls": c, "cells": [fnum(per_class[c].get(k), 4) for k in class_metrics]}
                  for c in sorted(per_class)]
    gov = [{"name": k, "value": fnum(v, 4)} for k, v in ev.metrics.items()]
    src = ev.model.source_run_id
    return {
        "source_run": ftext(src),
        "overall": overall,
        "overall_missing": None if overall else _missing(
            "no metrics were logged by the run that trained the model" if src else
            "the model's training run is not known to this tracking store"),
        "class_metrics": class_metrics,
        "class_rows": class_rows,
        "class_missing": None if class_rows else _missing(
            "no per-class metrics (names like precision_class_1) were logged"),
        "explanation_metrics": gov,
        "explanation_missing": None if gov else _missing("the explanation run logged no metrics"),
    }


def _quality(ev: RunEvidence) -> dict[str, Any]:
    """Explanation-quality table: one row per metric, one column per method."""
    q = ev.quality
    if not q or not q.get("methods"):
        return {"missing": _missing("the run has no explanations/quality.json (explanation-quality metrics)")}
    methods = sorted(q["methods"])
    metrics = sorted(set(q.get("metrics") or {}) | {k for v in q["methods"].values() for k in v})
    rows = []
    for name in metrics:
        meta = (q.get("metrics") or {}).get(name) or {}
        cells = []
        for m in methods:
            v = (q["methods"][m] or {}).get(name)
            cells.append(fnum(v) if v is None or isinstance(v, (int, float)) else "see evidence")
        rows.append({"metric": breakable(name), "direction": f"{meta.get('direction', 'n/a')} is better",
                     "cells": cells})
    return {"missing": None, "methods": [breakable(m) for m in methods], "rows": rows,
            "n_samples": fnum(q.get("n_samples")), "wide": len(methods) > 4}


def _gates(ev: RunEvidence) -> dict[str, Any]:
    """Policy gates from gates.json and the run tag."""
    g = ev.gates
    tag = ev.tags.get("governance.gates_passed")
    if not g:
        status = {"true": "passed", "false": "FAILED"}.get(tag or "", NOT_PROVIDED)
        return {"missing": _missing("the run has no explanations/gates.json"), "status": status,
                "passed": tag == "true", "rows": []}
    rows = []
    for x in g.get("gates", []):
        rule = f"{x.get('op', '')} {fnum(x.get('threshold'))}"
        if x.get("threshold_value") is not None and isinstance(x.get("threshold"), str):
            rule += f" ({fnum(x.get('threshold_value'))})"
        result = "pass" if x.get("passed") else "FAIL" + (f": {x['reason']}" if x.get("reason") else "")
        rows.append({"name": ftext(x.get("name")), "metric": ftext(x.get("metric")), "method": ftext(x.get("method")),
                     "rule": rule, "value": fnum(x.get("value")), "passed": result, "failed": not x.get("passed")})
    if g.get("error"):
        rows.append({"name": "evaluation", "metric": "n/a", "method": "n/a", "rule": "n/a", "value": "n/a",
                     "passed": f"FAIL: {g['error']}", "failed": True})
    passed = bool(g.get("passed")) and tag != "false"
    return {"missing": None if rows else _missing("no policy gates were configured"),
            "status": "passed" if passed else "FAILED", "passed": passed, "rows": rows}


LAYER_EXTRA = (("bias_share", "bias-absorbed share"), ("saturation_rerouted", "saturation rerouted"),
               ("branch_share", "branch share"))


def _layers(ev: RunEvidence, top: int) -> dict[str, Any]:
    """Layer ranking table, chart and bias/saturation figures."""
    lr = ev.layer_ranking
    layers = [x for x in (lr or {}).get("layers", []) if isinstance(x, dict)]
    if not layers:
        return {"missing": _missing("the run has no explanations/layer_ranking.json"), "rows": []}
    layers = sorted(layers, key=lambda x: (x.get("rank") is None, x.get("rank", 0)))
    extras = [(k, label) for k, label in LAYER_EXTRA if any(not is_missing(x.get(k)) for x in layers)]
    rows = []
    for x in layers[:top]:
        units = x.get("top_units") or []
        unit_txt = ", ".join(
            f"{u.get('unit')} ({fnum(u.get('mean_relevance', u.get('relevance')))})" if isinstance(u, dict) else str(u)
            for u in units[:5]
        ) or "n/a"
        rows.append({"rank": fnum(x.get("rank")), "module": ftext(x.get("module")), "type": ftext(x.get("type")),
                     "share": fpct(x.get("share")), "extras": [fpct(x.get(k)) for k, _ in extras],
                     "units": unit_txt})
    chart = plots.data_uri(plots.layer_chart([str(x.get("module")) for x in layers[:top]],
                                             [float(x.get("share") or 0.0) for x in layers[:top]]))
    bias = [float(x["bias_share"]) for x in layers if not is_missing(x.get("bias_share"))]
    sat = [float(x["saturation_rerouted"]) for x in layers if not is_missing(x.get("saturation_rerouted"))]
    return {"missing": None, "rows": rows, "extra_labels": [label for _, label in extras], "chart": chart,
            "n_layers": fnum(len(layers)), "shown": fnum(min(top, len(layers))),
            "bias_max": fpct(max(bias)) if bias else None, "bias_mean": fpct(float(np.mean(bias))) if bias else None,
            "bias_max_raw": max(bias) if bias else 0.0,
            "saturation_max": fpct(max(sat)) if sat else None}


def _modes(ev: RunEvidence, features: list[str]) -> dict[str, Any]:
    """Rank of the primary mode's top features in every mode."""
    modes = ev.global_importance.get("modes") or {}
    names = sorted(modes, key=lambda m: (m != ev.global_importance.get("primary_mode"), m))
    if len(names) < 2:
        return {"missing": _missing("only one mode was computed; there is nothing to compare"), "rows": []}
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


def _per_class(ev: RunEvidence, shares: pd.DataFrame | None, features: list[str]) -> dict[str, Any]:
    """Importance per predicted class (from global_importance.json, else local relevance)."""
    by_class = ev.global_importance.get("by_class")
    if isinstance(by_class, dict) and by_class:
        classes = sorted(by_class, key=str)
        lookup = {c: {str(f["feature"]): f for f in (by_class[c] or {}).get("features", [])} for c in classes}
        counts = {str(c): int((by_class[c] or {}).get("n_samples") or 0) for c in classes}
        rows = [{"feature": feat, "cells": [
            f"{fpct(lookup[c][feat].get('importance'))} (rank {fnum(lookup[c][feat].get('rank'))})"
            if feat in lookup[c] else "n/a" for c in classes]} for feat in features]
        return {"missing": None, "classes": [f"{c} (n={counts[str(c)]:,})" for c in classes], "rows": rows,
                "counts": counts, "wide": len(classes) > 4}
    df = ev.local_relevance
    if shares is None or df is None or _pred_column(df) is None:
        return {"missing": _missing("local relevance with a prediction column is needed for per-class importance"),
                "rows": []}
    pred = df[_pred_column(df)].astype(str).to_numpy()
    classes = sorted(set(pred))
    if len(classes) > 20:
        return {"missing": _missing(f"{len(classes)} distinct predictions (regression?); per-class view omitted"),
                "rows": []}
    rows = []
    counts = {c: int((pred == c).sum()) for c in classes}
    for feat in features:
        vals = np.abs(shares[feat].to_numpy())
        rows.append({"feature": feat, "cells": [fpct(vals[pred == c].mean()) for c in classes]})
    return {"missing": None, "classes": [f"{c} (n={counts[c]:,})" for c in classes], "rows": rows,
            "counts": counts, "wide": len(classes) > 4}


def _examples(ev: RunEvidence) -> dict[str, Any]:
    """Heatmaps of example images and token highlights of example texts."""
    out: dict[str, Any] = {"images": [], "texts": []}
    im = ev.image_examples
    if im is not None:
        x, r = np.asarray(im["inputs"]), np.asarray(im["relevance"])
        labels = im.get("predictions", im.get("labels"))
        ids = im.get("ids")
        for i in range(min(6, len(x))):
            title = f"relevance, prediction {labels[i]}" if labels is not None else "relevance"
            out["images"].append({
                "id": str(ids[i]) if ids is not None else str(i),
                "src": plots.data_uri(plots.heatmap(x[i], r[i], title)),
                "alt": f"Input image {ids[i] if ids is not None else i} and its relevance heatmap",
            })
    if ev.text_examples:
        for i, ex in enumerate(ev.text_examples[:6]):
            toks, rel = list(ex.get("tokens") or []), [float(v) for v in (ex.get("relevance") or [])]
            bound = max((abs(v) for v in rel), default=0.0) or 1.0
            spans = []
            if len(toks) != len(rel):
                raise ReportError(f"examples/texts.json entry {i}: {len(toks)} tokens but {len(rel)} relevance values")
            for t, v in zip(toks, rel, strict=True):
                a = min(abs(v) / bound, 1.0) * 0.85
                color = (192, 80, 77) if v > 0 else (31, 78, 121)
                spans.append({"token": str(t), "style": f"background-color: rgba({color[0]}, {color[1]}, "
                              f"{color[2]}, {a:.3f})", "title": f"relevance {fnum(v)}"})
            out["texts"].append({"id": ftext(ex.get("id", i)), "prediction": ftext(ex.get("prediction")),
                                 "spans": spans})
    out["images_missing"] = None if out["images"] else _missing(
        "the run logged no example images with relevance (explanations/examples/images.npz)")
    out["texts_missing"] = None if out["texts"] else _missing(
        "the run logged no example texts with token relevance (explanations/examples/texts.json)")
    return out


def _flags(ev: RunEvidence, opts: ReportOptions, gates: dict, layers: dict, per_class: dict,
           validation: dict, unstable: list[str]) -> list[dict[str, str]]:
    """Automatic risk flags: failed gates or contract, instability, wide CIs, thin classes, bias."""
    flags = []
    if gates.get("status") == "FAILED":
        failed = [r["name"] for r in gates.get("rows", []) if r.get("failed")]
        flags.append({"severity": "high", "text": "Policy gate(s) failed" + (f": {', '.join(failed)}" if failed else "")
                      + ". The model must not be approved on this evidence."})
    if validation.get("failed"):
        flags.append({"severity": "high", "text": "The data contract (great-expectations) did not pass."})
    st = stability_value(ev.stability)
    if st is not None and not math.isnan(st) and st < 0.8:
        flags.append({"severity": "medium", "text": f"Global importance is unstable between random halves of the "
                      f"data (rank correlation {fnum(st)} < 0.800)."})
    if unstable:
        flags.append({"severity": "medium", "text": f"{len(unstable)} feature(s) have a 95% CI wider than "
                      f"{fnum(opts.unstable_ci_ratio, 2)} x their importance: {', '.join(unstable[:10])}"
                      + (" ..." if len(unstable) > 10 else "") + "."})
    for cls, n in sorted((per_class.get("counts") or {}).items()):
        if n < opts.min_class_support:
            flags.append({"severity": "medium", "text": f"Predicted class {cls} has only {n:,} samples "
                          f"(< {opts.min_class_support:,}); its explanations rest on little data."})
    if layers.get("bias_max_raw", 0.0) > 0.2:
        flags.append({"severity": "low", "text": f"Up to {layers['bias_max']} of the relevance at a layer is "
                      "absorbed by bias terms and is not attributed to any input."})
    return flags


def _signoff(ev: RunEvidence, opts: ReportOptions) -> dict[str, Any]:
    """Required sign-off roles and the approvals recorded so far."""
    recorded = []
    for e in ev.approvals:
        recorded.append({"role": ftext(e.get("role")), "name": ftext(e.get("approver")),
                         "decision": ftext(e.get("decision")), "date": ftext(e.get("date")),
                         "comment": ftext(e.get("comment")) if e.get("comment") else ""})
    return {"roles": opts.signoff_roles, "recorded": recorded,
            "recorded_missing": None if recorded else _missing(
                "no sign-off has been recorded yet (`mlflow-governance approve`)")}


def report_id(ev: RunEvidence) -> str:
    """A stable id: hash of the run, the model and every input file's hash."""
    basis = json.dumps({"run": ev.run_id, "model": ev.model.model_id, "model_sha256": ev.model.artifact_sha256,
                        "inputs": ev.input_files}, sort_keys=True)
    return "GR-" + hashlib.sha256(basis.encode()).hexdigest()[:12].upper()


def manifest_inputs(ev: RunEvidence) -> dict[str, Any]:
    """The ``inputs`` block of the manifest and of the evidence attachment."""
    return {
        "run_id": ev.run_id,
        "model_uri": ev.model.uri,
        "model_id": ev.model.model_id,
        "model_name": ev.model.name,
        "model_version": ev.model.version,
        "model_sha256": ev.model.artifact_sha256,
        "dataset_digest": ev.tags.get("governance.dataset_digest") or (ev.datasets[0]["digest"] if ev.datasets else None),
        "datasets": [{k: d.get(k) for k in ("name", "digest", "context", "sha256")} for d in ev.datasets],
        "config": ev.config,
        "package_versions": package_versions(),
        "input_files": ev.input_files,
    }


def build_context(ev: RunEvidence) -> dict[str, Any]:
    """The complete, escaped-at-render, precomputed context of the audit report."""
    opts = parse_report_options(ev.config.get("report"))
    rc_cfg = ev.config.get("reason_codes") or {}
    dictionary = {str(k): str(v) for k, v in (rc_cfg.get("dictionary") or {}).items()}
    gi = ev.global_importance
    features = sorted(gi["features"], key=lambda f: f.get("rank", 0))
    top_rows = _feature_rows(features, opts.top_features)
    top_names = [str(f["feature"]) for f in features[: opts.top_features]]
    chart = plots.data_uri(plots.importance_chart(
        top_names, [float(f.get("importance") or 0) for f in features[: opts.top_features]],
        [float(f.get("ci_low", f.get("importance")) or 0) for f in features[: opts.top_features]],
        [float(f.get("ci_high", f.get("importance")) or 0) for f in features[: opts.top_features]]))
    dist_names = top_names[: opts.distribution_features]
    shares, shares_missing = _shares(ev, dist_names)
    distribution: dict[str, Any] = {"missing": shares_missing and _missing(shares_missing), "rows": []}
    if shares is not None and len(shares.columns):
        qs = shares.quantile([0.05, 0.5, 0.95])
        distribution["rows"] = [{"feature": f, "p5": fnum(qs[f].iloc[0]), "median": fnum(qs[f].iloc[1]),
                                 "p95": fnum(qs[f].iloc[2]), "positive": fpct((shares[f] > 0).mean())}
                                for f in shares.columns]
        distribution["chart"] = plots.data_uri(plots.distribution_chart(
            list(shares.columns), [shares[f].to_numpy() for f in shares.columns]))
        total = (ev.local_relevance.attrs or {}).get("n_rows_total", len(shares))
        distribution["n"] = fnum(len(shares)) if total == len(shares) else \
            f"{len(shares):,} evenly spaced of {total:,}"
    all_shares, _ = _shares(ev, top_names)
    per_class = _per_class(ev, all_shares, top_names[:10])
    unstable = [str(f["feature"]) for f in features
                if not is_missing(f.get("ci_low")) and not is_missing(f.get("ci_high")) and f.get("importance")
                and (float(f["ci_high"]) - float(f["ci_low"])) > opts.unstable_ci_ratio * float(f["importance"])]
    layers = _layers(ev, opts.top_features)
    gates = _gates(ev)
    validation = _validation(ev)
    st = ev.stability or {}
    st_value = stability_value(st)
    st_modes = st.get("modes") if isinstance(st.get("modes"), dict) else {}
    stability = {
        "missing": None if st else _missing("the run has no explanations/stability.json"),
        "rows": _rows([(k.replace("_", " "), fnum(v) if isinstance(v, (int, float)) else v)
                       for k, v in sorted(st.items()) if k != "modes"]),
        "modes": [{"mode": m, "value": fnum((v or {}).get("spearman")),
                   "halves": f"{fnum((v or {}).get('n_half_a'))} / {fnum((v or {}).get('n_half_b'))}"}
                  for m, v in sorted(st_modes.items())],
        "value": fnum(st_value),
        "verdict": "n/a" if st_value is None or math.isnan(st_value) else (
            "stable" if st_value >= 0.9 else "moderately stable" if st_value >= 0.8 else "UNSTABLE"),
    }
    flags = _flags(ev, opts, gates, layers, per_class, validation, unstable)
    primary = str(gi.get("primary_mode") or ev.tags.get("governance.primary_mode") or "n/a")
    sections = [{"id": i, "number": str(n), "title": t} for n, (i, t) in enumerate(SECTIONS, start=1)]
    m = ev.model
    cfg = ev.config
    env_versions = package_versions()
    datasets = [{"name": ftext(d.get("name")), "context": ftext(d.get("context")), "rows": fnum(d.get("rows")),
                 "digest": ftext(d.get("digest")), "sha256": ftext(d.get("sha256")),
                 "source": ftext((d.get("source") or {}).get("uri") if isinstance(d.get("source"), dict)
                                 else d.get("source"))}
                for d in ev.datasets]
    train_datasets = [{"name": ftext(d.get("name")), "context": ftext(d.get("context")), "rows": fnum(d.get("rows")),
                       "digest": ftext(d.get("digest"))} for d in m.training_datasets]
    dataset_digest = ev.tags.get("governance.dataset_digest") or (ev.datasets[0]["digest"] if ev.datasets else None)
    data_sha = next((d.get("sha256") for d in ev.datasets if d.get("sha256")), None)
    rid = report_id(ev)
    when = ev.start_time
    date_text = when.strftime("%Y-%m-%d %H:%M UTC") if opts.show_timestamp else when.strftime("%Y-%m-%d")
    arch = m.architecture
    architecture = {
        "missing": None if arch else _missing(m.architecture_note or "the model artifact could not be read"),
        "rows": _rows([("Model class", arch.get("class")), ("Parameters", fnum(arch.get("n_parameters"))),
                       ("Trainable parameters", fnum(arch.get("n_trainable"))),
                       ("Modules with parameters", fnum(len(arch.get("layers", []))))]) if arch else [],
        "layers": [{"module": str(x["module"]), "type": ftext(x.get("type")), "parameters": fnum(x["parameters"])}
                   for x in (arch or {}).get("layers", [])][:40],
    }
    changes = _changes(ev, features, opts.top_features)
    prev_version = ev.previous.version if ev.previous else None
    summary = [
        {"label": "Policy gates", "value": gates["status"], "alert": gates["status"] == "FAILED"},
        {"label": "Data contract", "value": validation.get("success", NOT_PROVIDED), "alert": bool(validation.get("failed"))},
        {"label": "Top features", "value": ", ".join(top_names[:3]), "alert": False},
        {"label": "Stability (rank correlation)", "value": f"{stability['value']} ({stability['verdict']})",
         "alert": stability["verdict"] == "UNSTABLE"},
        {"label": "Automatic risk flags", "value": fnum(len(flags)), "alert": any(f["severity"] == "high" for f in flags)},
    ]
    cover_rows = _rows([
        ("Report id", rid),
        ("Registered model", m.name or _missing("the model is not registered")),
        ("Version", m.version),
        ("Aliases", m.aliases or "none"),
        ("Model id", m.model_id),
        ("Model URI", m.uri),
        ("Explanation run id", ev.run_id + (f" ({ev.run_name})" if ev.run_name else "")),
        ("Parent run id", ev.parent_run_id or "none"),
        ("Training run id", m.source_run_id),
        ("Experiment", f"{ev.experiment_name} ({ev.experiment_id})"),
        ("Dataset digest (MLflow)", dataset_digest),
        ("Dataset SHA-256", data_sha or _missing("the data source is not a readable local file and no "
                                                 "governance.dataset_sha256 tag was logged")),
        ("Model artifact SHA-256", f"{m.artifact_sha256} (tree of {m.artifact_files} files)" if m.artifact_sha256
         else None),
        ("Evidence basis date", date_text + " (start of the explanation run)"),
        ("Generator", f"mlflow-governance {__version__}"),
        ("Policy gates", gates["status"]),
    ])
    q = _quality(ev)
    return {
        "meta": {"title": opts.title, "report_id": rid, "organisation": opts.organisation,
                 "classification": opts.classification, "date": date_text,
                 "model_label": f"{m.name} v{m.version}" if m.name else (m.uri or ev.run_id),
                 "created_iso": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "generator": f"mlflow-governance {__version__}",
                 "keywords": "model risk, audit, explainability, DLBacktrace"},
        "sections": sections,
        "section": {s["id"]: s for s in sections},
        "summary": summary,
        "cover": {"rows": cover_rows, "signoff": _signoff(ev, opts)},
        "system": {
            "intended_purpose": opts.intended_purpose or _missing("set report.intended_purpose in the configuration"),
            "purpose_missing": opts.intended_purpose is None,
            "out_of_scope": opts.out_of_scope,
            "out_of_scope_missing": None if opts.out_of_scope else _missing("set report.out_of_scope"),
            "model_rows": _rows([("Task", cfg.get("task")), ("Flavours", m.flavors), ("PyTorch format", m.pytorch_format),
                                 ("Input signature", m.signature_inputs), ("Output signature", m.signature_outputs),
                                 ("Logged with MLflow", m.mlflow_version), ("Logged with torch", m.torch_version),
                                 ("Model logged at (UTC)", m.created), ("Description", m.description)]),
            "architecture": architecture,
            "environment": [{"name": k, "version": v} for k, v in env_versions.items()],
            "requirements": m.requirements,
            "requirements_missing": None if m.requirements else _missing("the model artifact has no requirements.txt"),
            "run_environment": _rows(sorted((ev.environment or {}).items())) if ev.environment else [],
        },
        "data": {"datasets": datasets,
                 "datasets_missing": None if datasets else _missing("no dataset was logged as an input of the run"),
                 "training": train_datasets,
                 "training_missing": None if train_datasets else _missing("the training run logged no dataset"),
                 "validation": validation},
        "performance": _performance(ev),
        "explainability": {
            "method_rows": _rows([("Method", "DLBacktrace (relevance propagation, spec/backtrace-rules.md)"),
                                  ("Primary mode", primary), ("Modes computed", sorted((gi.get("modes") or {}).keys()) or primary),
                                  ("Multiplier (seed relevance)", fnum(cfg.get("multiplier"))),
                                  ("Samples explained", fnum(gi.get("n_samples"))),
                                  ("Normalisation", "each sample's relevance divided by its L1 norm")]),
            "mode_texts": [{"mode": k, "text": v, "primary": k == primary} for k, v in MODE_TEXT.items()],
            "features": top_rows, "n_features": fnum(len(features)), "shown": fnum(len(top_rows)), "chart": chart,
            "chart_alt": "Bar chart of global importance with 95% confidence intervals for the top "
                         f"{len(top_rows)} features",
            "modes": _modes(ev, top_names[:10]),
            "distribution": distribution,
            "per_class": per_class,
            "layers": layers,
            "stability": stability,
            "unstable": unstable,
            "quality": q,
            "gates": gates,
            "examples": _examples(ev),
            "plots": [{"name": name, "src": plots.data_uri(data), "alt": f"Figure {name} logged by the explanation stage"}
                      for name, data in sorted(ev.plots.items())],
        },
        "decisions": _decisions(ev, opts, dictionary),
        "risks": {
            "risks": opts.risks, "risks_missing": None if opts.risks else _missing("set report.risks"),
            "limitations": opts.limitations,
            "limitations_missing": None if opts.limitations else _missing("set report.limitations"),
            "oversight": opts.human_oversight,
            "oversight_missing": None if opts.human_oversight else _missing("set report.human_oversight"),
            "flags": flags,
            "flags_missing": None if flags else "No automatic flag was raised (gates, data contract, stability, "
                                                "confidence intervals, class support, bias absorption).",
        },
        "changes": changes,
        "appendix": {
            "config": ev.config_text or _missing("the run has no governance/config.yaml"),
            "files": [{"path": k, "sha256": v} for k, v in sorted(ev.input_files.items())],
            "crosswalk_columns": list(CROSSWALK_COLUMNS),
            "crosswalk": crosswalk_rows(sections),
            "tags": _rows(sorted(ev.tags.items())),
            "previous_version": ftext(prev_version),
        },
    }


def _changes(ev: RunEvidence, features: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """Section 8: rank shifts and metric changes against the previous audited version."""
    m = ev.model
    prev = ev.previous
    if prev is None:
        reason = ("the model is not registered" if not m.name else
                  f"no earlier version of {m.name} is marked audited")
        return {"missing": _missing(reason), "ranks": [], "metrics": []}
    out: dict[str, Any] = {"missing": None, "version": prev.version, "run_id": ftext(prev.run_id)}
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
        out["ranks_missing"] = _missing(f"version {prev.version} has no readable global_importance.json")
    metrics = []
    for source, b_all, a_all in (("training", prev.training_metrics, m.training_metrics),
                                 ("explanation", prev.run_metrics, ev.metrics)):
        for k in sorted(set(b_all) | set(a_all)):
            b, a = b_all.get(k), a_all.get(k)
            delta = "n/a" if b is None or a is None else f"{a - b:+.4f}"
            metrics.append({"source": source, "name": k, "before": fnum(b, 4), "after": fnum(a, 4), "delta": delta})
    out["metrics"] = metrics
    out["metrics_missing"] = None if metrics else _missing("neither version logged metrics")
    return out
