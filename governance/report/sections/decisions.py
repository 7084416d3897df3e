"""Section 6: individual decisions (reason codes of a sample, leading features, dictionary)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from governance.report.format import fnum, fpct, ftext, is_missing, not_provided
from governance.report.inputs import ReportInputs, effect, id_column, pred_column
from governance.report.evidence import RunEvidence


def reason_list(row: pd.Series, side: str) -> list[tuple[str, str, str | None]]:
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


def leaders(ev: RunEvidence, dictionary: dict[str, str], top: int = 8) -> list[dict[str, str]]:
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


def directions(gi: dict[str, Any]) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
    """global_importance.json's feature entries by name: overall, and per predicted class."""
    overall = {str(f.get("feature")): f for f in gi.get("features") or []}
    by_class = {str(c): {str(f.get("feature")): f for f in (doc or {}).get("features") or []}
                for c, doc in (gi.get("by_class") or {}).items()}
    return overall, by_class


def build(inp: ReportInputs) -> dict[str, Any]:
    """The configured sample of decisions with their reason codes."""
    ev, dictionary = inp.ev, inp.dictionary
    rc = ev.reason_codes
    cfg = inp.opts.sample_decisions
    dict_rows = [{"feature": k, "text": v} for k, v in sorted(dictionary.items())]
    base = {"dictionary": dict_rows, "leaders": leaders(ev, dictionary),
            "dictionary_missing": None if dict_rows else not_provided(
                "no plain-language dictionary in the configuration (reason_codes.dictionary); "
                "reasons are shown by feature name")}
    if rc is None or rc.empty:
        return dict(base, rows=[], selection=None, undefined=[],
                    missing=not_provided("the run has no explanations/reason_codes.parquet"))
    idc, pc = id_column(rc), pred_column(rc)
    df = rc.copy()
    if idc is None:
        df["_id"] = np.arange(len(df))
        idc = "_id"
    df = df.sort_values(idc, kind="stable")
    if cfg.select == "adverse":
        if pc is None:
            return dict(base, rows=[], selection=None, undefined=[],
                        missing=not_provided("reason_codes.parquet has no prediction column to select adverse decisions"))
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
    overall, by_class = directions(ev.global_importance)
    for _, r in sel.head(cfg.n).iterrows():
        sides = {}
        lookup = by_class.get(str(r[pc])) if pc else None
        for side in ("supporting", "adverse"):
            items = []
            for feat, share, given in reason_list(r, side):
                text = dictionary.get(feat) or (given if given and given != feat else None)
                if text is None:
                    undefined.add(feat)
                entry = (lookup or {}).get(feat) or overall.get(feat)
                items.append({"feature": feat, "text": text or "no plain-language text configured",
                              "value": share, "effect": effect(entry, long=True)})
            sides[side] = items
        rows.append({"id": ftext(r[idc]), "prediction": ftext(r[pc]) if pc else "n/a",
                     "adverse": sides["adverse"], "supporting": sides["supporting"]})
    note = None if rows else not_provided(f"no decision matched the selection ({what})")
    return dict(base, rows=rows, selection=what, missing=note,
                undefined=sorted(undefined), n_total=fnum(len(df)))

