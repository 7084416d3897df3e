"""Risk flags a modality raises from its own block of ``global_importance.json`` (one entry per
modality in :data:`FLAGS`: ``"module:function"``, the function taking the document and
returning a flag dict or None)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

FLAGS: dict[str, str] = {
    "image": "governance.report.sections.explainability.image_maps:risk_flag",
}


def modality_flags(gi: dict[str, Any]) -> list[dict[str, str]]:
    """The flags of the run's modality (none for a modality without an entry)."""
    ref = FLAGS.get(str(gi.get("modality")))
    if ref is None:
        return []
    module, fn = ref.split(":")
    flag = getattr(import_module(module), fn)(gi)
    return [flag] if flag else []
