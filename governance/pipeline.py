"""The explanation stage's wiring: config, model and data -> contract and streamed explanation ->
documents -> quality -> MLflow.

Only this module wires the modality (``governance.modality``), the stage core
(``governance.stage``: explain_batch, StageState, documents, writers, the streaming runner), the
quality metrics and MLflow (``governance.tracking``) together; it computes nothing itself.
Everything is written to a staging folder and logged to the run only after the whole stage
succeeded, so a failure leaves no half-written explanation. The data contract's result (and the
dataset's hashes) are logged either way.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from governance.config import GovernanceConfig, config_from_dict, load_config
from governance.data import DatasetRecord, LoadedData, TableSource
from governance.modality import get_modality
from governance.modality.base import Modality, ModalityPlan
from governance.modality.tabular import RESERVED_COLUMNS
from governance.model_summary import model_summary
from governance.signals import Interrupted, interruptible
from governance.stage.batch import Explainer, StageError, torch_threads
from governance.stage.documents import documents
from governance.stage.runner import frozen_gc, run_stream
from governance.stage.state import StageSettings, StageState
from governance.stage.writers import json_safe, write_documents, write_json, write_plots
from governance.task_inference import TaskDecision
from governance.validation import ContractRun, ContractViolation, ValidationOutcome
from governance.workdirs import clean_stale

__all__ = ["explain_model", "validate_data", "StageResult", "StageError", "ContractViolation", "json_safe",
           "write_json", "RESERVED_COLUMNS"]

EXPLANATIONS = "explanations"
#: Rows of the data MLflow's dataset digest reads (``mlflow.data.digest_utils.MAX_ROWS``).
DIGEST_ROWS = 10_000


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
    state: StageState | None = None


# ----------------------------------------------------------------------------- inputs


def _resolve_config(config: GovernanceConfig | Mapping[str, Any] | str | Path | None,
                    overrides: Mapping[str, Any]) -> GovernanceConfig:
    if isinstance(config, GovernanceConfig):
        return config.with_overrides(**overrides)
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), **overrides)
    return load_config(config, **overrides)


def _resolve_model(model: Any, cfg: GovernanceConfig):
    """A :class:`governance.tracking.ModelHandle`: a URI is loaded (a pickle only with
    ``allow_pickle``), a handle kept, a module wrapped."""
    from governance.tracking import ModelHandle, load_model

    if isinstance(model, ModelHandle):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), device=cfg.device, allow_pickle=cfg.allow_pickle)
    return ModelHandle(model=model, uri=f"<in-memory {type(model).__name__}>")


@dataclass
class _Prepared:
    cfg: GovernanceConfig
    handle: Any
    modality: Modality
    table: TableSource
    plan: ModalityPlan
    task: TaskDecision | None = None

    def run_tags(self) -> dict[str, str]:
        """What the stage decided and could not be sure of, as ``governance.*`` run tags."""
        tags: dict[str, str] = {}
        order = self.plan.feature_order
        if order is not None:
            tags.update(order.tags())
        if self.task is not None:
            tags.update({"task": self.task.task, "task_source": self.task.source})
        if getattr(self.handle, "serialization", None) == "pickle" and getattr(self.handle, "allow_pickle", False):
            tags["allow_pickle"] = "true"
        return tags


def say(note: str) -> None:
    """One ``note:`` line on stderr: what the stage could not be sure of, or chose to ignore."""
    print(f"note: {note}", file=sys.stderr, flush=True)


#: Rows the model runs on to see its output (task inference) before anything is explained.
TASK_PROBE_ROWS = 64


def _decide_task(cfg: GovernanceConfig, handle: Any, modality: Modality, table: TableSource,
                 plan: ModalityPlan) -> TaskDecision | None:
    """The task from the config, the model's metadata, else its output on the data's first rows
    (``governance.task_inference``); None when the rows cannot become model inputs (the data
    contract then says why)."""
    from governance.data import DataLoadError
    from governance.stage.batch import model_output
    from governance.task_inference import TaskError, infer_task, output_facts
    from governance.tasks import IMAGE_OUTPUT_TASKS

    if not set(plan.columns) <= set(table.columns):
        return None
    try:
        try:
            probe = next(iter(modality.batches(table, plan, TASK_PROBE_ROWS)), None)
        except NotImplementedError:  # a table read elsewhere (Spark's executors): its first rows here
            from governance.data import FrameSource

            head = FrameSource(table.head(TASK_PROBE_ROWS), source=table.source, name=table.name)
            probe = next(iter(modality.batches(head, plan, TASK_PROBE_ROWS)), None)
    except DataLoadError:
        return None
    if probe is None:
        return None
    x = modality.to_model(probe.inputs, cfg.device)
    out = model_output(handle.model, x)
    shape, rng = output_facts(out)
    hint = (handle.task_hint, handle.task_hint_source) if getattr(handle, "task_hint", None) else None
    configured = cfg.task if cfg.given("task") else None
    for task, source in ((configured, "config"), (hint[0] if hint else None, "model metadata")):
        if task in IMAGE_OUTPUT_TASKS and modality.name != "image":
            raise TaskError(f"task {task} ({source}) explains images: set modality: image (--modality image)")
    decision = infer_task(configured, hint, shape, rng, tuple(x.shape) if hasattr(x, "shape") else None)
    width = shape[1] if len(shape) == 2 else 1 if len(shape) == 1 else None
    if decision.task == "binary-classification" and width == 1 and not (0.0 <= rng[0] and rng[1] <= 1.0):
        note = (f"the task is binary-classification ({decision.source}) and the model's one output is outside "
                f"[0, 1] (range [{rng[0]:.4g}, {rng[1]:.4g}]): it is read as a logit, class 1 where it is > 0")
        decision = decision._replace(note=f"{decision.note} {note}" if decision.note else note)
    return decision


def _prepare(model: Any, data: Any, config: Any, overrides: Mapping[str, Any]) -> _Prepared:
    """Config, model, the data opened as a streamed table (its files being hashed), the plan
    (feature order, contract) and the task; what the stage could not be sure of is said once on
    stderr."""
    # the stage shows its own progress bar; MLflow's download bars would only add noise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg = _resolve_config(config, overrides)
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise StageError(f"device '{cfg.device}' was asked for but torch sees no CUDA device")
    handle = _resolve_model(model, cfg)
    modality = get_modality(cfg)
    table = modality.open(data)
    try:
        return _decide(cfg, handle, modality, table, modality.plan(table, handle))
    except BaseException:
        table.close()
        raise


def _decide(cfg: GovernanceConfig, handle: Any, modality: Modality, table: TableSource,
            plan: ModalityPlan) -> _Prepared:
    """The task decided for this model and data (the config follows it), and what the stage
    could not be sure of said once on stderr; shared by the local and the Spark engine."""
    decision = _decide_task(cfg, handle, modality, table, plan)
    if decision is not None and decision.task != cfg.task:
        cfg = cfg.with_overrides(task=decision.task)
        modality.cfg = cfg
    for note in plan.remarks + ([decision.note] if decision is not None and decision.note else []):
        say(note)
    return _Prepared(cfg, handle, modality, table, plan, decision)


# ----------------------------------------------------------------------------- quality


def _quality(model: Any, x: Any, names: list[str], cfg: GovernanceConfig, ground_truth: Any = None,
             extra: Mapping[str, Any] | None = None) -> tuple[dict | None, dict | None, dict[str, float], str | None]:
    """``governance.quality.quality_report``, ``evaluate_gates`` and the flattened metrics."""
    if not cfg.quality.enabled:
        return None, None, {}, "quality disabled in the config"
    try:
        from governance.quality import evaluate_gates, quality_metrics, quality_report
    except ImportError as exc:
        return None, None, {}, f"governance.quality is not available ({exc})"

    qc = cfg.quality
    kwargs: dict[str, Any] = {"task": cfg.task, "modes": tuple(cfg.modes), "n_samples": qc.n_samples,
                              "seed": cfg.aggregation.seed, "feature_names": names, "mprt_max_layers": qc.mprt_max_layers,
                              "sensitivity_perturbations": qc.sensitivity_perturbations, "ig_steps": qc.ig_steps}
    if ground_truth is not None:
        kwargs["ground_truth"] = list(ground_truth)
    if x is None:
        return None, None, {}, "the modality gives the quality metrics no inputs"
    try:
        q = quality_report(model, x.to(cfg.device), **{**kwargs, **(extra or {})})
    except Exception as exc:  # quality is evidence about the explanation, not the explanation
        note = f"quality_report failed: {type(exc).__name__}: {exc}"
        gates = None
        if cfg.gates:  # a gate that cannot be evaluated does not pass
            gates = {"passed": False, "gates": [], "error": note}
        return None, gates, {}, note
    gates = evaluate_gates(q, cfg.gates) if cfg.gates else None
    return q, gates, quality_metrics(q), None


def _quality_inputs(p: _Prepared, state: StageState) -> Any:
    """The quality metrics' rows: the first ``quality.n_samples`` samples of the reservoir (a
    deterministic random sample keyed by sample id, not the first rows of the file)."""
    return p.modality.quality_inputs(state.reservoir.columns, p.cfg.quality.n_samples)


@dataclass
class Evidence:
    """What the stage wrote from a (merged) state: the documents, quality, gates and metrics."""

    state: StageState
    docs: Any
    quality: dict | None
    gates: dict | None
    metrics: dict[str, float]
    note: str | None

    def result(self, rid: str | None, outcome: ValidationOutcome, plan: ModalityPlan,
               timings: dict[str, float]) -> "StageResult":
        gi, stab = self.docs.global_importance, self.docs.stability
        return StageResult(
            run_id=rid, status="explained", n_samples=self.state.n_samples, feature_names=list(plan.units or []),
            validation=outcome, global_importance=gi, layer_ranking=self.docs.layer_ranking, stability=stab,
            quality=self.quality, gates=self.gates, metrics=self.metrics, timings=timings,
            quality_note=self.note, state=self.state,
        )


def write_evidence(p: _Prepared, state: StageState, expl: Path, ground_truth: Any,
                   timings: dict[str, float]) -> Evidence:
    """The documents, model summary, plots, quality and gates of a (merged) state, written under
    ``expl``, and the run's metrics; the same for the local and the Spark engine."""
    cfg, plan, model = p.cfg, p.plan, p.handle.model
    t = time.perf_counter()
    docs = documents(state)
    p.modality.amend_documents(docs, state, plan)
    write_documents(docs, expl)
    layer_types = {str(r["module"]): str(r["type"]) for r in docs.layer_ranking.get("layers", []) if r.get("type")}
    write_json(expl / "model_summary.json", model_summary(model, layer_types))
    p.modality.write_documents(state, plan, expl)
    write_plots(docs, state, expl / "plots")
    timings["documents"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch_threads(cfg.cpu_threads):
        q_model, q_extra = p.modality.quality_setup(model)
        quality, gates, q_metrics, note = _quality(q_model, _quality_inputs(p, state), plan.units or [], cfg,
                                                   ground_truth, q_extra)
    if quality is not None:
        n_quality = int(quality.get("n_samples") or 0)
        if 0 < n_quality < state.n_samples:  # the sample is a bound too: said in quality.json and the report
            quality.setdefault("bounds", []).insert(0, f"the metrics ran on {n_quality} of the {state.n_samples} "
                                                       "explained samples (quality.n_samples, a deterministic sample)")
        write_json(expl / "quality.json", quality)
    if gates is not None:
        write_json(expl / "gates.json", gates)
    timings["quality"] = time.perf_counter() - t

    gi, stab = docs.global_importance, docs.stability
    metrics = {
        "governance_n_samples": float(state.n_samples),
        "governance_top_feature_share": float(gi["features"][0]["importance"]),
        "governance_stability": stab["stability"],
        **{f"governance_stability_{m}": v["spearman"] for m, v in stab["modes"].items()},
        **q_metrics,
    }
    return Evidence(state, docs, quality, gates, metrics, note)


# ----------------------------------------------------------------------------- logging


def _dataset_record(p: _Prepared, n_rows: int, digest: str | None) -> DatasetRecord:
    return DatasetRecord(role="validation", source=p.table.source, name=p.table.name, n_rows=n_rows,
                         mlflow_digest=digest, files=p.table.file_hashes())


def _dataset_digest(p: _Prepared, n_rows: int, rid: str | None) -> str | None:
    """Log the data as an MLflow dataset input of ``rid`` (None: only compute the digest)."""
    from governance import tracking

    try:
        head = p.table.head(DIGEST_ROWS)
        if rid is None:
            return tracking.pandas_digest(head, n_rows=n_rows)
        return tracking.log_streamed_dataset(rid, head, n_rows, source=p.table.source, name=p.table.name,
                                             target_column=p.cfg.target_column)
    except Exception:  # a broken table may not even have a schema; the contract says why
        return None


def _log_validation(rid: str | None, p: _Prepared, outcome: ValidationOutcome, stage: Any) -> str | None:
    """Stage config.yaml, the validation result and the dataset hashes; when ``rid`` is given log
    them, the dataset input and the first tags. Returns the dataset digest."""
    from governance import tracking

    digest = _dataset_digest(p, outcome.n_rows, rid)
    stage.path("config.yaml").write_text(p.cfg.to_yaml())
    write_json(stage.path("data_quality/validation_result.json"), outcome.to_dict())
    write_json(stage.path("data_quality/datasets.json"),
               {"datasets": [_dataset_record(p, outcome.n_rows, digest).to_dict()]})
    if rid is None:
        return digest
    stage.commit(rid)
    tags = {"status": "validated" if outcome.success else "failed", "primary_mode": p.cfg.primary_mode,
            "model_uri": p.handle.uri, "contract_source": outcome.contract_source,
            "contract_independent": "true" if outcome.independent else "false", **p.run_tags()}
    if digest:
        tags["dataset_digest"] = digest
    tracking.set_tags(rid, tags)
    tracking.log_model_input(rid, p.handle)
    return digest


def validate_data(
    model: Any, data: Any, *, config: Any = None, run_id: str | None = None,
    experiment_name: str | None = None, log: bool = True, **overrides: Any,
) -> ValidationOutcome:
    """Only the data contract (the ``validate`` pipeline step): check, log the result, and raise
    :class:`ContractViolation` when it fails. Faults as in :func:`explain_model`."""
    with interruptible():
        _clean_stale()
        return _validate_data(model, data, config=config, run_id=run_id, experiment_name=experiment_name,
                              log=log, **overrides)


def _validate_data(model: Any, data: Any, *, config: Any, run_id: str | None, experiment_name: str | None,
                   log: bool, **overrides: Any) -> ValidationOutcome:
    from governance import tracking

    p = _prepare(model, data, config, overrides)
    with frozen_gc():
        outcome = ContractRun(p.table, p.plan.expectations, contract_source=p.plan.contract_source,
                              cell_budget=p.cfg.contract_block_cells, independent=p.plan.independent,
                              notes=p.plan.notes).run()
    p.table.check_unchanged()
    rid, created = _open_run(p, log, run_id, experiment_name, "governance-validate")
    ok = False
    try:
        if log:
            with tracking.StagingArea() as first:
                _log_validation(rid, p, outcome, first)
        if not outcome.success:
            raise ContractViolation(outcome)
        ok = True
        return outcome
    except BaseException:
        _mark_failed(rid)
        raise
    finally:
        p.table.close()
        _release(rid, created, ok)


def _log_explanation(rid: str, p: _Prepared, stage: Any, gi: dict, metrics: dict[str, float],
                     gates: dict | None, note: str | None, digest: str | None, n: int) -> None:
    from governance import tracking

    cfg = p.cfg
    stage.commit(rid)
    tracking.log_metrics(rid, metrics)
    top = gi["features"][0]
    tags = {"status": "explained", "top_feature": top["feature"], "n_samples": n}
    if gates is not None:
        tags["gates_passed"] = "true" if gates.get("passed") else "false"
    if note and cfg.quality.enabled:
        tags["quality_note"] = note[:500]
    tracking.set_tags(rid, tags)
    mv_tags = {"explained_run_id": rid, "primary_mode": cfg.primary_mode, "top_feature": top["feature"],
               "status": "explained"}
    if gates is not None:
        mv_tags["gates_passed"] = tags["gates_passed"]
    if digest:
        mv_tags["dataset_digest"] = digest
    from governance.registry import record_explained

    try:
        version = tracking.tag_model_version(p.handle, mv_tags)
        if version is not None:  # the version's evidence is now this run (a standing approval is superseded)
            record_explained(*version, rid)
    except Exception as exc:  # the evidence is logged; the registry is told on the next report
        say(f"the registered model version could not be tagged: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- the stage


def _on_spark(data: Any, config: Any, overrides: Mapping[str, Any]) -> bool:
    """Whether the stage runs on Spark (``governance.stage.spark``): ``engine: spark``, or a
    Spark DataFrame as the data."""
    if type(data).__module__.startswith("pyspark.sql"):
        return True
    return _resolve_config(config, overrides).engine == "spark"


def _clean_stale() -> None:
    """Remove the folders killed processes left (``governance.workdirs``), saying so on stderr."""
    for path in clean_stale():
        print(f"note: removed {path}, left by an mlflow-governance process that is gone", file=sys.stderr)


def _mark_failed(rid: str | None) -> None:
    """Tag ``governance.status=failed`` (best effort: the original error is what the user sees)."""
    from governance import tracking

    if rid is not None:
        try:
            tracking.set_tags(rid, {"status": "failed"})
        except Exception:
            pass


def _open_run(p: _Prepared, log: bool, run_id: str | None, experiment_name: str | None,
              run_name: str) -> tuple[str | None, bool]:
    """The run to log into, claimed for this process (``tracking.claim_run``); (None, False) when
    not logging. On failure the table is closed and a run just created is ended; a refused run
    is left exactly as it was."""
    from governance import tracking

    rid, created = None, False
    try:
        if log:
            rid, created = tracking.resolve_run(run_id, experiment_name, run_name)
            tracking.claim_run(rid, created)
    except BaseException:
        p.table.close()
        if created:
            _release(rid, created, False)
        raise
    return rid, created


def _release(rid: str | None, created: bool, ok: bool) -> None:
    """Drop this process's claim on the run and end a run the stage created."""
    from governance import tracking

    if rid is None:
        return
    tracking.release_run(rid)
    if created:
        tracking.finish_run(rid, ok)


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
    ``data``: a parquet/CSV file or a folder of them, ``mlflow-dataset:<run-id>/<name>`` or a
    DataFrame; with ``engine: spark`` a parquet path or folder (any Hadoop URI),
    ``spark-table:<db.table>`` or a Spark DataFrame (``governance.stage.spark``). ``overrides`` are config keys (``target_column``, ``modes``, ``primary_mode``,
    ``batch_size``, ``device``, ``id_column``, ...). Raises :class:`ContractViolation` when the
    data breaks its contract.

    Faults: the run must not hold governance evidence already nor be claimed by another process
    (``tracking.claim_run``, :class:`governance.tracking.RunNotReusable`). On any error, and on
    SIGTERM / SIGINT / SIGHUP (raised as :class:`governance.signals.Interrupted`), the run is
    tagged ``governance.status=failed``, a run the stage created ends FAILED and the staging
    folders are removed; folders a killed process left are removed at the next start.
    """
    with interruptible():
        _clean_stale()
        return _explain_model(model, data, config=config, run_id=run_id, experiment_name=experiment_name,
                              quiet=quiet, log=log, ground_truth=ground_truth, **overrides)


def _explain_model(
    model: Any, data: Any, *, config: Any, run_id: str | None, experiment_name: str | None, quiet: bool,
    log: bool, ground_truth: Any, **overrides: Any,
) -> StageResult:
    from governance import tracking

    if _on_spark(data, config, overrides):
        from governance.stage.spark import explain_spark

        return explain_spark(model, data, config=config, run_id=run_id, experiment_name=experiment_name,
                             quiet=quiet, log=log, ground_truth=ground_truth, **overrides)
    t0 = time.perf_counter()
    p = _prepare(model, data, config, overrides)
    cfg, handle, plan = p.cfg, p.handle, p.plan
    timings: dict[str, float] = {"load": time.perf_counter() - t0}
    rid, created = _open_run(p, log, run_id, experiment_name, "governance-explain")
    ok = False
    try:
        explainer = Explainer.from_config(handle.model, cfg)
        k = max(cfg.aggregation.sample_size, cfg.quality.n_samples if cfg.quality.enabled else 0)
        settings = StageSettings.from_config(cfg, plan.units, sample_size=k)
        with tracking.StagingArea() as stage:
            expl = stage.path(EXPLANATIONS)
            expl.mkdir(parents=True, exist_ok=True)
            with torch_threads(cfg.cpu_threads):
                stream = run_stream(explainer, p.modality, plan, p.table, settings, expl,
                                    batch_size=cfg.batch_size, dictionary=cfg.reason_codes.dictionary,
                                    cell_budget=cfg.contract_block_cells, quiet=quiet)
            timings.update(stream.timings)
            p.table.check_unchanged()
            outcome = stream.outcome
            with tracking.StagingArea() as first:
                digest = _log_validation(rid if log else None, p, outcome, first)
            if not outcome.success:
                raise ContractViolation(outcome)
            state = stream.state
            assert state is not None

            evidence = write_evidence(p, state, expl, ground_truth, timings)
            t = time.perf_counter()
            if log:
                _log_explanation(rid, p, stage, evidence.docs.global_importance, evidence.metrics, evidence.gates,
                                 evidence.note, digest, state.n_samples)
            timings["logging"] = time.perf_counter() - t
        ok = True
        timings["total"] = time.perf_counter() - t0
        return evidence.result(rid, outcome, plan, timings)
    except BaseException as exc:
        _mark_failed(rid)
        if isinstance(exc, Interrupted):
            exc.run_id = rid
        raise
    finally:
        p.table.close()
        _release(rid, created, ok)
