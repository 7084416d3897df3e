"""What several report sections share, derived once per report from :class:`RunEvidence`.

:class:`ReportInputs` holds the evidence, the validated options and the derived facts that more
than one section prints (the data-contract summary, the gates, the layer ranking, stability,
per-class importance, the risk flags). Each is computed on first use and then reused, so a
section builder never recomputes another section's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from governance.report import plots
from governance.report.evidence import RunEvidence
from governance.report.format import fnum, fpct, ftext, is_missing, kv_rows, not_provided
from governance.report.options import NOT_PROVIDED, ReportOptions, parse_report_options


@dataclass
class ReportInputs:
    """The evidence of one run plus everything derived from it that sections share."""

    ev: RunEvidence
    #: ``{"id", "number", "title"}`` of every section, in print order (set by the context builder)
    headings: list[dict[str, str]] = field(default_factory=list)

    @cached_property
    def opts(self) -> ReportOptions:
        """The validated ``report:`` options."""
        return parse_report_options(self.ev.config.get("report"))

    @cached_property
    def dictionary(self) -> dict[str, str]:
        """The plain-language reason texts of the configuration (feature -> text)."""
        rc_cfg = self.ev.config.get("reason_codes") or {}
        return {str(k): str(v) for k, v in (rc_cfg.get("dictionary") or {}).items()}

    @cached_property
    def features(self) -> list[dict[str, Any]]:
        """global_importance.json's features in rank order."""
        return sorted(self.ev.global_importance["features"], key=lambda f: f.get("rank", 0))

    @cached_property
    def top_names(self) -> list[str]:
        """Names of the top ``report.top_features`` features."""
        return [str(f["feature"]) for f in self.features[: self.opts.top_features]]

    @cached_property
    def primary(self) -> str:
        """The primary mode."""
        gi = self.ev.global_importance
        return str(gi.get("primary_mode") or self.ev.tags.get("governance.primary_mode") or "n/a")

    @cached_property
    def top_shares(self) -> pd.DataFrame | None:
        """Per-sample signed shares of the top features (None without local relevance)."""
        return shares(self.ev, self.top_names)[0]

    @cached_property
    def validation(self) -> dict[str, Any]:
        """The data-contract summary (section 3, cover, flags)."""
        return validation_summary(self.ev)

    @cached_property
    def gates(self) -> dict[str, Any]:
        """The policy gates (section 5, cover, flags)."""
        return gates_summary(self.ev)

    @cached_property
    def layers(self) -> dict[str, Any]:
        """The layer ranking (section 5, flags)."""
        return layers_summary(self.ev, self.opts.top_features)

    @cached_property
    def per_class(self) -> dict[str, Any]:
        """Importance per predicted class (section 5, flags)."""
        return per_class_summary(self.ev, self.top_shares, self.top_names[:10])

    @cached_property
    def stability(self) -> dict[str, Any]:
        """Split-half stability (section 5, cover)."""
        return stability_summary(self.ev.stability)

    @cached_property
    def unstable(self) -> list[str]:
        """Features whose CI is wide relative to their importance."""
        ratio = self.opts.unstable_ci_ratio
        return [str(f["feature"]) for f in self.features
                if not is_missing(f.get("ci_low")) and not is_missing(f.get("ci_high")) and f.get("importance")
                and (float(f["ci_high"]) - float(f["ci_low"])) > ratio * float(f["importance"])]

    @cached_property
    def flags(self) -> list[dict[str, str]]:
        """Automatic risk flags (section 7, cover)."""
        return risk_flags(self)


#: Direction of effect (``direction`` of a global_importance.json feature) in words.
DIRECTION_WORDS = {"raises": "higher values raise the output", "lowers": "higher values lower the output",
                   "mixed": "no consistent direction"}
DIRECTION_NOT_RECORDED = "direction not recorded"


def effect(entry: dict[str, Any] | None, *, long: bool = False) -> str:
    """A feature's direction of effect: how its value relates to its signed relevance over the
    samples (the sign of the Spearman correlation rho; mixed when |rho| < 0.1), e.g.
    "raises (rho +0.62)" or, ``long``, "higher values raise the output (rho +0.62)"."""
    direction = (entry or {}).get("direction")
    if direction not in DIRECTION_WORDS:
        return DIRECTION_NOT_RECORDED
    rho = (entry or {}).get("value_relevance_correlation")
    rho_text = "" if is_missing(rho) else f" (\u03c1 {float(rho):+.2f})"
    return (DIRECTION_WORDS[direction] if long else direction) + rho_text


def shares(ev: RunEvidence, features: list[str]) -> tuple[pd.DataFrame | None, str | None]:
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


def id_column(df: pd.DataFrame) -> str | None:
    """The sample-id column of a per-sample table, if any."""
    for c in ("sample_id", "id", "sample", "row", "index"):
        if c in df.columns:
            return c
    return None


def pred_column(df: pd.DataFrame) -> str | None:
    """The prediction column of a per-sample table, if any."""
    for c in ("prediction", "predicted", "predicted_class", "pred", "label"):
        if c in df.columns:
            return c
    return None


def stability_value(st: dict[str, Any] | None) -> float | None:
    """The primary mode's split-half rank correlation from stability.json (None if absent)."""
    st = st or {}
    for key in ("stability", "spearman", "rank_correlation"):
        v = st.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def param_text(value: Any) -> str:
    """A short text for an expectation parameter (long lists summarised)."""
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} values]" if len(value) > 6 else "[" + ", ".join(map(str, value)) + "]"
    return str(value)


NOT_INDEPENDENT = "contract not independent of the data it checks"


def contract_independent(ev: RunEvidence) -> bool | None:
    """Whether the data contract came from somewhere other than the data it checks.

    From validation_result.json's ``independent``, else the run tag
    ``governance.contract_independent``; for older runs, a contract whose recorded source is the
    validation data's own schema is not independent. None when nothing says.
    """
    doc = ev.validation or {}
    if isinstance(doc.get("independent"), bool):
        return doc["independent"]
    tag = ev.tags.get("governance.contract_independent")
    if tag in ("true", "false"):
        return tag == "true"
    source = str(doc.get("contract_source") or ev.tags.get("governance.contract_source") or "")
    return False if source.startswith("validation data") else None


def stability_summary(st: dict[str, Any] | None) -> dict[str, Any]:
    """stability.json as rows: the primary mode's rank correlation, its verdict, one row per mode."""
    st = st or {}
    value = stability_value(st)
    modes = st.get("modes") if isinstance(st.get("modes"), dict) else {}
    return {
        "missing": None if st else not_provided("the run has no explanations/stability.json"),
        "rows": kv_rows([(k.replace("_", " "), fnum(v) if isinstance(v, (int, float)) else v)
                         for k, v in sorted(st.items()) if k != "modes"]),
        "modes": [{"mode": m, "value": fnum((v or {}).get("spearman")),
                   "halves": f"{fnum((v or {}).get('n_half_a'))} / {fnum((v or {}).get('n_half_b'))}"}
                  for m, v in sorted(modes.items())],
        "value": fnum(value),
        "verdict": "n/a" if value is None or math.isnan(value) else (
            "stable" if value >= 0.9 else "moderately stable" if value >= 0.8 else "UNSTABLE"),
    }


def validation_summary(ev: RunEvidence, max_rows: int = 40) -> dict[str, Any]:
    """The data-contract section: summary, expectations by type, failures, and every row when few.

    Accepts the explanation stage's wrapper (``success``, ``contract_source``, ``failures``,
    ``great_expectations``: the GX result) or a bare GX ``to_json_dict`` result.
    """
    doc = ev.validation
    if not doc:
        return {"missing": not_provided("the run has no data_quality/validation_result.json"), "rows": [], "by_type": [],
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
            "parameters": ", ".join(f"{k}={param_text(kwargs[k])}" for k in sorted(kwargs)) or "none",
            "success": "pass" if ok else "FAIL", "failed": not ok,
            "unexpected": fnum(res.get("unexpected_count")) if "unexpected_count" in res else "n/a",
            "observed": param_text(observed) if observed is not None else "n/a",
        })
    failures = [{"expectation": str(f.get("expectation")), "column": str(f.get("column") or "table"),
                 "detail": str(f.get("detail") or "")} for f in doc.get("failures", []) or []]
    if not failures:
        failures = [{"expectation": r["expectation"], "column": r["column"],
                     "detail": f"unexpected {r['unexpected']}, observed {r['observed']}"} for r in rows if r["failed"]]
    stats = v.get("statistics") or {}
    success = doc.get("success", v.get("success"))
    independent = contract_independent(ev)
    notes = [str(n) for n in (doc.get("notes") or []) if n]
    if independent is False and not any(NOT_INDEPENDENT in n for n in notes):
        notes.insert(0, f"The {NOT_INDEPENDENT}: it was derived from the validation data's own schema "
                        f"({ftext(doc.get('contract_source') or ev.tags.get('governance.contract_source'))}), so "
                        "it cannot fail on that data. Give the stage a contract (expectations) or a model "
                        "whose training data is logged.")
    return {
        "missing": None,
        "success": "FAILED" if not success else NOT_INDEPENDENT if independent is False else "passed",
        "failed": not success,
        "not_independent": bool(success) and independent is False,
        "notes": notes,
        "suite": ftext(v.get("suite_name") or (v.get("meta") or {}).get("expectation_suite_name")),
        "source": ftext(doc.get("contract_source")),
        "stats": kv_rows([
            ("Contract derived from", doc.get("contract_source")),
            ("Independent of the data it checks", "not recorded" if independent is None else
             "yes" if independent else "NO"),
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


def gates_summary(ev: RunEvidence) -> dict[str, Any]:
    """Policy gates from gates.json and the run tag."""
    g = ev.gates
    tag = ev.tags.get("governance.gates_passed")
    if not g:
        status = {"true": "passed", "false": "FAILED"}.get(tag or "", NOT_PROVIDED)
        return {"missing": not_provided("the run has no explanations/gates.json"), "status": status,
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
    return {"missing": None if rows else not_provided("no policy gates were configured"),
            "status": "passed" if passed else "FAILED", "passed": passed, "rows": rows}


LAYER_EXTRA = (("bias_share", "bias-absorbed share"), ("saturation_rerouted", "saturation rerouted"),
               ("branch_share", "branch share"))


def layers_summary(ev: RunEvidence, top: int) -> dict[str, Any]:
    """Layer ranking table, chart and bias/saturation figures."""
    lr = ev.layer_ranking
    layers = [x for x in (lr or {}).get("layers", []) if isinstance(x, dict)]
    if not layers:
        return {"missing": not_provided("the run has no explanations/layer_ranking.json"), "rows": [],
                "bias_max": None, "bias_mean": None, "bias_max_raw": 0.0, "saturation_max": None}
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


def per_class_summary(ev: RunEvidence, shares: pd.DataFrame | None, features: list[str]) -> dict[str, Any]:
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
    if shares is None or df is None or pred_column(df) is None:
        return {"missing": not_provided("local relevance with a prediction column is needed for per-class importance"),
                "rows": []}
    pred = df[pred_column(df)].astype(str).to_numpy()
    classes = sorted(set(pred))
    if len(classes) > 20:
        return {"missing": not_provided(f"{len(classes)} distinct predictions (regression?); per-class view omitted"),
                "rows": []}
    rows = []
    counts = {c: int((pred == c).sum()) for c in classes}
    for feat in features:
        vals = np.abs(shares[feat].to_numpy())
        rows.append({"feature": feat, "cells": [fpct(vals[pred == c].mean()) for c in classes]})
    return {"missing": None, "classes": [f"{c} (n={counts[c]:,})" for c in classes], "rows": rows,
            "counts": counts, "wide": len(classes) > 4}


def risk_flags(inp: ReportInputs) -> list[dict[str, str]]:
    """Automatic risk flags: failed gates or contract, instability, wide CIs, thin classes, bias."""
    ev, opts, gates, layers = inp.ev, inp.opts, inp.gates, inp.layers
    per_class, validation, unstable = inp.per_class, inp.validation, inp.unstable
    flags = []
    if gates.get("status") == "FAILED":
        failed = [r["name"] for r in gates.get("rows", []) if r.get("failed")]
        flags.append({"severity": "high", "text": "Policy gate(s) failed" + (f": {', '.join(failed)}" if failed else "")
                      + ". The model must not be approved on this evidence."})
    if ev.tags.get("governance.feature_order") == "unverified":
        flags.append({"severity": "high", "text": "Feature order UNVERIFIED: the model carries no feature names "
                      "(no signature with column names, no logged training-data schema, no feature_columns in the "
                      "configuration), so the validation file's column order was assumed. If it differs from the "
                      "order the model was trained on, every explanation here is of the wrong features."})
    if validation.get("failed"):
        flags.append({"severity": "high", "text": "The data contract (great-expectations) did not pass."})
    elif validation.get("not_independent"):
        flags.append({"severity": "medium", "text": f"Data contract: {NOT_INDEPENDENT}. It was derived from the "
                      "validation data's own schema and cannot fail on that data; its result is not evidence of "
                      "data quality."})
    if ev.tags.get("governance.allow_pickle") == "true":
        flags.append({"severity": "medium", "text": "The model was loaded from a pickle by explicit opt-in "
                      "(allow_pickle): loading it ran code stored with the model. Log the model in pt2 format."})
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
    from governance.report.modality_flags import modality_flags

    flags.extend(modality_flags(ev.global_importance))
    if layers.get("bias_max_raw", 0.0) > 0.2:
        flags.append({"severity": "low", "text": f"Up to {layers['bias_max']} of the relevance at a layer is "
                      "absorbed by bias terms and is not attributed to any input."})
    return flags

