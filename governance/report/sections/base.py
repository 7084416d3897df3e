"""The two registry entries of the report: a section (a numbered chapter) and a part of one.

A section is ``Section(id, title, build, template)``: ``build`` turns the shared
:class:`~governance.report.inputs.ReportInputs` into the section's context (a dict of prepared
strings), and ``template`` is the jinja2 partial that prints it. A part of the explainability
section is ``Part(id, build, template)``; its ``build`` returns the keys it adds to the section's
context, or ``None`` when the part does not apply to the run (e.g. image heatmaps for a table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from governance.report.inputs import ReportInputs

Builder = Callable[[ReportInputs], dict[str, Any]]
PartBuilder = Callable[[ReportInputs], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Section:
    """One numbered chapter of the audit report."""

    id: str
    title: str
    build: Builder
    template: str


@dataclass(frozen=True)
class Part:
    """One block of a section (rendered in table order when ``build`` returns a dict)."""

    id: str
    build: PartBuilder
    template: str
