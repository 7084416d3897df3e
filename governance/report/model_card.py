"""The model card: Markdown (Hugging Face layout, YAML front matter), JSON (model-card-toolkit keys), HTML.

Facts come from MLflow (registered model, version, signature, datasets, metrics, explanation
results); fields only a person can fill come from the ``model_card:`` section of the config and
read "More information needed" when missing. Those missing fields are counted and listed.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from governance import __version__
from governance.report.format import fnum, fpct
from governance.report.inputs import NOT_INDEPENDENT, contract_independent, effect, stability_value
from governance.report.evidence import ModelFacts, RunEvidence
from governance.report.options import MODEL_CARD_FIELDS, MORE_INFO, parse_model_card_options
from governance.report.render import render_template

MCT_SCHEMA_VERSION = "0.0.2"


def _md_escape(value: Any) -> str:
    """Escape text for Markdown: HTML special characters, table pipes and line starts."""
    s = "" if value is None else str(value)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("|", "\\|").replace("`", "\\`").replace("*", "\\*").replace("_", "\\_")
    s = s.replace("[", "\\[").replace("]", "\\]")
    return s


def approval_text(facts: ModelFacts) -> str:
    """The version's approval state from its governance tags (see governance.registry)."""
    tags = facts.version_tags or {}
    state = tags.get("governance.approval_state")
    run = tags.get("governance.approved_run_id")
    if state == "approved":
        return f"approved (report of governance run {run})"
    if state == "superseded":
        return (f"superseded: the approval of run {run} no longer covers the latest evidence "
                f"(run {tags.get('governance.superseded_by_run_id')})")
    if state == "rejected":
        return "rejected"
    return "not approved" if facts.name else "not provided"


def caveats(evidence: RunEvidence) -> list[str]:
    """What the explanation run could not be sure of (feature order, contract, pickle) and the
    modality's own warnings (a fixed image region)."""
    out = []
    tags = evidence.tags
    if tags.get("governance.feature_order") == "unverified":
        out.append("feature order UNVERIFIED: the model carries no feature names; the validation file's column "
                   "order was assumed")
    if contract_independent(evidence) is False:
        out.append(f"data {NOT_INDEPENDENT}")
    if tags.get("governance.allow_pickle") == "true":
        out.append("the model was loaded from a pickle by explicit opt-in")
    from governance.report.modality_flags import modality_flags

    out.extend(f["text"] for f in modality_flags(evidence.global_importance))  # e.g. an image shortcut
    return out


def drift_text(evidence: RunEvidence) -> str | None:
    """The explanation-drift comparison logged into the run, in one sentence (None without one)."""
    d = evidence.drift
    if not d or not d.get("verdict"):
        return None
    o = d.get("overall") or {}
    moved = [str(u["unit"]) for u in d.get("units") or [] if u.get("significant")][:5]
    base = (d.get("baseline") or {}).get("run_id") or (d.get("baseline") or {}).get("model_uri") or "the baseline"
    return (f"{d['verdict']} against {base} ({'paired' if d.get('paired') else 'unpaired'}; Jensen-Shannon divergence "
            f"{fnum(o.get('js_divergence'), 4)}, top-{fnum(o.get('top_k'))} overlap {fpct(o.get('top_k_overlap'), 0)}; "
            f"significant shifts: {', '.join(moved) if moved else 'none'})")


def build_model_card(facts: ModelFacts, evidence: RunEvidence | None, card_options: dict[str, Any] | None,
                     *, date: str | None, approval: str | None = None) -> dict[str, Any]:
    """The model-card context: ``fields`` (human), ``facts`` (MLflow), ``mct`` (JSON document).

    ``approval`` (the version's approval state, :func:`approval_text`) is given for a card made
    on its own; the card inside a report leaves it out: the approval comes after the report."""
    human = parse_model_card_options(card_options)
    fields = {k: human.get(k, MORE_INFO) for k in MODEL_CARD_FIELDS}
    missing = [k for k in MODEL_CARD_FIELDS if k not in human]
    name = facts.name or (facts.model_id or facts.uri or "unregistered model")
    version = facts.version or "not registered"
    metrics = [{"name": k, "value": fnum(v, 4), "raw": v} for k, v in sorted(facts.training_metrics.items())]
    importance: list[dict[str, str]] = []
    explanation: dict[str, Any] = {}
    if evidence is not None:
        gi = evidence.global_importance
        for f in sorted(gi["features"], key=lambda f: f.get("rank", 0))[:10]:
            importance.append({"rank": fnum(f.get("rank")), "feature": str(f["feature"]),
                               "importance": fpct(f.get("importance")),
                               "ci": f"{fpct(f.get('ci_low'))} to {fpct(f.get('ci_high'))}",
                               "effect": effect(f, long=True)})
        explanation = {
            "method": "DLBacktrace",
            "primary_mode": str(gi.get("primary_mode")),
            "n_samples": fnum(gi.get("n_samples")),
            "stability": fnum(stability_value(evidence.stability)),
            "gates": {"true": "passed", "false": "failed"}.get(evidence.tags.get("governance.gates_passed", ""),
                                                                 "not provided"),
            "run_id": evidence.run_id,
            "caveats": caveats(evidence),
            "drift": drift_text(evidence),
        }
    datasets = []
    for d in facts.training_datasets:
        datasets.append({"name": str(d.get("name")), "context": str(d.get("context") or "training"),
                         "digest": str(d.get("digest")), "rows": fnum(d.get("rows"))})
    if evidence is not None:
        for d in evidence.datasets:
            datasets.append({"name": str(d.get("name")), "context": str(d.get("context") or "validation"),
                             "digest": str(d.get("digest")), "rows": fnum(d.get("rows"))})
    arch = facts.architecture or {}
    arch_text = (f"{arch.get('class')} with {fnum(arch.get('n_parameters'))} parameters in "
                 f"{len(arch.get('layers', []))} modules with parameters") if arch else MORE_INFO
    facts_rows = [
        ("Registered model", name), ("Version", version), ("Aliases", ", ".join(facts.aliases) or "none"),
        ("Model id", facts.model_id or "not provided"), ("Model URI", facts.uri or "not provided"),
        ("Flavours", ", ".join(facts.flavors) or "not provided"),
        ("Input signature", facts.signature_inputs or "not provided"),
        ("Output signature", facts.signature_outputs or "not provided"),
        ("Architecture", arch_text), ("Training run", facts.source_run_id or "not provided"),
        ("Model artifact SHA-256", facts.artifact_sha256 or "not provided"),
    ] + ([("Governance approval", approval)] if approval else [])
    mct = {
        "schema_version": MCT_SCHEMA_VERSION,
        "model_details": {
            "name": name,
            "overview": fields["summary"],
            "documentation": (f"Generated by mlflow-governance {__version__} from MLflow. "
                              f"{len(missing)} of {len(MODEL_CARD_FIELDS)} human-provided fields need more "
                              f"information: {', '.join(missing) if missing else 'none'}."),
            "owners": [{"name": fields["developed_by"], "contact": fields["contact"]}],
            "version": {"name": version, "date": date or MORE_INFO, "diff": facts.description or MORE_INFO},
            "licenses": [{"identifier": fields["license"]}],
            "references": [{"reference": ref} for ref in (facts.uri, fields["repository"], fields["paper"]) if ref],
            "citations": [{"style": "text", "citation": fields["citation"]}],
            "path": facts.uri or MORE_INFO,
        },
        "model_parameters": {
            "model_architecture": arch_text,
            "data": [{"name": f"{d['name']} ({d['context']}, digest {d['digest']})"} for d in datasets]
            or [{"name": MORE_INFO}],
            "input_format": facts.signature_inputs or MORE_INFO,
            "output_format": facts.signature_outputs or MORE_INFO,
        },
        "quantitative_analysis": {
            "performance_metrics": [{"type": m["name"], "value": m["raw"]} for m in metrics],
            "graphics": {"description": (
                "Global importance (DLBacktrace, " + explanation.get("primary_mode", "n/a") + " mode): "
                + "; ".join(f"{r['rank']}. {r['feature']} {r['importance']}" for r in importance))
                if importance else "Explanation results not provided: no governance run for this model"},
        },
        "considerations": {
            "users": [{"description": fields["users"]}],
            "use_cases": [{"description": fields["direct_use"]}, {"description": fields["downstream_use"]}],
            "limitations": [{"description": fields["bias_risks_limitations"]},
                            {"description": f"Out-of-scope use: {fields['out_of_scope_use']}"}],
            "tradeoffs": [{"description": fields["recommendations"]}],
            "ethical_considerations": [{"name": fields["ethical_considerations"],
                                        "mitigation_strategy": fields["recommendations"]}],
        },
    }
    front = {
        "license": human.get("license", "other"),
        "library_name": "pytorch",
        "tags": ["mlflow", "pytorch", "dlbacktrace", "model-governance"],
        "model_name": name,
        "model_version": version,
        "metrics": [m["name"] for m in metrics],
        "datasets": sorted({d["name"] for d in datasets}),
    }
    if human.get("language"):
        front["language"] = human["language"]
    if human.get("finetuned_from"):
        front["base_model"] = human["finetuned_from"]
    return {
        "name": name, "version": version, "date": date or MORE_INFO, "fields": fields,
        "labels": MODEL_CARD_FIELDS, "missing": missing, "n_missing": len(missing), "n_fields": len(MODEL_CARD_FIELDS),
        "facts": [{"label": k, "value": v} for k, v in facts_rows], "metrics": metrics, "importance": importance,
        "explanation": explanation, "datasets": datasets, "requirements": facts.requirements,
        "front_matter": yaml.safe_dump(front, sort_keys=False, allow_unicode=True), "mct": mct,
        "detail_keys": ["developed_by", "funded_by", "shared_by", "model_type", "language", "license",
                        "finetuned_from", "repository", "paper"],
        "html_sections": [
            {"title": "Uses", "fields": ["direct_use", "downstream_use", "out_of_scope_use", "users"],
             "datasets": False, "metrics": False},
            {"title": "Bias, Risks, and Limitations",
             "fields": ["bias_risks_limitations", "recommendations", "ethical_considerations"],
             "datasets": False, "metrics": False},
            {"title": "Training Details", "fields": ["training_data", "training_procedure", "preprocessing"],
             "datasets": True, "metrics": False},
            {"title": "Evaluation", "fields": ["testing_data", "factors"], "datasets": False, "metrics": True},
        ],
        "html_sections_end": [
            {"title": "Environmental Impact", "fields": ["environmental_impact"]},
            {"title": "Technical Specifications", "fields": ["compute_infrastructure"]},
            {"title": "More Information", "fields": ["citation", "glossary", "more_information", "authors", "contact"]},
        ],
        "more_info": MORE_INFO, "uri": facts.uri or "not provided", "architecture": arch_text, "generator": f"mlflow-governance {__version__}",
    }


def render_model_card(card: dict[str, Any]) -> dict[str, bytes]:
    """``model_card.md``, ``model_card.json`` and ``model_card.html`` as bytes."""
    from governance.report.render import environment

    md_env = environment().overlay(autoescape=False, finalize=_md_escape)
    md_body = md_env.get_template("model_card.md.j2").render(card=card)
    md = "---\n" + card["front_matter"] + "---\n\n" + md_body
    html = render_template("model_card.html.j2", {"card": card})
    js = json.dumps(card["mct"], indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n"
    return {"model_card.md": md.encode("utf-8"), "model_card.json": js.encode("utf-8"),
            "model_card.html": html.encode("utf-8")}
