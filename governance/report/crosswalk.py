"""Regulatory crosswalk: which report section answers which requirement.

References are to: Regulation (EU) 2024/1689 (AI Act) Annex IV technical documentation items,
Art. 13 (transparency and information to deployers) and Art. 86 (right to explanation of
individual decision-making); US Federal Reserve / OCC SR 11-7 supervisory guidance on model risk
management (and SR 26-2, which the model-risk team applies alongside it); ECOA Regulation B,
12 CFR 1002.9 (statement of specific reasons for adverse action, Official Staff Commentary
9(b)(2)) and 1002.12 (record retention); GDPR Art. 22 (automated individual decision-making) and
Art. 15(1)(h) (meaningful information about the logic involved).
"""

from __future__ import annotations

COLUMNS = (
    "EU AI Act (Annex IV, Art. 13, Art. 86)",
    "SR 11-7 / SR 26-2 model risk management",
    "ECOA Regulation B",
    "GDPR Art. 22 / 15(1)(h)",
)

#: section id -> one cell per column ("" = the section does not address that framework).
CROSSWALK: dict[str, tuple[str, str, str, str]] = {
    "cover": (
        "Annex IV 1(a) provider, version and relation to previous versions; "
        "Annex IV 2(g) test reports dated and signed by responsible persons",
        "Governance, policies and controls: model inventory, documentation, approval and sign-off",
        "",
        "",
    ),
    "system": (
        "Annex IV 1(a) intended purpose; 1(c) software versions; 2(b) general logic and design "
        "choices; 2(c) system architecture; Art. 13(3)(b)(i) intended purpose",
        "Model development: purpose, design, theory and logic; intended use and limits of use",
        "",
        "Art. 15(1)(h) meaningful information about the logic involved (system level)",
    ),
    "data": (
        "Annex IV 2(d) data requirements, provenance and cleaning; Annex IV 3 input data "
        "specifications; Art. 13(3)(b)(vi) information about input data",
        "Model development: data quality, relevance and representativeness",
        "",
        "",
    ),
    "performance": (
        "Annex IV 2(g) validation and testing, metrics for accuracy and robustness; Annex IV 3 "
        "degrees of accuracy; Annex IV 4 appropriateness of metrics; Art. 13(3)(b)(ii)",
        "Model validation: outcomes analysis, benchmarking",
        "",
        "",
    ),
    "explainability": (
        "Annex IV 2(b) general logic; Annex IV 3 capabilities and limitations; Art. 13(3)(b)(iv) "
        "capabilities to explain the output; Art. 13(3)(b)(vii) interpretation of the output",
        "Model validation: evaluation of conceptual soundness, sensitivity analysis, effective challenge",
        "Basis for identifying the principal reasons (factors actually scored)",
        "Art. 15(1)(h) logic involved, significance and envisaged consequences",
    ),
    "decisions": (
        "Art. 86 right to explanation of individual decision-making; Art. 13(3)(b)(vii)",
        "Ongoing monitoring: review of individual outcomes",
        "12 CFR 1002.9(a)(2), (b)(2): specific principal reasons for adverse action; "
        "Official Staff Commentary 9(b)(2)-1 (no more than four reasons)",
        "Art. 22(3) right to obtain human intervention and to contest; Art. 15(1)(h)",
    ),
    "risks": (
        "Annex IV 2(e) human oversight measures (Art. 14); Annex IV 3 foreseeable unintended "
        "outcomes and risks; Annex IV 5 risk management (Art. 9); Art. 13(3)(b)(iii), 13(3)(d)",
        "Model limitations, compensating controls, effective challenge",
        "",
        "Art. 22(3) suitable safeguards, human intervention",
    ),
    "changes": (
        "Annex IV 1(a) relation to previous versions; Annex IV 2(f) pre-determined changes; "
        "Annex IV 6 changes through the lifecycle; Art. 13(3)(c)",
        "Ongoing monitoring and change control; revalidation after material change",
        "",
        "",
    ),
    "appendix": (
        "Annex IV 2(g) test logs; Annex IV 1(c) software versions; record-keeping (Art. 12)",
        "Documentation sufficient for a knowledgeable third party to understand and replicate",
        "12 CFR 1002.12 preservation of records",
        "",
    ),
}


def crosswalk_rows(sections: list[dict[str, str]]) -> list[dict[str, object]]:
    """One row per report section (number, title, the four framework cells)."""
    rows = []
    for s in sections:
        cells = CROSSWALK.get(s["id"], ("", "", "", ""))
        rows.append({"number": s["number"], "title": s["title"],
                     "cells": [c or "not addressed by this section" for c in cells]})
    return rows
