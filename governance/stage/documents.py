"""The stage's documents, computed from a (merged) :class:`StageState` only.

``global_importance``, ``layer_ranking``, ``stability`` and ``reason_code_leaders`` depend on
nothing but the state, so the streaming runner and the Spark driver write the same documents
for the same rows, whatever the batching or partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from governance.aggregate import (
    Directions,
    column_spearman,
    global_importance_document,
    layer_ranking_document,
    stability_document,
)
from governance.stage.state import StageState


def directions(state: StageState) -> dict[str, Directions]:
    """Per mode, the Spearman correlation between each unit's input value and its signed
    relevance over the reservoir's samples, overall and per predicted class. Empty (every unit
    without a single value) when the modality's units have no input value of their own."""
    res = state.reservoir
    units = state.settings.units
    values = res.columns.get("unit_values", res.columns.get("inputs"))
    if units is None or values is None or values.ndim != 2 or values.shape[1] != len(units):
        return {}
    pred = res.columns.get("prediction")
    groups: dict[str, np.ndarray] = {"all": np.ones(len(res), dtype=bool)}
    if pred is not None:
        for c in sorted(np.unique(pred).tolist(), key=str):
            groups[str(c)] = pred == c
    out = {}
    for mode in state.settings.modes:
        rel = res.columns[f"relevance/{mode}"]
        d = Directions()
        for key, mask in groups.items():
            rho = column_spearman(values[mask], rel[mask])
            d.rho[key] = {u: (float(r) if np.isfinite(r) else None) for u, r in zip(units, rho)}
            d.n[key] = int(mask.sum())
        out[mode] = d
    return out


@dataclass
class StageDocuments:
    """The documents of one stage run: ``global_importance`` (+ its long ``table``),
    ``layer_ranking``, ``stability`` and the per-mode importance tables the plots draw."""

    global_importance: dict[str, Any]
    table: pd.DataFrame
    layer_ranking: dict[str, Any]
    stability: dict[str, Any]
    tables: dict[str, pd.DataFrame]


def reason_code_leaders(state: StageState) -> dict[str, dict[str, int]]:
    """How often each unit leads the supporting / adverse reason codes."""
    return state.leaders.leaders()


def documents(state: StageState) -> StageDocuments:
    """Every document of the stage from ``state``."""
    s = state.settings
    accs = state.importance.modes
    dirs = directions(state)
    gi, table = global_importance_document(accs, s.primary_mode, modality=s.modality,
                                           directions={m: dirs.get(m, Directions()) for m in accs} if dirs
                                           else {m: None for m in accs})
    if s.units is not None:
        gi["feature_columns"] = list(s.units)
    gi["reason_code_leaders"] = reason_code_leaders(state)
    tables = {m: accs[m].table() for m in [s.primary_mode] + [m for m in s.modes if m != s.primary_mode]}
    return StageDocuments(
        global_importance=gi, table=table,
        layer_ranking=layer_ranking_document(state.layers.modes, s.primary_mode),
        stability=stability_document(accs, s.primary_mode, s.seed),
        tables=tables,
    )
