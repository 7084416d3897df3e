"""Part: example inputs with their relevance (image heatmaps, token highlights), logged figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from governance.report import plots
from governance.report.format import fnum, ftext, not_provided
from governance.report.inputs import ReportInputs
from governance.report.evidence import RunEvidence
from governance.report.options import ReportError


def examples(ev: RunEvidence) -> dict[str, Any]:
    """Heatmaps of example images and token highlights of example texts."""
    out: dict[str, Any] = {"images": [], "texts": []}
    im = ev.image_examples
    if im is not None:
        x, r = np.asarray(im["inputs"]), np.asarray(im["relevance"])
        labels = im.get("predictions", im.get("labels"))
        ids = im.get("ids")
        for i in range(min(6, len(x))):
            title = f"relevance, prediction {labels[i]}" if labels is not None else "relevance"
            out["images"].append({
                "id": str(ids[i]) if ids is not None else str(i),
                "src": plots.data_uri(plots.heatmap(x[i], r[i], title)),
                "alt": f"Input image {ids[i] if ids is not None else i} and its relevance heatmap",
            })
    if ev.text_examples:
        for i, ex in enumerate(ev.text_examples[:6]):
            toks, rel = list(ex.get("tokens") or []), [float(v) for v in (ex.get("relevance") or [])]
            bound = max((abs(v) for v in rel), default=0.0) or 1.0
            spans = []
            if len(toks) != len(rel):
                raise ReportError(f"examples/texts.json entry {i}: {len(toks)} tokens but {len(rel)} relevance values")
            for t, v in zip(toks, rel, strict=True):
                a = min(abs(v) / bound, 1.0) * 0.85
                color = (192, 80, 77) if v > 0 else (31, 78, 121)
                spans.append({"token": str(t), "style": f"background-color: rgba({color[0]}, {color[1]}, "
                              f"{color[2]}, {a:.3f})", "title": f"relevance {fnum(v)}"})
            out["texts"].append({"id": ftext(ex.get("id", i)), "prediction": ftext(ex.get("prediction")),
                                 "spans": spans})
    out["images_missing"] = None if out["images"] else not_provided(
        "the run logged no example images with relevance (explanations/examples/images.npz)")
    out["texts_missing"] = None if out["texts"] else not_provided(
        "the run logged no example texts with token relevance (explanations/examples/texts.json)")
    return out


def build(inp: ReportInputs) -> dict[str, Any]:
    """Examples, and the PNGs the explanation stage logged."""
    return {"examples": examples(inp.ev),
            "plots": [{"name": name, "src": plots.data_uri(data), "alt": f"Figure {name} logged by the explanation stage"}
                      for name, data in sorted(inp.ev.plots.items())]}
