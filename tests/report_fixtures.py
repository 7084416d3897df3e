"""A real MLflow sqlite store holding what the explanation stage leaves behind.

Builds, in a temporary folder: a small credit-risk MLP trained with torch, logged with
``mlflow.pytorch.log_model(..., input_example=...)`` and registered twice (version 1 marked as
previously audited, version 2 the one under review), plus explanation runs whose
``governance/`` artifacts follow the schema of issue 4 / docs/contracts.md. The relevance values
are gradient x input of the trained model, aggregated as the explanation stage does (L1-normalised
shares, bootstrap CIs, ranks), so every number in a report comes from a real computation.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import yaml

FEATURES = [
    "income",
    "debt_to_income",
    "credit_history_months",
    "<script>alert(1)</script>",
    "age",
    "noise_1",
]
DICTIONARY = {
    "income": "Income is too low for the amount requested",
    "debt_to_income": "Debt is high relative to income",
    "credit_history_months": "Length of credit history is too short",
}
MODEL_NAME = "credit-risk"


@contextmanager
def use_store(uri: str) -> Iterator[None]:
    """Point MLflow (the global URI and $MLFLOW_TRACKING_URI) at ``uri``; restore both after."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


@dataclass
class GovernanceStore:
    """Handles to what the fixture created."""

    root: Path
    tracking_uri: str
    model_name: str
    train_run_ids: dict[str, str]
    explain_run_ids: dict[str, str]  # "v1" (an older run), "v2" (current records), "v3" (its own gate fails)
    versions: dict[str, str]
    config_path: Path


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic loan table: income, DTI and history drive default; age weakly; noise none."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
    logit = -1.6 * x[:, 0] + 1.3 * x[:, 1] - 0.9 * x[:, 2] + 0.5 * x[:, 3] + 0.2 * x[:, 4]
    y = (logit + rng.normal(scale=0.5, size=n) > 0).astype(np.float32)
    return x, y


def train_model(seed: int, epochs: int = 150):
    """Train a 6 -> 8 -> 4 -> 1 MLP with full-batch Adam (a second or so on CPU)."""
    import torch

    torch.manual_seed(seed)
    x, y = make_data(768, seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(len(FEATURES), 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 4),
        torch.nn.ReLU(),
        torch.nn.Linear(4, 1),
        torch.nn.Sigmoid(),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)[:, None]
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = (model(xt)[:, 0] > 0.5).float().numpy()
    acc = float((pred == y).mean())
    tp = float(((pred == 1) & (y == 1)).sum())
    prec1 = tp / max(float((pred == 1).sum()), 1.0)
    rec1 = tp / max(float((y == 1).sum()), 1.0)
    tn = float(((pred == 0) & (y == 0)).sum())
    prec0 = tn / max(float((pred == 0).sum()), 1.0)
    rec0 = tn / max(float((y == 0).sum()), 1.0)
    metrics = {
        "accuracy": acc,
        "loss": float(loss.item()),
        "precision_class_0": prec0,
        "recall_class_0": rec0,
        "precision_class_1": prec1,
        "recall_class_1": rec1,
    }
    return model, metrics


def gradient_x_input(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local relevance (gradient x input of the output) and the model's probability."""
    import torch

    xt = torch.from_numpy(x).requires_grad_(True)
    out = model(xt)[:, 0]
    out.sum().backward()
    rel = (xt.grad * xt).detach().numpy().astype(np.float64)
    return rel, out.detach().numpy()


def validation_result(n: int, success: bool = True) -> dict:
    """A great-expectations 1.x validation result document (``to_json_dict`` shape)."""
    results = []
    for f in FEATURES:
        results.append(
            {
                "success": True,
                "expectation_config": {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": f}},
                "result": {"element_count": n, "unexpected_count": 0, "unexpected_percent": 0.0},
            }
        )
    results.append(
        {
            "success": success,
            "expectation_config": {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "income", "min_value": -6.0, "max_value": 6.0},
            },
            "result": {"element_count": n, "unexpected_count": 0 if success else 3, "unexpected_percent": 0.0},
        }
    )
    ok = sum(r["success"] for r in results)
    gx = {
        "success": success,
        "suite_name": "governance_contract",
        "results": results,
        "statistics": {
            "evaluated_expectations": len(results),
            "successful_expectations": ok,
            "unsuccessful_expectations": len(results) - ok,
            "success_percent": 100.0 * ok / len(results),
        },
    }
    # the explanation stage's wrapper (governance.validation.ValidationOutcome.to_dict)
    return {
        "success": success,
        "contract_source": "training data 'train' of the model's run",
        "n_expectations": len(results),
        "expectations": [dict(r["expectation_config"]["kwargs"], type=r["expectation_config"]["type"])
                         for r in results],
        "failures": [] if success else [{"expectation": "expect_column_values_to_be_between", "column": "income",
                                         "detail": "3 values outside [-6.0, 6.0]"}],
        "great_expectations": gx,
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties ranked by order; the fixture's values are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def add_directions(doc: dict, x: np.ndarray, rel: np.ndarray, pred: np.ndarray) -> None:
    """The stage's direction of effect, computed for real: per feature (overall and per predicted
    class) the Spearman correlation between its value and its signed relevance; mixed below 0.1."""
    def mark(entries: list[dict], rows: np.ndarray) -> None:
        for e in entries:
            j = FEATURES.index(e["feature"])
            rho = spearman(x[rows, j], rel[rows, j])
            e["value_relevance_correlation"] = rho
            e["direction"] = "mixed" if abs(rho) < 0.1 else "raises" if rho > 0 else "lowers"

    everyone = np.arange(len(x))
    mark(doc["features"], everyone)
    for cls, sub in (doc.get("by_class") or {}).items():
        mark(sub["features"], np.nonzero(pred.astype(str) == str(cls))[0])
    for mode_doc in (doc.get("modes") or {}).values():
        mark(mode_doc["features"], everyone)
        for cls, sub in (mode_doc.get("by_class") or {}).items():
            mark(sub["features"], np.nonzero(pred.astype(str) == str(cls))[0])


def dataset_record(role: str, name: str, frame: pd.DataFrame, folder: Path, digest: str) -> dict:
    """What the stage records in datasets.json when it reads an input: each file's hash, and one
    SHA-256 over the sorted "path\0sha256\n" lines."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    frame.to_parquet(path, index=False)
    digest_file = hashlib.sha256(path.read_bytes()).hexdigest()
    files = [{"path": path.name, "sha256": digest_file, "size": path.stat().st_size}]
    lines = "".join(f"{f['path']}\0{f['sha256']}\n" for f in files)
    return {"role": role, "source": str(path), "name": name, "n_rows": len(frame), "mlflow_digest": digest,
            "sha256": hashlib.sha256(lines.encode()).hexdigest(), "files": files}


def log_explanation_run(mlflow, client, model, model_uri: str, x: np.ndarray, *, passed: bool, seed: int,
                        experiment_id: str, current: bool = False, data_dir: Path | None = None) -> str:
    """Log an explanation run with every artifact of the contract; return its run id.

    ``current``: also what the stage records since issue 10 (datasets.json for two inputs,
    direction of effect, feature-order / contract / task tags); without it the run looks like one
    explained before those records existed."""
    from governance.aggregate import (
        BatchDraws,
        ImportanceAccumulator,
        decision_direction,
        global_importance_document,
        reason_codes,
        stability_document,
    )

    rel, prob = gradient_x_input(model, x)
    pred = (prob > 0.5).astype(int)
    # The explanation stage's own reductions (governance.aggregate) over the three "modes":
    # signed = gradient x input, default/contrastive = magnitudes (as the default rule spreads them).
    accs = {}
    draws = BatchDraws.make(seed, 0, len(x), 50)
    for k, mode in enumerate(("signed", "default", "contrastive")):
        r = rel if mode == "signed" else np.abs(rel) * (1 + 0.1 * k)
        accs[mode] = ImportanceAccumulator(list(FEATURES), n_bootstrap=50)
        accs[mode].update(r, draws, pred)
    gi, gi_long = global_importance_document(accs, "signed")
    if current:
        add_directions(gi, x, rel, pred)
    stability = stability_document(accs, "signed", seed)
    rho = stability["stability"]
    shares = rel / np.abs(rel).sum(axis=1, keepdims=True)
    reasons = reason_codes(shares, decision_direction("binary-classification", prob, pred), list(FEATURES),
                           top_n=2, dictionary=DICTIONARY)
    # how often each feature leads each side (the stage's reason_code_leaders summary)
    gi["reason_code_leaders"] = {
        side: {str(k): int(v) for k, v in reasons[f"{side}_1"].dropna().value_counts().items()}
        for side in ("supporting", "adverse")
    }
    reasons.insert(0, "prediction", pred)
    reasons.insert(0, "sample_id", np.arange(len(x)))
    layers = [
        {"module": "0", "type": "Linear", "share": 0.46, "rank": 1, "bias_share": 0.04, "relevance": 46.0,
         "branch_share": None, "n_units": 8,
         "top_units": [{"unit": 3, "mean_relevance": 0.21, "mean_abs_relevance": 0.3}]},
        {"module": "2", "type": "Linear", "share": 0.33, "rank": 2, "bias_share": 0.11, "relevance": 33.0,
         "branch_share": None, "n_units": 4,
         "top_units": [{"unit": 1, "mean_relevance": 0.4, "mean_abs_relevance": 0.5}]},
        {"module": "4", "type": "Linear", "share": 0.21, "rank": 3, "bias_share": 0.02, "relevance": 21.0,
         "branch_share": None, "n_units": 1,
         "top_units": [{"unit": 0, "mean_relevance": 1.0, "mean_abs_relevance": 1.0}]},
    ]
    from governance.quality import quality_metrics, quality_report

    quality = quality_report(model, x, task="binary-classification", modes=("signed", "default", "contrastive"),
                             n_samples=128, seed=0, feature_names=list(FEATURES))
    threshold = 0.05 if passed else 0.95
    value = quality["methods"]["backtrace_signed"]["delta_auc"]
    gates = {"passed": bool(value > threshold), "gates": [
        {"name": "delta AUC beats threshold", "metric": "delta_auc", "method": "backtrace_signed",
         "op": ">", "threshold": threshold, "value": value, "passed": bool(value > threshold)}]}
    config = {
        "task": "binary-classification", "target_column": "default", "feature_columns": FEATURES,
        "modes": ["signed", "default", "contrastive"], "primary_mode": "signed", "batch_size": 4096,
        "multiplier": 100.0, "reason_codes": {"top_n": 2, "dictionary": DICTIONARY},
        "gates": [{"metric": "delta_auc", "method": "backtrace_signed", "op": ">", "threshold": threshold}],
        "report": {"intended_purpose": "Rank consumer loan applications by probability of default.",
                   "out_of_scope": ["Employment decisions", "Pricing without human review"],
                   "human_oversight": "A credit officer reviews every declined application.",
                   "sample_decisions": {"n": 5, "select": "adverse", "adverse_predictions": [1]}},
        "model_card": {"developed_by": "Model Risk Lab", "license": "apache-2.0"},
    }
    df = pd.DataFrame(x, columns=FEATURES)
    df["default"] = (prob > 0.5).astype(int)
    local = pd.DataFrame(rel, columns=FEATURES)
    local.insert(0, "prediction", pred)
    local.insert(0, "sample_id", np.arange(len(x)))
    with mlflow.start_run(run_name="explain", experiment_id=experiment_id) as run, \
            tempfile.TemporaryDirectory() as tmp:
        g = Path(tmp) / "governance"
        (g / "explanations" / "plots").mkdir(parents=True)
        (g / "data_quality").mkdir()
        (g / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        (g / "data_quality" / "validation_result.json").write_text(json.dumps(validation_result(len(x)), indent=2))
        e = g / "explanations"
        (e / "global_importance.json").write_text(json.dumps(gi, indent=2))
        gi_long.to_parquet(e / "global_importance.parquet", index=False)
        (e / "layer_ranking.json").write_text(json.dumps({"primary_mode": "signed", "layers": layers}, indent=2))
        local.to_parquet(e / "local_relevance.parquet", index=False)
        reasons.to_parquet(e / "reason_codes.parquet", index=False)
        (e / "stability.json").write_text(json.dumps(stability, indent=2))
        (e / "quality.json").write_text(json.dumps(quality, indent=2))
        (e / "gates.json").write_text(json.dumps(gates, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 2))
        ax.barh([r["feature"] for r in gi["features"]], [r["importance"] for r in gi["features"]])
        fig.savefig(e / "plots" / "global_importance.png", metadata={"Software": None}, bbox_inches="tight")
        plt.close(fig)
        if current:  # two inputs, each hashed when read, and the sources kept as files
            reference = df.iloc[: len(df) // 2].reset_index(drop=True)
            inputs = [("validation", "validation", df), ("reference", "reference", reference)]
            records = []
            for role, name, frame in inputs:
                src = data_dir / f"{name}.parquet"
                ds = mlflow.data.from_pandas(frame, name=name, targets="default", source=str(src))
                records.append(dataset_record(role, name, frame, data_dir, ds.digest))
                mlflow.log_input(ds, context=role)
            (g / "data_quality" / "datasets.json").write_text(json.dumps({"datasets": records}, indent=2))
            vr = json.loads((g / "data_quality" / "validation_result.json").read_text())
            vr.update(independent=True, notes=[])
            (g / "data_quality" / "validation_result.json").write_text(json.dumps(vr, indent=2))
            digest = records[0]["mlflow_digest"]
        else:
            dataset = mlflow.data.from_pandas(df, name="validation", targets="default")
            mlflow.log_input(dataset, context="validation")
            digest = dataset.digest
        mlflow.log_artifacts(tmp)
        mlflow.set_tags({
            "governance.status": "explained", "governance.primary_mode": "signed",
            "governance.gates_passed": "true" if gates["passed"] else "false",
            "governance.model_uri": model_uri, "governance.dataset_digest": digest,
        })
        if current:
            mlflow.set_tags({"governance.feature_order": "verified", "governance.feature_order_source":
                             "model signature", "governance.contract_independent": "true",
                             "governance.task": "binary-classification", "governance.task_source": "config"})
        mlflow.log_metrics({"governance_n_samples": len(x),
                            "governance_top_feature_share": gi["features"][0]["importance"],
                            "governance_stability": rho, **quality_metrics(quality)})
    return run.info.run_id


def build_store(root: Path) -> GovernanceStore:
    """Create the whole store under ``root`` (takes ~20 s: two pt2 model exports)."""
    import mlflow
    import torch  # noqa: F401

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with use_store(uri):
        return _build_store(mlflow, root, uri)


def _build_store(mlflow, root: Path, uri: str) -> GovernanceStore:
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("credit", artifact_location=(root / "artifacts").as_uri())
    train_ids, explain_ids, versions = {}, {}, {}
    x_val, _ = make_data(160, seed=99)
    for key, seed in (("v1", 1), ("v2", 6)):
        model, metrics = train_model(seed)
        with mlflow.start_run(run_name=f"train-{key}", experiment_id=exp_id) as run:
            mlflow.log_params({"hidden": "8,4", "epochs": 150, "seed": seed})
            mlflow.log_metrics(metrics)
            info = mlflow.pytorch.log_model(
                model, name="model", input_example=x_val[:2], registered_model_name=MODEL_NAME,
                pip_requirements=["torch", "mlflow"],
            )
        train_ids[key] = run.info.run_id
        versions[key] = str(info.registered_model_version)
        uri_v = f"models:/{MODEL_NAME}/{versions[key]}"
        explain_ids[key] = log_explanation_run(mlflow, client, model, uri_v, x_val, passed=True, seed=seed,
                                               experiment_id=exp_id, current=key == "v2",
                                               data_dir=root / "data" / key)
        client.set_model_version_tag(MODEL_NAME, versions[key], "governance.run_id", explain_ids[key])
    # Version 1 was audited earlier (what `approve` leaves behind).
    client.set_model_version_tag(MODEL_NAME, versions["v1"], "governance.audited", "true")
    client.set_registered_model_alias(MODEL_NAME, "audited", versions["v1"])
    # Version 3: the same model as version 2, but its explanation failed a policy gate.
    mv3 = client.create_model_version(MODEL_NAME, f"models:/{info.model_id}", run_id=train_ids["v2"],
                                      model_id=info.model_id)
    versions["v3"] = str(mv3.version)
    explain_ids["v3"] = log_explanation_run(mlflow, client, model, f"models:/{MODEL_NAME}/{mv3.version}",
                                            x_val, passed=False, seed=3, experiment_id=exp_id)
    client.set_model_version_tag(MODEL_NAME, versions["v3"], "governance.run_id", explain_ids["v3"])
    cfg = root / "governance.yaml"
    cfg.write_text(yaml.safe_dump({
        "reason_codes": {"top_n": 2, "dictionary": DICTIONARY},
        "report": {"intended_purpose": "Rank consumer loan applications by probability of default.",
                   "out_of_scope": ["Employment decisions"],
                   "sample_decisions": {"n": 5, "select": "adverse", "adverse_predictions": [1]}},
        "model_card": {"developed_by": "Model Risk Lab", "license": "apache-2.0"},
    }))
    return GovernanceStore(root, uri, MODEL_NAME, train_ids, explain_ids, versions, cfg)


# ----------------------------------------------------------------------------- pytest fixtures
# Imported by tests/conftest.py so that one store and one set of rendered reports serve every
# report, archive, approval and model-card test (PDF rendering is the slow part).

import pytest  # noqa: E402


@dataclass
class Published:
    """The store plus the reports rendered from it."""

    store: GovernanceStore
    out_v2: Path  # --output-dir of the first `report` of version 2's run
    out_v2_again: Path  # the same report rendered a second time (determinism)
    out_v3: Path  # the failed-gate run's report
    seconds: float
    pdf_bytes: int


@pytest.fixture(scope="session")
def governance_store(tmp_path_factory) -> GovernanceStore:
    """A real sqlite MLflow store with registered models and explanation runs (MLflow's global
    state is left as it was: tests that use the store ask for ``tracking``)."""
    return build_store(tmp_path_factory.mktemp("governance-store"))


@pytest.fixture
def tracking(governance_store) -> Iterator[GovernanceStore]:
    """Point MLflow (and the CLI's environment) at the fixture store for one test."""
    with use_store(governance_store.tracking_uri):
        yield governance_store


@pytest.fixture(scope="session")
def published(governance_store, tmp_path_factory) -> Published:
    """`mlflow-governance report` run through the CLI: v2 twice, v3 (failed gate) once."""
    import time

    from click.testing import CliRunner

    from governance.cli import main

    base = tmp_path_factory.mktemp("reports")
    runner = CliRunner()
    outs = {}
    seconds = 0.0
    with use_store(governance_store.tracking_uri):
        for key, run_key in (("v2", "v2"), ("v2_again", "v2"), ("v3", "v3")):
            out = base / key
            t0 = time.perf_counter()
            res = runner.invoke(main, ["report", "--run-id", governance_store.explain_run_ids[run_key],
                                       "--config", str(governance_store.config_path), "--output-dir", str(out)])
            if key == "v2":
                seconds = time.perf_counter() - t0
            assert res.exit_code == 0, res.output + repr(res.exception)
            outs[key] = out
    pdf = outs["v2"] / "governance" / "reports" / "audit_report.pdf"
    return Published(governance_store, outs["v2"], outs["v2_again"], outs["v3"], seconds, pdf.stat().st_size)
