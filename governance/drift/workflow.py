"""The three comparisons of ``mlflow-governance compare`` and the logging of their result.

* runs: two existing explain runs, read from their artifacts (``local_relevance.parquet`` gives
  the per-sample relevance the intervals need); paired when both runs explained the same data
  (same dataset hash in ``datasets.json``) and the same sample ids;
* models: two models explained here on the same rows (paired);
* data: one model explained here on two data sets (unpaired).

Models and data are explained in memory with the comparing configuration, in its primary mode
only and without the quality metrics (the comparison reads neither), so a comparison costs about
two backward passes over the rows. The result is logged as ``governance/drift/drift.json`` and
``drift.png``, ``governance_drift_*`` metrics and ``governance.drift_*`` tags.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
import yaml

from governance.config import GovernanceConfig, config_from_dict
from governance.drift.compare import DriftResult, compare
from governance.drift.documents import DRIFT_DIR, write_drift
from governance.drift.summary import Side, side_from_samples, side_from_state
from governance.errors import InputError

EXPLANATIONS = "governance/explanations"
RUN_FILES = {
    "global_importance": f"{EXPLANATIONS}/global_importance.json",
    "layer_ranking": f"{EXPLANATIONS}/layer_ranking.json",
    "local_relevance": f"{EXPLANATIONS}/local_relevance.parquet",
    "config": "governance/config.yaml",
    "datasets": "governance/data_quality/datasets.json",
}


class DriftInputError(InputError):
    """A comparison cannot be made from what was given (the message says what to give)."""


def explain_config(given: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration of an in-memory explanation for a comparison: the user's, in its primary
    mode only, without the quality metrics."""
    cfg = config_from_dict(dict(given))
    out = dict(given)
    out["modes"] = [cfg.primary_mode]
    out["primary_mode"] = cfg.primary_mode
    out["quality"] = {**dict(out.get("quality") or {}), "enabled": False}
    return out


def explain_side(model: Any, data: Any, given: Mapping[str, Any], label: str, *,
                 source: Mapping[str, Any] | None = None, quiet: bool = True) -> tuple[Side, Any]:
    """Explain ``data`` with ``model`` (a URI, a ``ModelHandle`` or a module) without logging;
    returns the side and the stage result."""
    from governance.pipeline import explain_model
    from governance.tracking import load_model

    cfg = config_from_dict(dict(given))
    handle = load_model(model, device=cfg.device, allow_pickle=cfg.allow_pickle) if isinstance(model, str) else model
    result = explain_model(handle, data, config=explain_config(given), log=False, quiet=quiet)
    side = side_from_state(result.state, label, global_importance=result.global_importance,
                           layer_ranking=result.layer_ranking, source=dict(source or {}))
    return side, result


def _read_json(path: Path | None) -> Any:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _frames(path: Path, rows: int = 65536) -> Iterator[pd.DataFrame]:
    """The rows of a parquet file, or of a folder of them (Spark), a block at a time."""
    import pyarrow.dataset as pads

    for batch in pads.dataset(str(path), format="parquet").to_batches(batch_size=rows):
        yield batch.to_pandas()


def run_side(run_id: str, label: str, cfg: GovernanceConfig, workdir: Path) -> tuple[Side, dict[str, Any]]:
    """A side from an explain run's artifacts; also returns the run's configuration and datasets."""
    from governance import tracking

    try:
        tracking.run_info(run_id)
    except Exception as exc:
        raise DriftInputError(f"run {run_id!r} not found in the tracking store; give the id of an explain run") from exc
    files = tracking.download_run_files(run_id, list(RUN_FILES.values()), workdir / run_id)
    got = {k: files[v] for k, v in RUN_FILES.items()}
    gi = _read_json(got["global_importance"])
    if not gi or not gi.get("features"):
        raise DriftInputError(f"run {run_id} has no {RUN_FILES['global_importance']}; "
                              "run `mlflow-governance explain` on it first")
    if got["local_relevance"] is None:
        raise DriftInputError(f"run {run_id} has no {RUN_FILES['local_relevance']} (the per-sample relevance the "
                              "intervals need); compare the models with --baseline-model/--model-uri/--data instead")
    run_cfg = yaml.safe_load(got["config"].read_text()) if got["config"] is not None else {}
    run_cfg = run_cfg or {}
    datasets = (_read_json(got["datasets"]) or {}).get("datasets", [])
    side = side_from_samples(_frames(got["local_relevance"]), label, task=str(run_cfg.get("task") or cfg.task), seed=cfg.aggregation.seed,
                             n_bootstrap=cfg.aggregation.n_bootstrap, global_importance=gi,
                             layer_ranking=_read_json(got["layer_ranking"]),
                             source={"run_id": run_id, "primary_mode": gi.get("primary_mode"),
                                     "data_sha256": [d.get("sha256") for d in datasets]})
    return side, {"config": run_cfg, "datasets": datasets, "primary_mode": gi.get("primary_mode")}


def compare_runs(baseline_run_id: str, run_id: str, given: Mapping[str, Any]) -> DriftResult:
    """Compare two existing explain runs (see the module docstring)."""
    from governance.drift.compare import same_rows

    cfg = config_from_dict(dict(given))
    with tempfile.TemporaryDirectory(prefix="governance-drift-") as tmp:
        before, info_b = run_side(baseline_run_id, "baseline", cfg, Path(tmp))
        after, info_a = run_side(run_id, "current", cfg, Path(tmp))
    if info_b["primary_mode"] != info_a["primary_mode"]:
        raise DriftInputError(f"run {baseline_run_id} explains in mode {info_b['primary_mode']} and run {run_id} in "
                              f"{info_a['primary_mode']}; explain both in the same primary mode")
    sha_b = [d.get("sha256") for d in info_b["datasets"]]
    sha_a = [d.get("sha256") for d in info_a["datasets"]]
    same_data = bool(sha_b) and all(sha_b) and sha_b == sha_a
    paired = same_data and same_rows(before, after)
    why = ("both runs explained the same data (same dataset hash) and sample ids: per-sample differences"
           if paired else "the runs explained different data (or the hashes were not recorded): independent samples")
    return compare(before, after, cfg.drift, paired=paired, kind="runs", pairing=why)


def compare_models(baseline_model: str, model_uri: str, data: str, given: Mapping[str, Any], *,
                   quiet: bool = True) -> DriftResult:
    """Explain two models on the same rows and compare them (paired)."""
    cfg = config_from_dict(dict(given))
    before, _ = explain_side(baseline_model, data, given, "baseline", source={"model_uri": baseline_model,
                                                                               "data": data}, quiet=quiet)
    after, _ = explain_side(model_uri, data, given, "current", source={"model_uri": model_uri, "data": data},
                            quiet=quiet)
    return compare(before, after, cfg.drift, paired=True, kind="models",
                   pairing="both models explained on the same rows: per-sample differences")


def compare_data(model_uri: str, baseline_data: str, data: str, given: Mapping[str, Any], *,
                 quiet: bool = True) -> DriftResult:
    """Explain one model on two data sets and compare (unpaired)."""
    cfg = config_from_dict(dict(given))
    before, _ = explain_side(model_uri, baseline_data, given, "baseline",
                             source={"model_uri": model_uri, "data": baseline_data}, quiet=quiet)
    after, _ = explain_side(model_uri, data, given, "current", source={"model_uri": model_uri, "data": data},
                            quiet=quiet)
    return compare(before, after, cfg.drift, paired=False, kind="data",
                   pairing="two data sets: independent samples")


def drift_tags(result: DriftResult) -> dict[str, str]:
    """The ``governance.drift_*`` run tags of a comparison."""
    tags = {"drift_verdict": result.verdict, "drift_kind": result.kind, "drift_paired": str(result.paired).lower()}
    for key in ("run_id", "model_uri", "data"):
        if result.baseline.get(key):
            tags[f"drift_baseline_{key}"] = str(result.baseline[key])[:500]
    if result.reasons:
        tags["drift_reasons"] = "; ".join(result.reasons)[:500]
    return tags


def log_comparison(result: DriftResult, run_id: str, *, folder: str = DRIFT_DIR) -> None:
    """Log ``drift.json``, ``drift.png``, the metrics and the tags into run ``run_id``; the files
    are written to a staging folder first and logged in one go."""
    from governance import tracking

    with tracking.StagingArea() as stage:
        write_drift(result, stage.path(folder))
        stage.commit(run_id)
    tracking.log_metrics(run_id, result.metrics())
    tracking.set_tags(run_id, drift_tags(result))
