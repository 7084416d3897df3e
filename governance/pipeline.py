"""The explanation stage: data contract -> backtrace in batches -> aggregation -> quality -> logging.

Only this module wires the engine, the aggregation and MLflow together. Per-sample results are
streamed to parquet batch by batch (memory stays flat in the number of rows); everything is
written to a staging folder and logged to the run only after the whole stage succeeded, so a
failure leaves no half-written explanation. The data contract's result is logged either way.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from governance.aggregate import global_importance_document, layer_ranking_document, stability_document
from governance.batches import StageError, run_backtrace, torch_threads
from governance.config import GovernanceConfig, config_from_dict, load_config
from governance.data import LoadedData, load_data
from governance.model_summary import model_summary
from governance.validation import ContractViolation, ValidationOutcome, derive_contract, feature_checks, validate_table

EXPLANATIONS = "explanations"
RESERVED_COLUMNS = ("sample_id", "prediction", "score", "target", "relevance_l1")


@dataclass
class StageResult:
    """What one run of the stage produced (also logged to the MLflow run ``run_id``)."""

    run_id: str | None
    status: str
    n_samples: int
    feature_names: list[str]
    validation: ValidationOutcome
    global_importance: dict[str, Any] = field(default_factory=dict)
    layer_ranking: dict[str, Any] = field(default_factory=dict)
    stability: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] | None = None
    gates: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    quality_note: str | None = None


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


# ----------------------------------------------------------------------------- inputs


def _resolve_config(config: GovernanceConfig | Mapping[str, Any] | str | Path | None,
                    overrides: Mapping[str, Any]) -> GovernanceConfig:
    if isinstance(config, GovernanceConfig):
        return config_from_dict(config.to_dict(), **overrides)
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), **overrides)
    return load_config(config, **overrides)


def _resolve_model(model: Any, device: str):
    from governance.tracking import ModelHandle, load_model

    if isinstance(model, ModelHandle):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), device=device)
    return ModelHandle(model=model, uri=f"<in-memory {type(model).__name__}>")


def feature_columns(frame: pd.DataFrame, cfg: GovernanceConfig) -> list[str]:
    """The configured feature columns, else every column but the target."""
    if cfg.feature_columns:
        return list(cfg.feature_columns)
    cols = [str(c) for c in frame.columns if c != cfg.target_column]
    clash = [c for c in cols if c in RESERVED_COLUMNS]
    if clash:
        raise StageError(f"column name(s) {clash} are reserved; list feature_columns in the config")
    return cols


def build_contract(cfg: GovernanceConfig, handle: Any,
                   frame: pd.DataFrame) -> tuple[list[dict[str, Any]], str, list[str]]:
    """The contract, where it came from, and the feature columns.

    Config expectations, else a contract derived from the model's training data (whose columns,
    less the target, are then the features the model expects), else the validation data's own
    schema; the feature checks are always included."""
    if cfg.expectations:
        names = feature_columns(frame, cfg)
        return feature_checks(names) + [dict(e) for e in cfg.expectations], "config", names
    from governance.tracking import training_frame

    found = training_frame(handle) if getattr(handle, "source_run_id", None) else None
    if found is not None:
        train, where = found
        names = list(cfg.feature_columns) if cfg.feature_columns else feature_columns(train, cfg)
        if all(c in train.columns for c in names):
            return derive_contract(train, names), where, names
    names = feature_columns(frame, cfg)
    return feature_checks(names), "validation data schema", names


# ----------------------------------------------------------------------------- quality


def _quality(model: Any, x: np.ndarray, names: list[str], cfg: GovernanceConfig,
             ground_truth: Any = None) -> tuple[dict | None, dict | None, dict[str, float], str | None]:
    """``governance.quality.quality_report``, ``evaluate_gates`` and the flattened metrics."""
    if not cfg.quality.enabled:
        return None, None, {}, "quality disabled in the config"
    try:
        from governance.quality import evaluate_gates, quality_metrics, quality_report
    except ImportError as exc:
        return None, None, {}, f"governance.quality is not available ({exc})"
    import torch

    kwargs: dict[str, Any] = {"task": cfg.task, "modes": tuple(cfg.modes), "n_samples": cfg.quality.n_samples,
                              "seed": cfg.aggregation.seed, "feature_names": names}
    if ground_truth is not None:
        kwargs["ground_truth"] = list(ground_truth)
    try:
        q = quality_report(model, torch.from_numpy(x).to(cfg.device), **kwargs)
    except Exception as exc:  # quality is evidence about the explanation, not the explanation
        note = f"quality_report failed: {type(exc).__name__}: {exc}"
        gates = None
        if cfg.gates:  # a gate that cannot be evaluated does not pass
            gates = {"passed": False, "gates": [], "error": note}
        return None, gates, {}, note
    gates = evaluate_gates(q, cfg.gates) if cfg.gates else None
    return q, gates, quality_metrics(q), None


# ----------------------------------------------------------------------------- the stage


def _plots(tables: dict[str, pd.DataFrame], primary: str, layer_doc: dict, local_path: Path,
           plot_dir: Path) -> None:
    import pyarrow.parquet as pq

    from governance import plots

    table = tables[primary]
    plots.importance_bar(table, plot_dir / "global_importance.png",
                         title=f"Global importance ({primary} mode, top {min(20, len(table))})")
    if len(tables) > 1:
        plots.mode_comparison(tables, plot_dir / "importance_by_mode.png")
    top = list(table.sort_values("rank")["feature"].head(12))
    pf = pq.ParquetFile(local_path)
    rows = []
    n_seen = 0
    for i in range(pf.num_row_groups):
        rg = pf.read_row_group(i, columns=["relevance_l1"] + top).to_pandas()
        rows.append(rg.iloc[: max(0, 3000 - n_seen)])
        n_seen += len(rows[-1])
        if n_seen >= 3000:
            break
    sample = pd.concat(rows, ignore_index=True)
    l1 = sample.pop("relevance_l1").to_numpy()
    shares = sample.div(np.where(l1 > 0, l1, 1.0), axis=0)
    plots.share_distribution(shares, plot_dir / "feature_distribution.png",
                             title=f"Per-sample shares of the top {len(top)} features ({primary} mode)")
    if layer_doc.get("layers"):
        plots.layer_ranking_bar(layer_doc["layers"], plot_dir / "layer_ranking.png",
                                title=f"Layer ranking ({primary} mode)")


@dataclass
class _Prepared:
    cfg: GovernanceConfig
    handle: Any
    loaded: LoadedData
    names: list[str]
    outcome: ValidationOutcome
    source: str


def _prepare(model: Any, data: Any, config: Any, overrides: Mapping[str, Any],
             timings: dict[str, float]) -> _Prepared:
    """Config, model, data, feature columns, and the data contract's outcome (not raised yet)."""
    t0 = time.perf_counter()
    # the stage shows its own progress bar; MLflow's download bars would only add noise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg = _resolve_config(config, overrides)
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise StageError(f"device '{cfg.device}' was asked for but torch sees no CUDA device")
    handle = _resolve_model(model, cfg.device)
    loaded = data if isinstance(data, LoadedData) else load_data(data)
    contract, source, names = build_contract(cfg, handle, loaded.frame)
    timings["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    outcome = validate_table(loaded.frame, contract, contract_source=source)
    timings["contract"] = time.perf_counter() - t
    return _Prepared(cfg, handle, loaded, names, outcome, source)


def _log_validation(rid: str, p: _Prepared) -> str | None:
    """Log config.yaml, the validation result, the dataset input and the first tags."""
    from governance import tracking

    with tracking.StagingArea() as first:
        first.path("config.yaml").write_text(p.cfg.to_yaml())
        write_json(first.path("data_quality/validation_result.json"), p.outcome.to_dict())
        first.commit(rid)
    try:
        digest = tracking.log_dataset(rid, p.loaded.frame, source=p.loaded.source, name=p.loaded.name,
                                      target_column=p.cfg.target_column)
    except Exception:  # a broken table may not even have a schema; the contract says why
        digest = None
    tags = {"status": "validated" if p.outcome.success else "failed", "primary_mode": p.cfg.primary_mode,
            "model_uri": p.handle.uri, "contract_source": p.source}
    if digest:
        tags["dataset_digest"] = digest
    tracking.set_tags(rid, tags)
    return digest


def validate_data(
    model: Any, data: Any, *, config: Any = None, run_id: str | None = None,
    experiment_name: str | None = None, log: bool = True, **overrides: Any,
) -> ValidationOutcome:
    """Only the data contract (the ``validate`` pipeline step): check, log the result, and raise
    :class:`ContractViolation` when it fails."""
    from governance import tracking

    p = _prepare(model, data, config, overrides, {})
    rid, created = tracking.resolve_run(run_id, experiment_name, "governance-validate") if log else (None, False)
    try:
        if log:
            _log_validation(rid, p)
        if not p.outcome.success:
            raise ContractViolation(p.outcome)
        return p.outcome
    finally:
        if created:
            tracking.finish_run(rid, p.outcome.success)


def explain_model(
    model: Any,
    data: str | Path | pd.DataFrame | LoadedData,
    *,
    config: GovernanceConfig | Mapping[str, Any] | str | Path | None = None,
    run_id: str | None = None,
    experiment_name: str | None = None,
    quiet: bool = False,
    log: bool = True,
    ground_truth: Any = None,
    **overrides: Any,
) -> StageResult:
    """Run the explanation stage and log its evidence to MLflow.

    ``model``: an MLflow model URI, a :class:`governance.tracking.ModelHandle` or a torch module.
    ``data``: a parquet/CSV path, ``mlflow-dataset:<run-id>/<name>`` or a DataFrame.
    ``overrides`` are config keys (``target_column``, ``modes``, ``primary_mode``, ``batch_size``,
    ``device``, ...). Raises :class:`ContractViolation` when the data breaks its contract.
    """
    from governance import tracking

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    p = _prepare(model, data, config, overrides, timings)
    cfg, handle, loaded, names, outcome = p.cfg, p.handle, p.loaded, p.names, p.outcome
    frame = loaded.frame

    rid, created = (tracking.resolve_run(run_id, experiment_name) if log else (None, False))
    ok = False
    try:
        digest = _log_validation(rid, p) if log else None
        if not outcome.success:
            raise ContractViolation(outcome)

        x = np.ascontiguousarray(frame[names].to_numpy(dtype=np.float32))
        targets = None
        if cfg.target_column and cfg.target_column in frame.columns:
            targets = frame[cfg.target_column].to_numpy()
        with tracking.StagingArea() as stage:
            expl = stage.path(EXPLANATIONS)
            expl.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            with torch_threads(cfg.cpu_threads):
                red = run_backtrace(handle.model, x, names, cfg, expl, targets=targets, quiet=quiet)
            timings["backtrace"] = time.perf_counter() - t

            t = time.perf_counter()
            gi_doc, gi_long = global_importance_document(red["importance"], cfg.primary_mode)
            gi_doc["feature_columns"] = names
            gi_doc["reason_code_leaders"] = red["reason_summary"]
            write_json(expl / "global_importance.json", gi_doc)
            gi_long.to_parquet(expl / "global_importance.parquet", index=False)
            layer_doc = layer_ranking_document(red["layers"], cfg.primary_mode)
            write_json(expl / "layer_ranking.json", layer_doc)
            stab = stability_document(red["importance"], cfg.primary_mode, cfg.aggregation.seed)
            write_json(expl / "stability.json", stab)
            layer_types = {str(r["module"]): str(r["type"]) for r in layer_doc.get("layers", []) if r.get("type")}
            write_json(expl / "model_summary.json", model_summary(handle.model, layer_types))
            tables = {m: red["importance"][m].table() for m in [cfg.primary_mode] + [
                m for m in cfg.modes if m != cfg.primary_mode]}
            _plots(tables, cfg.primary_mode, layer_doc, expl / "local_relevance.parquet", expl / "plots")
            timings["aggregate"] = time.perf_counter() - t

            t = time.perf_counter()
            with torch_threads(cfg.cpu_threads):
                quality, gates, q_metrics, note = _quality(handle.model, x, names, cfg, ground_truth)
            if quality is not None:
                write_json(expl / "quality.json", quality)
            if gates is not None:
                write_json(expl / "gates.json", gates)
            timings["quality"] = time.perf_counter() - t

            top = gi_doc["features"][0]
            metrics = {
                "governance_n_samples": float(len(x)),
                "governance_top_feature_share": float(top["importance"]),
                "governance_stability": stab["stability"],
                **{f"governance_stability_{m}": v["spearman"] for m, v in stab["modes"].items()},
                **q_metrics,
            }
            t = time.perf_counter()
            if log:
                stage.commit(rid)
                tracking.log_metrics(rid, metrics)
                tags = {"status": "explained", "top_feature": top["feature"], "n_samples": len(x)}
                if gates is not None:
                    tags["gates_passed"] = "true" if gates.get("passed") else "false"
                if note and cfg.quality.enabled:
                    tags["quality_note"] = note[:500]
                tracking.set_tags(rid, tags)
                mv_tags = {"explained_run_id": rid, "primary_mode": cfg.primary_mode,
                           "top_feature": top["feature"], "status": "explained"}
                if gates is not None:
                    mv_tags["gates_passed"] = tags["gates_passed"]
                if digest:
                    mv_tags["dataset_digest"] = digest
                try:
                    tracking.tag_model_version(handle, mv_tags)
                except Exception:
                    pass
            timings["logging"] = time.perf_counter() - t
        ok = True
        timings["total"] = time.perf_counter() - t0
        return StageResult(
            run_id=rid, status="explained", n_samples=len(x), feature_names=names, validation=outcome,
            global_importance=gi_doc, layer_ranking=layer_doc, stability=stab, quality=quality,
            gates=gates, metrics=metrics, timings=timings, quality_note=note,
        )
    except BaseException:
        if log and rid is not None:
            try:
                tracking.set_tags(rid, {"status": "failed"})
            except Exception:
                pass
        raise
    finally:
        if created and rid is not None:
            tracking.finish_run(rid, ok)
