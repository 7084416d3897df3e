"""Train the credit-risk MLP on generated loans and log model, data and data dictionary to MLflow.

Used by ``pipelines/train.py``; can also be run on its own::

    python -m examples.credit_risk.train --n-train 40000 --n-valid 10000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from examples.credit_risk.generator import (
    DRIVERS, FEATURE_NAMES, NOISE, REASON_TEXT, STRONG_DRIVERS, TARGET, Standardiser,
    feature_documentation, generate_loans,
)
from examples.credit_risk.model import evaluate_mlp, train_mlp
from governance.sources import dataset_source

EXAMPLE_DIR = Path(__file__).resolve().parent


def train_and_log(
    *, n_train: int = 40000, n_valid: int = 10000, seed: int = 0, epochs: int = 15,
    registered_model_name: str | None = None, data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Generate, train, and log into the active MLflow run (one is started if none is).

    Logs: the model (pt2) under ``model``, train/validation tables as artifacts under ``data/``
    and as MLflow dataset inputs (``training`` and ``validation``, their source the logged copy),
    the data dictionary, the standardiser, params and validation metrics. Returns run id, model
    URI, the tables' artifact URIs, and their local paths when ``data_dir`` is given (otherwise
    they are written to a temporary folder that is removed).
    """
    import mlflow.pytorch

    active = mlflow.active_run() or mlflow.start_run(run_name="train")
    train_raw = generate_loans(n_train, seed=seed + 1)
    valid_raw = generate_loans(n_valid, seed=seed + 2)
    std = Standardiser.fit(train_raw)
    train, valid = std.transform(train_raw), std.transform(valid_raw)
    model = train_mlp(train[FEATURE_NAMES].to_numpy(), train[TARGET].to_numpy(), epochs=epochs, seed=seed)
    metrics = evaluate_mlp(model, valid[FEATURE_NAMES].to_numpy(), valid[TARGET].to_numpy())

    with tempfile.TemporaryDirectory(prefix="credit-risk-") as tmp:
        out = Path(data_dir) if data_dir else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        train_path, valid_path = out / "train.parquet", out / "validation.parquet"
        train.to_parquet(train_path, index=False)
        valid.to_parquet(valid_path, index=False)
        (out / "standardiser.json").write_text(json.dumps({"mean": std.mean, "std": std.std}, indent=2, sort_keys=True))
        feature_documentation().to_csv(out / "data_dictionary.csv", index=False)
        (out / "truth.json").write_text(json.dumps(
            {"drivers": DRIVERS, "strong_drivers": STRONG_DRIVERS, "noise": NOISE, "reason_text": REASON_TEXT},
            indent=2, sort_keys=True))
        mlflow.log_params({"n_train": n_train, "n_valid": n_valid, "seed": seed, "epochs": epochs,
                           "architecture": "78-39-19-1 relu dropout0.2 sigmoid"})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out), "data")
    artifact_uri = mlflow.get_artifact_uri("data").rstrip("/")
    uris = {name: f"{artifact_uri}/{name}.parquet" for name in ("train", "validation")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # mlflow's hints on int targets and sources
        for frame, name, context in ((train, "train", "training"), (valid, "validation", "validation")):
            # the logged copy is the source; mlflow-artifacts:/ (a tracking server's proxied
            # artifacts) needs governance's dataset source, MLflow has none for it
            ds = mlflow.data.from_pandas(frame, source=dataset_source(uris[name]), name=name, targets=TARGET)
            mlflow.log_input(ds, context=context)
        example = np.ascontiguousarray(valid[FEATURE_NAMES].to_numpy()[:4], dtype=np.float32)
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=example, registered_model_name=registered_model_name,
            pip_requirements=["torch", "mlflow"],
        )
    local = data_dir is not None
    return {
        "run_id": active.info.run_id,
        "model_uri": info.model_uri,
        "runs_uri": f"runs:/{active.info.run_id}/model",
        "train_uri": uris["train"],
        "validation_uri": uris["validation"],
        "train_path": str(Path(data_dir) / "train.parquet") if local else None,
        "validation_path": str(Path(data_dir) / "validation.parquet") if local else None,
        "metrics": metrics,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--n-valid", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--registered-model-name", default=None)
    a = p.parse_args()
    with mlflow.start_run(run_name="train"):
        print(json.dumps(train_and_log(n_train=a.n_train, n_valid=a.n_valid, seed=a.seed, epochs=a.epochs,
                                       registered_model_name=a.registered_model_name), indent=2))


if __name__ == "__main__":
    main()
