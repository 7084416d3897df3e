"""Tables: one explanation unit per feature column, the model input a float32 (n, F) matrix.

Sources: a parquet or CSV file, a folder of them read as one dataset, a pandas DataFrame, or
``mlflow-dataset:<run-id>/<name>`` (``governance.data.open_table``). The contract comes from the
config, else from the model's logged training data, else from the validation data's own schema
(then it is not independent of the data it checks). Sample ids are the rows' 0-based positions,
or the values of ``id_column``: integers, or any other value hashed as text (``stage.keys``).
Per-sample file: ``local_relevance.parquet`` (one float32 column of raw primary-mode relevance
per feature).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pandas as pd

from governance.data import TableSource, open_table
from governance.modality.base import InputBatch, InputNotReadable, Modality, ModalityPlan, UnitRelevance
from governance.stage.batch import BatchResult, StageError
from governance.validation import derive_contract, feature_checks

RESERVED_COLUMNS = ("sample_id", "prediction", "score", "target", "relevance_l1")
SCHEMA_NOTE = ("the contract was derived from the validation data's own schema: it checks column names and "
               "types, not the data's distribution, so it is not independent of the data it checks")


def feature_columns(columns: list[str], cfg: Any) -> list[str]:
    """The configured feature columns, else every column but the target and the id column."""
    if cfg.feature_columns:
        return list(cfg.feature_columns)
    cols = [str(c) for c in columns if c not in (cfg.target_column, cfg.id_column)]
    clash = [c for c in cols if c in RESERVED_COLUMNS]
    if clash:
        raise StageError(f"column name(s) {clash} are reserved; list feature_columns in the config")
    return cols


def build_contract(cfg: Any, handle: Any, columns: list[str]) -> tuple[list[dict[str, Any]], str, list[str]]:
    """The contract, where it came from, and the feature columns.

    Config expectations, else a contract derived from the model's training data (whose columns,
    less the target, are then the features the model expects), else the validation data's own
    schema; the feature checks are always included."""
    if cfg.expectations:
        names = feature_columns(columns, cfg)
        return feature_checks(names) + [dict(e) for e in cfg.expectations], "config", names
    from governance.tracking import training_frame

    found = training_frame(handle) if getattr(handle, "source_run_id", None) else None
    if found is not None:
        train, where = found
        names = list(cfg.feature_columns) if cfg.feature_columns else feature_columns(list(train.columns), cfg)
        if all(c in train.columns for c in names):
            return derive_contract(train, names), where, names
    names = feature_columns(columns, cfg)
    return feature_checks(names), "validation data schema", names


def sample_ids(frame: pd.DataFrame, id_column: str | None) -> np.ndarray:
    """The rows' ids: their global positions, or the id column (integers kept, others as text)."""
    if id_column is None:
        return frame.index.to_numpy(dtype=np.int64)
    s = frame[id_column]
    if s.isna().any():
        raise StageError(f"id_column '{id_column}' has missing values; every row needs an id")
    if pd.api.types.is_integer_dtype(s) or pd.api.types.is_bool_dtype(s):
        return s.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(s):
        v = s.to_numpy(dtype=np.float64)
        if np.all(v == np.round(v)):
            return v.astype(np.int64)
        raise StageError(f"id_column '{id_column}' holds non-integer numbers; use integer or text ids")
    return s.astype(str).to_numpy(dtype=object)


class TabularModality(Modality):
    """Feature tables (see the module docstring)."""

    name = "tabular"
    quality_kind = "tabular"
    unit_noun = "feature"
    fixed_units = True

    def open(self, data: Any, *, source: str | None = None) -> TableSource:
        return open_table(data, source=source)

    def plan(self, table: TableSource, handle: Any) -> ModalityPlan:
        cfg = self.cfg
        columns = table.columns
        if cfg.id_column is not None and cfg.id_column not in columns and columns:
            raise StageError(f"id_column '{cfg.id_column}' is not a column of the data (it has {columns[:10]}"
                             f"{' ...' if len(columns) > 10 else ''})")
        expectations, source, names = build_contract(cfg, handle, columns)
        read = list(names)
        for extra in (cfg.target_column, cfg.id_column):
            if extra and extra in columns and extra not in read:
                read.append(extra)
        independent = source != "validation data schema"
        return ModalityPlan(units=names, columns=read, expectations=expectations, contract_source=source,
                            independent=independent, notes=[] if independent else [SCHEMA_NOTE])

    def batches(self, table: TableSource, plan: ModalityPlan, batch_size: int) -> Iterator[InputBatch]:
        for frame in table.iter_frames(batch_size, plan.columns):
            yield self.input_batch(frame, plan)

    def input_batch(self, frame: pd.DataFrame, plan: ModalityPlan) -> InputBatch:
        """One frame of ``plan.columns`` as model inputs; its index holds the rows' global
        positions (the sample ids unless ``id_column`` is set). What a Spark executor calls on
        each Arrow batch (converted to pandas, with an id column: partitions know no positions)."""
        target = self.cfg.target_column
        try:
            x = np.ascontiguousarray(frame[plan.units or []].to_numpy(dtype=np.float32))
        except (ValueError, TypeError) as exc:
            raise InputNotReadable(f"rows {frame.index[0]}..{frame.index[-1]} cannot become float32 model "
                                   f"inputs: {exc}") from exc
        targets = frame[target].to_numpy() if target and target in frame.columns else None
        return InputBatch(sample_ids=sample_ids(frame, self.cfg.id_column), inputs=x, targets=targets,
                          unit_values=x)

    def to_model(self, inputs: Any, device: str) -> Any:
        import torch

        if isinstance(inputs, dict):
            raise StageError("models with several inputs are not supported by the tabular modality")
        return torch.from_numpy(np.ascontiguousarray(inputs)).to(device)

    def units(self, batch: InputBatch, plan: ModalityPlan, relevance: Any) -> UnitRelevance:
        if isinstance(relevance, dict):
            raise StageError("models with several inputs are not supported by the tabular modality")
        names = plan.units or []
        rel = np.asarray(relevance).reshape(len(batch), -1)
        if rel.shape[1] != len(names):
            raise StageError(f"the model's input relevance has {rel.shape[1]} values per row for "
                             f"{len(names)} feature columns; check feature_columns")
        return UnitRelevance(names=names, relevance=rel.astype(np.float64))

    def sample_tables(self, result: BatchResult, plan: ModalityPlan) -> dict[str, Any]:
        """``local_relevance.parquet``: sample_id, prediction, score, target, relevance_l1, then one
        float32 column of raw primary-mode relevance per feature."""
        import pyarrow as pa

        p = result.primary
        head: dict[str, Any] = {"sample_id": result.sample_ids, "prediction": result.decisions,
                                "score": result.scores}
        if result.targets is not None:
            head["target"] = result.targets
        head["relevance_l1"] = p.relevance_l1.astype(np.float32)
        arrays = [pa.array(v) for v in head.values()]
        rel32 = p.relevance.astype(np.float32)
        arrays += [pa.array(rel32[:, j]) for j in range(rel32.shape[1])]
        return {"local_relevance.parquet": pa.Table.from_arrays(arrays, names=list(head) + list(p.unit_names))}
