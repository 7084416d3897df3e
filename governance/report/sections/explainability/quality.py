"""Part: explanation-quality metrics per method, and the policy gates."""

from __future__ import annotations

from typing import Any

from governance.report.format import breakable, fnum, not_provided
from governance.report.inputs import ReportInputs
from governance.report.evidence import RunEvidence


#: Each quality metric named in words (quality.json names, docs/quality.md definitions).
METRIC_WORDS = {
    "faithfulness_correlation": "Faithfulness correlation (attribution vs output drop on random subsets)",
    "morf_auc": "Confidence area when the most relevant features are removed first (MoRF)",
    "lerf_auc": "Confidence area when the least relevant features are removed first (LeRF)",
    "delta_auc": "Deletion gap, LeRF minus MoRF (about 0 for a random ranking)",
    "max_sensitivity": "Worst change of the explanation under small input noise",
    "completeness_gap": "Relative gap between the attributions' sum and what the method distributes",
    "entropy": "Spread of the attribution over features (entropy)",
    "gini": "Concentration of the attribution on few features (Gini)",
    "mprt_spearman": "Rank similarity after randomising every layer (MPRT)",
    "mprt_spearman_mean": "Mean rank similarity over the layer-randomisation cascade",
    "mprt_entropy_ratio": "Entropy after / before randomising the weights (efficient MPRT)",
    "ground_truth_hits": "True drivers among the top features",
    "ground_truth_recall": "Share of the true drivers among the top features",
    "ground_truth_local_recall": "Share of the true drivers among each sample's top features",
}
#: Each method named in words.
METHOD_WORDS = {"gradient_x_input": "Gradient \u00d7 input", "integrated_gradients": "Integrated gradients",
                "random": "Random (chance level)", "kernel_shap": "Kernel SHAP", "lime": "LIME"}
DIRECTION_WORDS = {"higher": "higher", "lower": "lower"}


def method_words(name: str) -> str:
    """``backtrace_signed`` -> "DLBacktrace, signed mode"; baselines by their usual names."""
    if name.startswith("backtrace_"):
        return f"DLBacktrace, {name[len('backtrace_'):]} mode"
    return METHOD_WORDS.get(name, name.replace("_", " "))


def quality_table(ev: RunEvidence) -> dict[str, Any]:
    """Explanation-quality table: one row per metric (in words, with its direction), one column
    per method (DLBacktrace's modes first)."""
    q = ev.quality
    if not q or not q.get("methods"):
        return {"missing": not_provided("the run has no explanations/quality.json (explanation-quality metrics)")}
    methods = sorted(q["methods"], key=lambda m: (not m.startswith("backtrace_"), m == "random", m))
    metrics = sorted(set(q.get("metrics") or {}) | {k for v in q["methods"].values() for k in v},
                     key=lambda k: (list(METRIC_WORDS).index(k) if k in METRIC_WORDS else len(METRIC_WORDS), k))
    rows = []
    for name in metrics:
        meta = (q.get("metrics") or {}).get(name) or {}
        cells = []
        for m in methods:
            v = (q["methods"][m] or {}).get(name)
            cells.append(fnum(v) if v is None or isinstance(v, (int, float)) else "see evidence")
        rows.append({"metric": METRIC_WORDS.get(name, name.replace("_", " ")), "name": breakable(name),
                     "direction": DIRECTION_WORDS.get(meta.get("direction"), "not recorded"),
                     "cells": cells})
    errors = [f"{method_words(k.split('.')[0])}: {v}" for k, v in sorted((q.get("errors") or {}).items())]
    bounds = [str(b) for b in q.get("bounds") or []]
    return {"missing": None, "methods": [method_words(m) for m in methods], "rows": rows, "errors": errors,
            "n_samples": fnum(q.get("n_samples")), "wide": len(methods) > 4, "bounds": bounds}


def build(inp: ReportInputs) -> dict[str, Any]:
    """The quality table and the explanation run's own gates (an approval applies the approver's policy)."""
    return {"quality": quality_table(inp.ev), "gates": inp.gates}
