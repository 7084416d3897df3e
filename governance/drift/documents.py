"""The files of a comparison: ``drift.json`` and the plot of the largest shifts (``drift.png``)."""

from __future__ import annotations

from pathlib import Path

from governance.drift.compare import DriftResult
from governance.stage.writers import write_json

#: The comparison's folder in a run's artifacts (under ``governance/``).
DRIFT_DIR = "drift"
DRIFT_JSON = "drift.json"
DRIFT_PLOT = "drift.png"


def write_drift(result: DriftResult, out_dir: Path) -> list[Path]:
    """Write ``drift.json`` and ``drift.png`` into ``out_dir``; returns their paths."""
    from governance import plots

    doc = result.to_dict()
    paths = [write_json(out_dir / DRIFT_JSON, doc)]
    kind = "paired" if result.paired else "unpaired"
    paths.append(plots.drift_shifts(doc["units"], out_dir / DRIFT_PLOT,
                                    title=f"Largest importance shifts ({kind}, {result.confidence:.0%} interval): "
                                          f"{result.verdict}"))
    return paths
