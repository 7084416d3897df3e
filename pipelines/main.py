"""Entry point `main`: train -> validate -> explain, each as its own MLflow run
(``env_manager="local"``) tagged as a child of this run (also when it fails), then the report,
logged into the explanation run (no run of its own)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import _common
from mlflow.entities import RunStatus, RunTag
from mlflow.projects import run as run_project
from mlflow.tracking import MlflowClient

TARGET = "default"


class StepFailed(RuntimeError):
    """A child step exited with an error; its run is FAILED and tagged with its parent."""


def _step(entry_point: str, parameters: dict, parent: str | None, storage: str) -> str:
    """Run one entry point of this project and wait for it; returns its run id.

    The child is tagged with its parent as soon as it starts, so a failed step is still found
    under the pipeline run in the MLflow UI. ``storage`` is the folder MLflow may download
    path-type parameters into (it makes a new temp folder per step otherwise, never removed)."""
    print(f"[main] {entry_point}: {parameters}", flush=True)
    submitted = run_project(
        str(_common.HERE), entry_point=entry_point, parameters=parameters, env_manager="local",
        experiment_id=os.environ.get("MLFLOW_EXPERIMENT_ID"), synchronous=False, storage_dir=storage,
    )
    client = MlflowClient()
    if parent:
        client.set_tag(submitted.run_id, "mlflow.parentRunId", parent)
    ok = submitted.wait()
    if client.get_run(submitted.run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
        client.set_terminated(submitted.run_id, "FINISHED" if ok else "FAILED")
    if not ok:
        raise StepFailed(f"step {entry_point} failed (run {submitted.run_id})")
    return submitted.run_id


def _model_uri(train_run: str) -> str:
    """The registered version the training run created, else its runs:/ URI."""
    versions = MlflowClient().search_model_versions(f"run_id='{train_run}'")
    if versions:
        mv = max(versions, key=lambda v: int(v.version))
        return f"models:/{mv.name}/{mv.version}"
    return f"runs:/{train_run}/model"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-valid", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="governance.yaml")
    p.add_argument("--registered-model-name", default="credit-risk-mlp")
    p.add_argument("--steps", default="train,validate,explain,report",
                   help="Which steps to run after train (comma-separated: validate, explain, report).")
    a = p.parse_args()
    steps = {s.strip() for s in a.steps.split(",") if s.strip()}
    parent = os.environ.get("MLFLOW_RUN_ID")
    config = _common.config_path(a.config) or ""
    try:
        with tempfile.TemporaryDirectory(prefix="governance-steps-") as storage:
            train_run = _step("train", {"n_train": a.n_train, "n_valid": a.n_valid, "epochs": a.epochs,
                                        "seed": a.seed, "registered_model_name": a.registered_model_name},
                              parent, storage)
            model_uri = _model_uri(train_run)
            data = f"mlflow-dataset:{train_run}/validation"
            common = {"model_uri": model_uri, "data": data, "target_column": TARGET, "config": config}
            runs = {"train": train_run}
            if "validate" in steps:
                runs["validate"] = _step("validate", common, parent, storage)
            explain_run = _step("explain", common, parent, storage)
            runs["explain"] = explain_run
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    code = 0
    if "report" in steps:  # logged into the explanation run
        from report import report_run

        print(f"[main] report on run {explain_run}", flush=True)
        code = report_run(explain_run, config or None, None)
        if code == 0:
            runs["report"] = explain_run
    if parent:
        MlflowClient().log_batch(parent, tags=[
            RunTag(f"governance.{k}_run_id", v) for k, v in sorted(runs.items())
        ] + [RunTag("governance.model_uri", model_uri)])
    for k, v in runs.items():
        print(f"[main] {k} run: {v}")
    print(explain_run)
    return code


if __name__ == "__main__":
    sys.exit(main())
