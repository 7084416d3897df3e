"""Entry point `main`: train -> validate -> explain (-> report when declared), each as its own
MLflow run (``env_manager="local"``) tagged as a child of this run."""

from __future__ import annotations

import argparse
import os
import sys

import _common
import mlflow
import yaml
from mlflow.tracking import MlflowClient

TARGET = "default"


def _step(entry_point: str, parameters: dict, parent: str | None) -> str:
    """Run one entry point of this project synchronously; returns its run id."""
    print(f"[main] {entry_point}: {parameters}", flush=True)
    submitted = mlflow.projects.run(
        str(_common.HERE), entry_point=entry_point, parameters=parameters, env_manager="local",
        experiment_id=os.environ.get("MLFLOW_EXPERIMENT_ID"), synchronous=True,
    )
    if parent:
        MlflowClient().set_tag(submitted.run_id, "mlflow.parentRunId", parent)
    return submitted.run_id


def _model_uri(train_run: str) -> str:
    """The registered version the training run created, else its runs:/ URI."""
    versions = MlflowClient().search_model_versions(f"run_id='{train_run}'")
    if versions:
        mv = max(versions, key=lambda v: int(v.version))
        return f"models:/{mv.name}/{mv.version}"
    return f"runs:/{train_run}/model"


def _declared(entry_point: str) -> bool:
    spec = yaml.safe_load((_common.HERE / "MLproject").read_text())
    return entry_point in (spec.get("entry_points") or {})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-valid", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="governance.yaml")
    p.add_argument("--registered-model-name", default="credit-risk-mlp")
    p.add_argument("--steps", default="train,validate,explain,report",
                   help="Which steps to run after train (report runs only when MLproject declares it).")
    a = p.parse_args()
    steps = {s.strip() for s in a.steps.split(",") if s.strip()}
    parent = os.environ.get("MLFLOW_RUN_ID")
    config = _common.config_path(a.config) or ""
    train_run = _step("train", {"n_train": a.n_train, "n_valid": a.n_valid, "epochs": a.epochs,
                                "seed": a.seed, "registered_model_name": a.registered_model_name}, parent)
    model_uri = _model_uri(train_run)
    data = f"mlflow-dataset:{train_run}/validation"
    common = {"model_uri": model_uri, "data": data, "target_column": TARGET, "config": config}
    runs = {"train": train_run}
    if "validate" in steps:
        runs["validate"] = _step("validate", common, parent)
    explain_run = _step("explain", common, parent)
    runs["explain"] = explain_run
    if "report" in steps and _declared("report"):  # the report step (governance/report)
        runs["report"] = _step("report", {"run_id": explain_run, "config": config}, parent)
    if parent:
        MlflowClient().log_batch(parent, tags=[
            mlflow.entities.RunTag(f"governance.{k}_run_id", v) for k, v in sorted(runs.items())
        ] + [mlflow.entities.RunTag("governance.model_uri", model_uri)])
    for k, v in runs.items():
        print(f"[main] {k} run: {v}")
    print(explain_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
