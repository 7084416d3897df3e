"""Explanation-quality metrics as audit evidence (faithfulness, sanity, robustness, complexity).

    from governance.quality import quality_report, evaluate_gates
    q = quality_report(model, X, task="binary-classification", n_samples=256, seed=0)
    gates = evaluate_gates(q, [{"name": "beats random", "metric": "delta_auc",
                                "method": "backtrace_signed", "op": ">", "threshold": "random"}])

Every metric is written from its definition (see each module's docstring for the formula, its
direction and its parameters), is batched with torch, and is seeded. Modules:

- ``features``: feature units per modality (tabular columns, image patches, tokens), baselines
- ``faithfulness``: faithfulness correlation, MoRF/LeRF flipping curves, their AUCs and delta
- ``randomisation``: cascading MPRT (Spearman per layer and overall), efficient MPRT
- ``complexity``: entropy and Gini sparseness
- ``robustness``: max-sensitivity, completeness (conservation) gap
- ``baselines``: DLBacktrace modes, gradient x input, integrated gradients, random; KernelSHAP
  and LIME when their packages are installed (never required)
- ``gates``: policy gates over the quality document
"""

from governance.quality.baselines import (
    Attribution,
    BacktraceExplainer,
    Explainer,
    GradientXInput,
    IntegratedGradients,
    KernelShap,
    Lime,
    OPTIONAL_BASELINES,
    RandomAttribution,
    default_explainers,
)
from governance.quality.gates import evaluate_gates
from governance.quality.report import METRIC_GROUPS, METRICS, quality_metrics, quality_report

__all__ = [
    "quality_report",
    "evaluate_gates",
    "quality_metrics",
    "METRICS",
    "METRIC_GROUPS",
    "Attribution",
    "Explainer",
    "BacktraceExplainer",
    "GradientXInput",
    "IntegratedGradients",
    "RandomAttribution",
    "KernelShap",
    "Lime",
    "OPTIONAL_BASELINES",
    "default_explainers",
]
