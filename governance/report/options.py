"""Validation of the free-form ``report:`` and ``model_card:`` sections of ``governance.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from governance.errors import GovernanceError


class ReportError(GovernanceError):
    """The report cannot be produced; the message says what is wrong and what to do."""


#: Human-only model-card fields: key -> label. Missing ones show "More information needed".
MODEL_CARD_FIELDS: dict[str, str] = {
    "summary": "Summary",
    "developed_by": "Developed by",
    "funded_by": "Funded by",
    "shared_by": "Shared by",
    "model_type": "Model type",
    "language": "Language(s)",
    "license": "License",
    "finetuned_from": "Finetuned from model",
    "repository": "Repository",
    "paper": "Paper",
    "direct_use": "Direct use",
    "downstream_use": "Downstream use",
    "out_of_scope_use": "Out-of-scope use",
    "bias_risks_limitations": "Bias, risks, and limitations",
    "recommendations": "Recommendations",
    "training_data": "Training data",
    "training_procedure": "Training procedure",
    "preprocessing": "Preprocessing",
    "testing_data": "Testing data",
    "factors": "Factors",
    "environmental_impact": "Environmental impact",
    "compute_infrastructure": "Compute infrastructure",
    "citation": "Citation",
    "glossary": "Glossary",
    "more_information": "More information",
    "authors": "Model card authors",
    "contact": "Model card contact",
    "users": "Intended users",
    "ethical_considerations": "Ethical considerations",
}

MORE_INFO = "More information needed"
NOT_PROVIDED = "not provided"

_SELECT = ("adverse", "first", "all", "ids")


@dataclass
class SampleDecisions:
    """Which individual decisions the report shows with their reason codes."""

    n: int = 10
    select: str = "adverse"
    adverse_predictions: list[Any] = field(default_factory=lambda: [1])
    ids: list[Any] = field(default_factory=list)


@dataclass
class ReportOptions:
    """The validated ``report:`` section (every key optional)."""

    title: str = "Model audit report"
    organisation: str | None = None
    classification: str = "Confidential"
    intended_purpose: str | None = None
    out_of_scope: list[str] = field(default_factory=list)
    risks: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    human_oversight: list[str] = field(default_factory=list)
    sample_decisions: SampleDecisions = field(default_factory=SampleDecisions)
    top_features: int = 15
    distribution_features: int = 8
    min_class_support: int = 30
    unstable_ci_ratio: float = 1.0
    signoff_roles: list[str] = field(
        default_factory=lambda: ["Model owner", "Independent validator", "Model risk officer"]
    )
    show_timestamp: bool = False
    model_architecture: bool = True


def _str_list(section: str, key: str, value: Any) -> list[str]:
    """A string or list of strings as a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise ReportError(f"{section}.{key}: must be a string or a list of strings, got {type(value).__name__}")


def _positive_int(section: str, key: str, value: Any) -> int:
    """A positive integer, else a ReportError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ReportError(f"{section}.{key}: must be a positive integer, got {value!r}")
    return value


def parse_report_options(raw: dict[str, Any] | None) -> ReportOptions:
    """Validate the ``report:`` mapping; unknown keys and wrong types raise :class:`ReportError`."""
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise ReportError("report: must be a mapping")
    opts = ReportOptions()
    known = set(ReportOptions.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ReportError(f"report: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("title", "organisation", "classification", "intended_purpose"):
        if key in raw and raw[key] is not None:
            if not isinstance(raw[key], (str, int, float)):
                raise ReportError(f"report.{key}: must be text")
            setattr(opts, key, str(raw[key]))
    for key in ("out_of_scope", "risks", "limitations", "human_oversight", "signoff_roles"):
        if key in raw:
            setattr(opts, key, _str_list("report", key, raw[key]))
    for key in ("top_features", "distribution_features", "min_class_support"):
        if key in raw:
            setattr(opts, key, _positive_int("report", key, raw[key]))
    if "unstable_ci_ratio" in raw:
        v = raw["unstable_ci_ratio"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ReportError(f"report.unstable_ci_ratio: must be a positive number, got {v!r}")
        opts.unstable_ci_ratio = float(v)
    for key in ("show_timestamp", "model_architecture"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ReportError(f"report.{key}: must be true or false")
            setattr(opts, key, raw[key])
    sd = raw.get("sample_decisions")
    if sd is not None:
        if not isinstance(sd, dict):
            raise ReportError("report.sample_decisions: must be a mapping (n, select, adverse_predictions, ids)")
        bad = sorted(set(sd) - set(SampleDecisions.__dataclass_fields__))
        if bad:
            raise ReportError(f"report.sample_decisions: unknown key(s) {bad}")
        s = SampleDecisions()
        if "n" in sd:
            s.n = _positive_int("report.sample_decisions", "n", sd["n"])
        if "select" in sd:
            if sd["select"] not in _SELECT:
                raise ReportError(f"report.sample_decisions.select: must be one of {', '.join(_SELECT)}")
            s.select = sd["select"]
        if "adverse_predictions" in sd:
            v = sd["adverse_predictions"]
            s.adverse_predictions = list(v) if isinstance(v, list) else [v]
        if "ids" in sd:
            v = sd["ids"]
            s.ids = list(v) if isinstance(v, list) else [v]
        if s.select == "ids" and not s.ids:
            raise ReportError("report.sample_decisions: select 'ids' needs a non-empty ids list")
        opts.sample_decisions = s
    return opts


def parse_model_card_options(raw: dict[str, Any] | None) -> dict[str, str]:
    """Validate the ``model_card:`` mapping: known human-only fields, text values."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(MODEL_CARD_FIELDS))
    if unknown:
        raise ReportError(f"model_card: unknown key(s) {unknown}; known: {sorted(MODEL_CARD_FIELDS)}")
    out = {}
    for key, value in raw.items():
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list):
            value = "\n".join(f"- {v}" for v in value)
        elif isinstance(value, dict):
            value = "\n".join(f"- {k}: {v}" for k, v in value.items())
        elif not isinstance(value, (str, int, float)):
            raise ReportError(f"model_card.{key}: must be text")
        out[key] = str(value)
    return out
