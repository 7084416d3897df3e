"""Output writers, separate from the computation: per-sample parquet streams, JSON documents, plots.

Per-sample rows are Arrow tables built from a ``BatchResult`` (``reason_code_table`` here, the
modality's own tables in ``Modality.sample_tables``) and streamed one row group per batch; the
same tables are what a Spark executor returns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from governance.stage.batch import BatchResult
from governance.stage.documents import StageDocuments
from governance.stage.state import StageState


def json_safe(obj: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, NaN/inf to None, keys to str."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def write_json(path: Path, doc: Any) -> Path:
    """Deterministic JSON (sorted keys, 2-space indent, no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(doc), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


class ParquetStream:
    """Append Arrow tables to one parquet file, one row group per table."""

    def __init__(self, path: Path) -> None:
        self.path, self.writer = path, None

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            strings = [f.name for f in table.schema if str(f.type) == "string"]
            # dictionary-encode the unit names in the reason codes, never the float columns
            # no column statistics: nothing filters these files by value, and min/max per
            # column and row group cost a quarter of the write
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="snappy",
                                           use_dictionary=strings or False, write_statistics=False)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class SampleWriters:
    """One :class:`ParquetStream` per per-sample file under ``out_dir`` (opened on first use)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.streams: dict[str, ParquetStream] = {}

    def write(self, tables: Mapping[str, Any]) -> None:
        for name, table in tables.items():
            if name not in self.streams:
                self.streams[name] = ParquetStream(self.out_dir / name)
            self.streams[name].write(table)

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


def reason_code_table(result: BatchResult, dictionary: Mapping[str, str]) -> Any:
    """``reason_codes.parquet`` rows of one batch (columns: see docs/contracts.md)."""
    import pyarrow as pa

    names = pa.array(list(result.primary.unit_names), pa.string())
    texts = pa.array([dictionary.get(f, f) for f in result.primary.unit_names], pa.string())

    def strings(values: Any, idx: np.ndarray) -> Any:  # unit index -> its text, -1 -> null (in C++)
        return values.take(pa.array(np.where(idx >= 0, idx, 0), pa.int32(), mask=idx < 0))

    cols: dict[str, Any] = {"sample_id": pa.array(result.sample_ids), "prediction": pa.array(result.decisions),
                            "score": pa.array(result.scores)}
    for label, (idx, _) in result.reasons.items():
        ok = idx >= 0
        offsets = np.concatenate([[0], np.cumsum(ok.sum(1))]).astype(np.int32)
        cols[label] = pa.ListArray.from_arrays(pa.array(offsets), strings(names, idx[ok]))
    for label, (idx, mag) in result.reasons.items():
        for j in range(idx.shape[1]):
            empty = idx[:, j] < 0
            cols[f"{label}_{j + 1}"] = strings(names, idx[:, j])
            cols[f"{label}_{j + 1}_share"] = pa.array(mag[:, j], pa.float64(), mask=empty)
            cols[f"{label}_{j + 1}_text"] = strings(texts, idx[:, j])
    return pa.table(cols)


def write_documents(docs: StageDocuments, out_dir: Path) -> None:
    """``global_importance.json`` / ``.parquet``, ``layer_ranking.json``, ``stability.json``."""
    write_json(out_dir / "global_importance.json", docs.global_importance)
    docs.table.to_parquet(out_dir / "global_importance.parquet", index=False)
    write_json(out_dir / "layer_ranking.json", docs.layer_ranking)
    write_json(out_dir / "stability.json", docs.stability)


def sample_shares(state: StageState, units: list[str], mode: str) -> pd.DataFrame | None:
    """Signed shares of ``units`` for the reservoir's samples in ``mode`` (None without them)."""
    rel = state.reservoir.columns.get(f"relevance/{mode}")
    all_units = state.settings.units
    if rel is None or all_units is None:
        return None
    l1 = np.abs(rel).sum(1)
    shares = rel / np.where(l1 > 0, l1, 1.0)[:, None]
    index = {u: i for i, u in enumerate(all_units)}
    return pd.DataFrame({u: shares[:, index[u]] for u in units})


def with_direction(table: pd.DataFrame, gi: Mapping[str, Any], mode: str) -> pd.DataFrame:
    """``table`` with the ``direction`` of each feature in ``mode`` (global_importance.json), which
    the importance plot colours by; unchanged when the document has none."""
    feats = ((gi.get("modes") or {}).get(mode) or {}).get("features") or []
    direction = {f["feature"]: f["direction"] for f in feats if f.get("direction")}
    if not direction:
        return table
    return table.assign(direction=[direction.get(f) for f in table["feature"]])


def write_plots(docs: StageDocuments, state: StageState, plot_dir: Path) -> None:
    """The stage's PNGs: importance, importance by mode, per-sample shares, layer ranking."""
    from governance import plots

    primary = state.settings.primary_mode
    table = with_direction(docs.tables[primary], docs.global_importance, primary)
    plots.importance_bar(table, plot_dir / "global_importance.png",
                         title=f"Global importance ({primary} mode, top {min(20, len(table))})")
    if len(docs.tables) > 1:
        plots.mode_comparison(docs.tables, plot_dir / "importance_by_mode.png")
    top = list(table.sort_values("rank")["feature"].head(12))
    shares = sample_shares(state, top, primary)
    if shares is not None and len(shares):
        plots.share_distribution(shares, plot_dir / "feature_distribution.png",
                                 title=f"Per-sample shares of the top {len(top)} features ({primary} mode, "
                                       f"{len(shares):,} sampled rows)")
    layers = docs.layer_ranking.get("layers")
    if layers:
        plots.layer_ranking_bar(layers, plot_dir / "layer_ranking.png", title=f"Layer ranking ({primary} mode)")
