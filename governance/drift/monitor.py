"""Monitoring: explain a production batch with the audited model version and compare it with the
version's audited explanation, as a time series in one monitoring run per model version.

The baseline is the explain run recorded on the version (tag ``governance.explained_run_id``,
``governance.registry``); the batch is explained with that run's configuration (the user's
settings on top), in its primary mode only and without quality metrics or a report, so a batch
costs little more than one backward pass over its rows. The monitoring run of ``name/version``
is found by its tag ``governance.monitor_model_version`` (created on the first batch) in the
baseline run's experiment; each batch logs the ``governance_drift_*`` metrics at step = batch
index with the batch's timestamp, and ``governance/drift/batches/<index>/drift.json``. A batch
whose verdict is ``changed`` is listed in the tag ``governance.drift_flagged_batches`` and
described in ``governance.drift_batch_<index>`` (its plot is logged too).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from governance.config import config_from_dict
from governance.drift.compare import DriftResult, compare
from governance.drift.documents import DRIFT_DIR, DRIFT_JSON, write_drift
from governance.drift.workflow import DriftInputError, explain_side, run_side
from governance.stage.writers import write_json

MONITOR_TAG = "monitor_model_version"
FLAGGED_TAG = "drift_flagged_batches"
#: The metric whose history gives the batch indices already monitored.
STEP_METRIC = "governance_drift_changed"


@dataclass
class MonitorResult:
    """One monitored batch."""

    run_id: str
    created: bool
    step: int
    timestamp_ms: int
    baseline_run_id: str
    result: DriftResult
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return self.result.changed


def parse_batch_time(value: str | None) -> int:
    """Milliseconds since the epoch of an ISO 8601 time (UTC when it has no zone); now when None."""
    if value is None:
        return int(time.time() * 1000)
    try:
        t = datetime.fromisoformat(value)
    except ValueError as exc:
        raise DriftInputError(f"--batch-time: '{value}' is not an ISO 8601 time such as 2026-01-31T12:00:00Z") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1000)


def _baseline(model_uri: str) -> tuple[str, str, str]:
    """(name, version, explain run id) of the registered version behind ``model_uri``."""
    from governance import registry, tracking

    try:
        name, version = tracking.registered_version(model_uri)
    except Exception as exc:
        raise DriftInputError(f"model {model_uri!r} cannot be resolved in the registry ({exc}); "
                              "give models:/<name>@audited or models:/<name>/<version>") from exc
    if not name or not version:
        raise DriftInputError(f"monitor needs a registered model version, got {model_uri!r}; "
                              "give models:/<name>@audited or models:/<name>/<version>")
    state = registry.version_state(tracking.client(), name, version)
    run_id = state.current_run_id
    if not run_id:
        raise DriftInputError(f"{name} version {version} has no explanation (tag governance.explained_run_id); "
                              "run `mlflow-governance explain` on it first")
    return name, version, run_id


def monitor_batch(model_uri: str, data: Any, *, given: Mapping[str, Any] | None = None,
                  batch_index: int | None = None, batch_time: str | None = None,
                  experiment_name: str | None = None, quiet: bool = True) -> MonitorResult:
    """Explain ``data`` with the model version behind ``model_uri``, compare it with the version's
    explain run and log the comparison as one step of the version's monitoring run."""
    from governance import tracking

    t0 = time.perf_counter()
    timestamp = parse_batch_time(batch_time)
    name, version, baseline_run = _baseline(model_uri)
    user = dict(given or {})
    with tempfile.TemporaryDirectory(prefix="governance-monitor-") as tmp:
        cfg0 = config_from_dict(user)
        before, info = run_side(baseline_run, "audited baseline", cfg0, Path(tmp))
    # the audited run's opt-in to a pickle is not the monitor's: only the user's setting counts
    run_cfg = {k: v for k, v in info["config"].items() if k not in ("report", "model_card", "allow_pickle")}
    merged = {**run_cfg, **user}
    cfg = config_from_dict(merged)
    if cfg.aggregation.seed != cfg0.aggregation.seed or cfg.aggregation.n_bootstrap != cfg0.aggregation.n_bootstrap:
        with tempfile.TemporaryDirectory(prefix="governance-monitor-") as tmp:
            before, info = run_side(baseline_run, "audited baseline", cfg, Path(tmp))
    timings = {"baseline": time.perf_counter() - t0}
    t = time.perf_counter()
    after, stage = explain_side(model_uri, data, merged, "batch",
                                source={"model_uri": model_uri, "data": str(data) if not hasattr(data, "columns")
                                        else "<in-memory table>"}, quiet=quiet)
    timings["explain"] = time.perf_counter() - t
    t = time.perf_counter()
    result = compare(before, after, cfg.drift, paired=False, kind="monitor",
                     pairing="a production batch against the audited explanation: independent samples")
    result.baseline["run_id"] = baseline_run
    timings["compare"] = time.perf_counter() - t

    t = time.perf_counter()
    if experiment_name:
        exp = tracking.client().get_experiment_by_name(experiment_name)
        experiment_id = exp.experiment_id if exp else tracking.client().create_experiment(experiment_name)
    else:
        experiment_id = tracking.run_info(baseline_run).info.experiment_id
    run_id, created = tracking.find_or_create_run(experiment_id, MONITOR_TAG, f"{name}/{version}",
                                                  f"governance-monitor {name} v{version}")
    steps = tracking.metric_steps(run_id, STEP_METRIC)
    step = (max(steps) + 1 if steps else 0) if batch_index is None else int(batch_index)
    if step in steps:
        raise DriftInputError(f"batch {step} of {name} version {version} is already monitored in run {run_id}; "
                              "give another --batch-index")
    metrics = {**result.metrics(), "governance_monitor_n_rows": float(after.n_samples)}
    with tracking.StagingArea() as area:
        folder = area.path(f"{DRIFT_DIR}/batches/{step:05d}")
        if result.changed:
            write_drift(result, folder)
        else:
            write_json(folder / DRIFT_JSON, result.to_dict())
        area.commit(run_id)
    tracking.log_metric_series(run_id, metrics, step=step, timestamp_ms=timestamp)
    tags = {"model_uri": model_uri, "monitor_baseline_run_id": baseline_run, "drift_last_batch": str(step),
            "drift_last_verdict": result.verdict}
    if result.changed:
        flagged = tracking.run_info(run_id).data.tags.get(f"governance.{FLAGGED_TAG}", "")
        listed = [s for s in flagged.split(",") if s]
        tags[FLAGGED_TAG] = ",".join(sorted(set(listed) | {str(step)}, key=int))
        tags[f"drift_batch_{step}"] = "; ".join(result.reasons)[:500]
    tracking.set_tags(run_id, tags)
    tracking.finish_run(run_id, True)  # a finished run still takes the next batch's metrics
    timings["logging"] = time.perf_counter() - t
    timings["stage_total"] = float(stage.timings.get("total", 0.0))
    timings["total"] = time.perf_counter() - t0
    return MonitorResult(run_id=run_id, created=created, step=step, timestamp_ms=timestamp,
                         baseline_run_id=baseline_run, result=result, timings=timings)
