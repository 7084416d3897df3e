"""One side of an explanation-drift comparison, from a stage state or from an explain run's files.

A :class:`Side` holds what the comparison needs of one explanation: per unit the importance
(mean |share|) with its Poisson-bootstrap replicates, the direction, the layer shares, the
reason-code leaders and, per sample, the top supporting reason. Both constructors compute the
replicates the same way (weights keyed by (seed, sample id), ``governance.stage.keys``), so a
side built from a live :class:`~governance.stage.state.StageState` and one built from the
``local_relevance.parquet`` of a run over the same rows hold the same numbers; and two sides over
the same sample ids with the same seed carry the same weight per sample and replicate, which is
what makes the paired interval a bootstrap of per-sample differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from governance.aggregate import decision_direction, l1_normalise, top_reasons
from governance.stage.keys import poisson_weights, sample_keys

#: Columns of ``local_relevance.parquet`` that are not units (docs/contracts.md).
NON_UNIT_COLUMNS = ("sample_id", "prediction", "score", "target", "relevance_l1")


@dataclass
class Side:
    """One explanation, reduced to what a comparison reads (see the module docstring)."""

    label: str
    units: list[str]
    importance: np.ndarray  # (U,) mean |share|
    replicates: np.ndarray  # (B, U) bootstrap replicate means of |share|
    weight_totals: np.ndarray  # (B,) total weight per replicate: a fingerprint of the sample ids
    n_samples: int
    directions: dict[str, str]
    layer_shares: dict[str, float]
    leaders: dict[str, dict[str, int]]
    reason_keys: np.ndarray | None = None  # (n,) sample keys, sorted, of the samples below
    top_reason: np.ndarray | None = None  # (n,) unit index of each sample's top supporting reason (-1: none)
    n_reason_samples: int = 0
    source: dict[str, Any] = field(default_factory=dict)


def _directions(gi: Mapping[str, Any]) -> dict[str, str]:
    return {str(f["feature"]): str(f.get("direction") or "mixed") for f in gi.get("features", [])}


def _layer_shares(layer_ranking: Mapping[str, Any] | None) -> dict[str, float]:
    return {str(r["module"]): float(r["share"]) for r in (layer_ranking or {}).get("layers", [])
            if r.get("share") is not None}


def _top_reasons(task: str, relevance: np.ndarray, prediction: np.ndarray | None,
                 score: np.ndarray) -> np.ndarray:
    """Each sample's top supporting reason (unit index, -1 when none), as the reason codes of the
    signed/default modes define it (``governance.aggregate.top_reasons``)."""
    shares = l1_normalise(relevance)
    direction = decision_direction(task, np.asarray(score, dtype=np.float64).reshape(len(shares), -1), prediction)
    return top_reasons(shares, direction, top_n=1)["supporting"][0][:, 0]


def _sorted_reasons(keys: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    return keys[order], top[order]


def side_from_state(state: Any, label: str, *, global_importance: Mapping[str, Any] | None = None,
                    layer_ranking: Mapping[str, Any] | None = None, source: Mapping[str, Any] | None = None) -> Side:
    """A side from a stage state (``governance.stage.state.StageState``) and, when already at
    hand, its documents (else computed from the state)."""
    if global_importance is None or layer_ranking is None:
        from governance.stage.documents import documents

        docs = documents(state)
        global_importance, layer_ranking = docs.global_importance, docs.layer_ranking
    s = state.settings
    acc = state.importance.modes[s.primary_mode]
    units = list(acc.feature_names)
    boot = acc.boot_sum / np.maximum(acc.boot_weight, 1e-12)[:, None]
    mean_abs = acc.overall.stats()[0]
    res = state.reservoir
    keys = top = None
    rel = res.columns.get(f"relevance/{s.primary_mode}")
    if rel is not None and len(res):
        keys, top = _sorted_reasons(np.asarray(res.keys, dtype=np.uint64),
                                    _top_reasons(s.task, rel, res.columns.get("prediction"), res.columns["score"]))
    return Side(label=label, units=units, importance=np.asarray(mean_abs, dtype=np.float64), replicates=boot,
                weight_totals=np.asarray(acc.boot_weight, dtype=np.float64), n_samples=int(acc.n_samples),
                directions=_directions(global_importance), layer_shares=_layer_shares(layer_ranking),
                leaders=dict(global_importance.get("reason_code_leaders") or {}), reason_keys=keys, top_reason=top,
                n_reason_samples=0 if keys is None else len(keys), source=dict(source or {}))


def side_from_samples(frames: Iterable[pd.DataFrame], label: str, *, task: str, seed: int, n_bootstrap: int,
                      global_importance: Mapping[str, Any], layer_ranking: Mapping[str, Any] | None,
                      source: Mapping[str, Any] | None = None) -> Side:
    """A side from an explain run's per-sample rows (``local_relevance.parquet``: sample_id,
    prediction, score, then one raw relevance column per unit), given as consecutive frames so
    that memory stays bounded by one frame, and the run's documents. The bootstrap replicates are
    recomputed with weights keyed by (``seed``, sample id)."""
    units: list[str] | None = None
    n = 0
    abs_sum = boot = None
    totals = np.zeros(n_bootstrap)
    keys_parts, tops = [], []
    for block in frames:
        if units is None:
            units = [c for c in block.columns if c not in NON_UNIT_COLUMNS]
            if not units or "sample_id" not in block.columns:
                raise ValueError("local_relevance.parquet has no sample_id or no unit columns")
            abs_sum, boot = np.zeros(len(units)), np.zeros((n_bootstrap, len(units)))
        if not len(block):
            continue
        rel = block[units].to_numpy(dtype=np.float64)
        a = np.abs(l1_normalise(rel))
        keys = sample_keys(block["sample_id"].to_numpy())
        w = poisson_weights(keys, seed, n_bootstrap)
        abs_sum += a.sum(0)
        boot += w @ a
        totals += w.sum(1)
        n += len(block)
        pred = block["prediction"].to_numpy() if "prediction" in block.columns else None
        keys_parts.append(keys)
        tops.append(_top_reasons(task, rel, pred, block["score"].to_numpy()))
    if units is None or abs_sum is None or boot is None:
        raise ValueError("local_relevance.parquet holds no rows")
    all_keys = np.concatenate(keys_parts) if keys_parts else np.zeros(0, dtype=np.uint64)
    keys, top = _sorted_reasons(all_keys, np.concatenate(tops) if tops else np.zeros(0, dtype=np.int64))
    return Side(label=label, units=units, importance=abs_sum / max(n, 1),
                replicates=boot / np.maximum(totals, 1e-12)[:, None], weight_totals=totals, n_samples=n,
                directions=_directions(global_importance), layer_shares=_layer_shares(layer_ranking),
                leaders=dict(global_importance.get("reason_code_leaders") or {}), reason_keys=keys, top_reason=top,
                n_reason_samples=n, source=dict(source or {}))
