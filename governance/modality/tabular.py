"""Tables: one explanation unit per feature column, the model input a float32 (n, F) matrix (or,
for a model with several inputs, one array per input from the columns the config maps to it).

Sources: a parquet or CSV file, a folder of them read as one dataset, a pandas DataFrame, or
``mlflow-dataset:<run-id>/<name>`` (``governance.data.open_table``). The feature columns and
their order come from what the model carries (``governance.feature_order``), and are selected
from the data by name. The contract comes from the config, else from the model's logged
training data, else from that dataset's stored schema, else from the validation data's own
schema (then it is not independent of the data it checks). Sample ids are the rows' 0-based
positions, or the values of ``id_column``: integers, or any other value hashed as text
(``stage.keys``). Per-sample file: ``local_relevance.parquet`` (one float32 column of raw
primary-mode relevance per feature).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pandas as pd

from governance.data import TableSource, open_table
from governance.feature_order import FeatureOrder, decide_feature_order, input_width
from governance.modality.base import InputBatch, InputNotReadable, Modality, ModalityPlan, UnitRelevance
from governance.model_inputs import (
    InputMapping,
    build_inputs,
    check_inputs,
    column_relevance,
    input_columns,
    ordered,
    parse_input_mapping,
    resolve_mapping,
)
from governance.stage.batch import BatchResult, StageError
from governance.validation import derive_contract, feature_checks

RESERVED_COLUMNS = ("sample_id", "prediction", "score", "target", "relevance_l1")
VALIDATION_SCHEMA = "validation data schema"
SCHEMA_NOTE = ("the contract was derived from the validation data's own schema: it checks column names and "
               "types, not the data's distribution, so it is not independent of the data it checks")
SCHEMA_REMARK = ("contract not independent of the data it checks: nothing says what the data should look like "
                 "(no expectations in the config, no training data logged with the model), so it was derived "
                 "from the validation data's own schema and checks only that the feature columns exist and are "
                 "numeric, not null and finite")


def feature_columns(columns: list[str], cfg: Any) -> list[str]:
    """The configured feature columns, else every column but the target and the id column."""
    if cfg.feature_columns:
        return list(cfg.feature_columns)
    return [str(c) for c in columns if c not in (cfg.target_column, cfg.id_column)]


def _check_reserved(names: list[str]) -> None:
    clash = [c for c in names if c in RESERVED_COLUMNS]
    if clash:
        raise StageError(f"column name(s) {clash} are reserved; list feature_columns in the config")


def input_mapping(cfg: Any, handle: Any) -> list[InputMapping] | None:
    """The columns of each input of a model with several inputs, in the model's order (None for a
    one-input model); raises one line when the model takes several inputs and none are mapped."""
    mapping = parse_input_mapping(cfg.inputs) if cfg.inputs else None
    expected = list(getattr(handle, "inputs", None) or [])
    check_inputs(expected, mapping, getattr(handle, "uri", "<model>"))
    if not mapping:
        return None
    return resolve_mapping(ordered(mapping, expected), expected)


def model_feature_order(cfg: Any, handle: Any, columns: list[str],
                        mapping: list[InputMapping] | None = None) -> tuple[FeatureOrder, Any]:
    """The model's feature columns and how they are known (``governance.feature_order``), and the
    training dataset's stored schema (a ``tracking.LoggedSchema`` or None)."""
    schema = None
    if not mapping and not getattr(handle, "feature_names", None) and not cfg.feature_columns \
            and getattr(handle, "source_run_id", None):
        from governance.tracking import training_schema

        try:
            schema = training_schema(handle)
        except Exception:  # the store cannot say: the order stays unverified, and says so
            schema = None
    order = decide_feature_order(
        columns, target_column=cfg.target_column, id_column=cfg.id_column, configured=cfg.feature_columns,
        signature=getattr(handle, "feature_names", None), schema=schema.columns if schema else None,
        mapped=input_columns(mapping) if mapping else None,
        input_width=None if mapping else input_width(getattr(handle, "inputs", None)))
    return order, schema


def build_contract(cfg: Any, handle: Any, names: list[str], schema: Any = None
                   ) -> tuple[list[dict[str, Any]], str, bool, list[str]]:
    """The contract over the feature columns ``names``, where it came from, whether it is
    independent of the data it checks, and notes for validation_result.json.

    Config expectations, else a contract derived from the model's training rows (observed
    ranges), else from the training dataset's stored schema (``schema``; its rows cannot be
    loaded: the model's column set, no ranges), else the validation data's own schema (then not
    independent). The feature checks (numeric, not null, not infinite) are always included."""
    if cfg.expectations:
        return feature_checks(names) + [dict(e) for e in cfg.expectations], "config", True, []
    from governance.tracking import training_frame

    found = training_frame(handle) if getattr(handle, "source_run_id", None) else None
    if found is not None:
        train, where = found
        if all(c in train.columns for c in names):
            return derive_contract(train, names), where, True, []
    if schema is not None:
        rows = schema.profile.get("num_rows") if isinstance(schema.profile, dict) else None
        note = (f"the contract was derived from the stored schema of {schema.where}"
                + (f" ({int(rows):,} rows)" if isinstance(rows, (int, float)) else "")
                + ", whose rows cannot be loaded: it checks the model's columns (numeric, not null, not "
                  "infinite), not value ranges")
        return feature_checks(names), f"training dataset schema ({schema.where})", True, [note]
    return feature_checks(names), VALIDATION_SCHEMA, False, [SCHEMA_NOTE]


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
        if cfg.target_column is not None and cfg.target_column not in columns and columns:
            raise StageError(f"target column '{cfg.target_column}' is not a column of the data (it has "
                             f"{columns[:10]}{' ...' if len(columns) > 10 else ''}); check --target-column")
        mapping = input_mapping(cfg, handle)
        if columns:
            order, schema = model_feature_order(cfg, handle, columns, mapping)
        else:  # an empty file: the contract says so (no rows, no columns)
            order, schema = FeatureOrder(feature_columns(columns, cfg), "none"), None
        names = order.names
        _check_reserved(names)
        expectations, source, independent, notes = build_contract(cfg, handle, names, schema)
        read = list(names)
        for extra in (cfg.target_column, cfg.id_column):
            if extra and extra in columns and extra not in read:
                read.append(extra)
        remarks = list(order.remarks) + ([] if independent else [SCHEMA_REMARK])
        return ModalityPlan(units=names, columns=read, expectations=expectations, contract_source=source,
                            independent=independent, notes=notes, feature_order=order, mapping=mapping,
                            remarks=remarks)

    def batches(self, table: TableSource, plan: ModalityPlan, batch_size: int) -> Iterator[InputBatch]:
        for frame in table.iter_frames(batch_size, plan.columns):
            yield self.input_batch(frame, plan)

    def input_batch(self, frame: pd.DataFrame, plan: ModalityPlan) -> InputBatch:
        """One frame of ``plan.columns`` as model inputs; its index holds the rows' global
        positions (the sample ids unless ``id_column`` is set). What a Spark executor calls on
        each Arrow batch (converted to pandas, with an id column: partitions know no positions).
        Features are selected by name, in the model's order; a model with several inputs gets a
        dict of arrays, input by input in the model's order."""
        target = self.cfg.target_column
        try:
            x = np.ascontiguousarray(frame[plan.units or []].to_numpy(dtype=np.float32))
        except (ValueError, TypeError) as exc:
            raise InputNotReadable(f"rows {frame.index[0]}..{frame.index[-1]} cannot become float32 model "
                                   f"inputs: {exc}") from exc
        inputs: Any = x
        if plan.mapping:
            inputs = {name: t.numpy() for name, t in build_inputs(frame, plan.mapping).items()}
        targets = frame[target].to_numpy() if target and target in frame.columns else None
        return InputBatch(sample_ids=sample_ids(frame, self.cfg.id_column), inputs=inputs, targets=targets,
                          unit_values=x)

    def to_model(self, inputs: Any, device: str) -> Any:
        """A tensor; for a model with several inputs a tuple in the model's order (exported pt2
        modules take positional arguments only)."""
        import torch

        if isinstance(inputs, dict):
            return tuple(torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in inputs.values())
        return torch.from_numpy(np.ascontiguousarray(inputs)).to(device)

    def units(self, batch: InputBatch, plan: ModalityPlan, relevance: Any) -> UnitRelevance:
        names = plan.units or []
        if isinstance(relevance, dict):
            if not plan.mapping:
                raise StageError("the model takes several inputs; map columns to them in the config (inputs:)")
            per_column = column_relevance(relevance, plan.mapping)
            rel = np.stack([per_column[c] for c in names], axis=1) if names else np.zeros((len(batch), 0))
            return UnitRelevance(names=names, relevance=rel.astype(np.float64))
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
