"""Section 5: explainability, assembled from parts registered in :data:`PARTS` (in print order).

A part adds a block to the section: ``Part(id, build, template)``. ``build`` returns the keys it
adds to the section's context (``x`` in the templates) or ``None`` when it does not apply to the
run; ``template`` is its partial under ``templates/sections/explainability/``. A modality-specific
view (mean heatmaps of images, word tables of texts) is one new module here plus one line below.
"""

from __future__ import annotations

from typing import Any

from governance.report.inputs import ReportInputs
from governance.report.sections.base import Part
from governance.report.sections.explainability import (
    examples,
    image_maps,
    importance,
    layers,
    limitations,
    method,
    quality,
    stability,
    word_tables,
)

PARTS: tuple[Part, ...] = (
    Part("method", method.build, "sections/explainability/method.html.j2"),
    Part("importance", importance.build_global, "sections/explainability/importance.html.j2"),
    Part("modes", importance.build_modes, "sections/explainability/modes.html.j2"),
    Part("distribution", importance.build_distribution, "sections/explainability/distribution.html.j2"),
    Part("per_class", importance.build_per_class, "sections/explainability/per_class.html.j2"),
    Part("image_maps", image_maps.build, "sections/explainability/image_maps.html.j2"),
    Part("word_tables", word_tables.build, "sections/explainability/word_tables.html.j2"),
    Part("layers", layers.build, "sections/explainability/layers.html.j2"),
    Part("stability", stability.build, "sections/explainability/stability.html.j2"),
    Part("quality", quality.build, "sections/explainability/quality.html.j2"),
    Part("examples", examples.build, "sections/explainability/examples.html.j2"),
    Part("limitations", limitations.build, "sections/explainability/limitations.html.j2"),
)


def build(inp: ReportInputs) -> dict[str, Any]:
    """Every applicable part's keys, and the list of parts to print (``parts``)."""
    out: dict[str, Any] = {"parts": []}
    for part in PARTS:
        data = part.build(inp)
        if data is None:
            continue
        clash = set(data) & set(out)
        if clash:
            raise ValueError(f"report part {part.id!r} redefines {sorted(clash)}")
        out.update(data)
        out["parts"].append({"id": part.id, "template": part.template})
    return out
