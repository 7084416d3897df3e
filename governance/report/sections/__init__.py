"""The report's sections, in print order: one row per section in :data:`SECTIONS`.

A new section is one module here (its ``build``) plus its partial under ``templates/sections/``
and one row below; numbering, the table of contents, running headers and the regulatory
crosswalk (by section id, :mod:`governance.report.crosswalk`) follow the table.
"""

from __future__ import annotations

from governance.report.sections import (
    appendix,
    changes,
    cover,
    data,
    decisions,
    explainability,
    performance,
    risks,
    system,
)
from governance.report.sections.base import Part, Section

SECTIONS: tuple[Section, ...] = (
    Section("cover", "Cover and control block", cover.build, "sections/cover.html.j2"),
    Section("system", "System description", system.build, "sections/system.html.j2"),
    Section("data", "Data and data quality", data.build, "sections/data.html.j2"),
    Section("performance", "Performance", performance.build, "sections/performance.html.j2"),
    Section("explainability", "Explainability", explainability.build, "sections/explainability.html.j2"),
    Section("decisions", "Individual decisions", decisions.build, "sections/decisions.html.j2"),
    Section("risks", "Risks, limitations and human oversight", risks.build, "sections/risks.html.j2"),
    Section("changes", "Change log", changes.build, "sections/changes.html.j2"),
    Section("appendix", "Appendix", appendix.build, "sections/appendix.html.j2"),
)

__all__ = ["Part", "SECTIONS", "Section"]
