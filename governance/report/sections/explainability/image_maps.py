"""Part: images (``modality: image``): the mean relevance heatmaps overall and per predicted
class that the stage logged, and the concentration block (top pixels, border, fixed region)."""

from __future__ import annotations

from typing import Any

from governance.report import plots
from governance.report.evidence import EXPLANATIONS
from governance.report.format import fnum, ftext
from governance.report.inputs import ReportInputs


def build(inp: ReportInputs) -> dict[str, Any] | None:
    """None unless the run explained images."""
    gi = inp.ev.global_importance
    block = gi.get("image")
    if gi.get("modality") != "image" or not isinstance(block, dict):
        return None
    heat = inp.ev.root / EXPLANATIONS / "heatmaps"
    task = block.get("task") if isinstance(block.get("task"), dict) else {}
    per = "mask's dominant class" if task.get("name") == "segmentation" else "predicted class"
    maps = []
    for p in sorted(heat.glob("*.png")) if heat.is_dir() else []:
        label = "all samples" if p.stem == "mean" else f"{per} {p.stem.removeprefix('class_')}"
        maps.append({"name": label, "src": plots.data_uri(p.read_bytes()),
                     "alt": f"Mean share of |relevance| per pixel, {label}"})
    rule = block.get("fixed_region_rule") or {}
    rows = [
        ("Image size (H x W, channels)", f"{ftext(block.get('height'))} x {ftext(block.get('width'))}, "
                                         f"{ftext(block.get('channels'))}"),
        ("Region grid (rows x cols)", " x ".join(ftext(v) for v in block.get("grid") or [])),
        (f"Share of |relevance| on the top {fnum(100 * float(block.get('top_pixels', 0.05)), 0)}% of pixels",
         fnum(block.get("top_pixel_share"))),
        ("Share of |relevance| on the image border", fnum(block.get("border_share"))),
        ("Region with the largest mean share", ftext(block.get("leading_region"))),
        ("Fixed region (possible shortcut)", "YES: " + ftext(block.get("fixed_region_name")) + " in "
         + fnum(100 * float(block.get("fixed_region_samples") or 0), 0) + "% of the samples of "
         + ("all classes" if block.get("fixed_region_group") == "all" else
            f"predicted class {ftext(block.get('fixed_region_group'))}") if block.get("fixed_region") else "no"),
        ("Fixed-region rule", f"one region holds at least {fnum(rule.get('share'))} of a sample's |relevance| in at "
                              f"least {fnum(rule.get('fraction'))} of the samples (overall or of one class)"),
    ]
    if task:
        means = task.get("mean_prediction") or {}
        rows[:0] = [("Task explained", f"{ftext(task.get('name'))}: {ftext(task.get('explained'))}"),
                    ("Mean prediction per sample", ", ".join(f"{ftext(k)} {fnum(v)}" for k, v in means.items()))]
        rows.append(("Skipped (does not apply to this task)",
                     "; ".join(f"{ftext(k)}: {ftext(v)}" for k, v in (task.get("skipped") or {}).items())))
    return {"image_maps": {"maps": maps, "rows": [{"name": a, "value": b} for a, b in rows],
                           "fixed": bool(block.get("fixed_region"))}}


def risk_flag(gi: dict[str, Any]) -> dict[str, str] | None:
    """The report's risk flag for a fixed region (a possible shortcut), else None."""
    block = gi.get("image") if gi.get("modality") == "image" else None
    if not isinstance(block, dict) or not block.get("fixed_region"):
        return None
    group = block.get("fixed_region_group")
    who = "of all samples" if group == "all" else f"of the samples predicted as class {group}"
    return {"severity": "high", "text": f"Image region {block.get('fixed_region_name')} holds a large share of the "
            f"relevance in {fnum(100 * float(block.get('fixed_region_samples') or 0), 0)}% {who}: the model may rely "
            "on a fixed-position shortcut (a watermark, a ruler, a scanner tag). Inspect the heatmaps before "
            "approval."}
