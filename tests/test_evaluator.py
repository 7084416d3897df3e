"""The MLflow evaluator plugin is opt-in: `mlflow.models.evaluate()` without `evaluators` behaves
exactly as without the plugin (same evaluators, same metrics, no governance evidence, no error on
a model the engine cannot explain); named, it logs the governance evidence."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from explain_fixtures import MODEL_NAME, artifact_paths

EXPL = "governance/explanations/"
FAST = {"quality": {"enabled": False}, "aggregation": {"n_bootstrap": 50}}


class SortedFeatures(nn.Module):
    """A regressor through torch.sort: an op without a relevance rule."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sort(self.fc(x), dim=1).values)[:, 0]


def _without_plugin(call):
    """Run ``call`` with the governance evaluator unregistered (MLflow as if it were not installed)."""
    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry as rg

    saved = rg._registry.pop("governance")
    try:
        return call()
    finally:
        rg._registry["governance"] = saved


@pytest.fixture()
def sorted_model(credit_store):
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        info = mlflow.pytorch.log_model(SortedFeatures().eval(), name="sorted", input_example=x[:4],
                                        pip_requirements=["torch"])
    frame = pd.DataFrame(x, columns=list("abcd"))
    frame["y"] = x[:, 0] * 2.0 - x[:, 1]
    return info.model_uri, frame


def test_resolution_is_the_same_as_without_the_plugin() -> None:
    import mlflow.models.evaluation.evaluator_registry  # noqa: F401  (registers the plugin, as evaluate() does)
    from mlflow.models.evaluation import base

    def resolve(*args):
        return base.resolve_evaluators_and_configs(*args)

    for model_type in ("classifier", "regressor", None):
        with_plugin = [b.name for b in resolve(None, None, model_type)]
        assert with_plugin == _without_plugin(lambda: [b.name for b in resolve(None, None, model_type)])
        assert "governance" not in with_plugin
    assert [b.name for b in resolve(["governance"], None, "classifier")] == ["governance"]
    assert [b.name for b in resolve("governance", None, "regressor")] == ["governance"]
    assert "governance" in [b.name for b in resolve(["default", "governance"], None, "classifier")]
    assert "governance" not in [b.name for b in resolve("default", None, "classifier")]


FRESH_EVALUATE = """
import json, sys, mlflow, pandas as pd
frame = pd.read_parquet(sys.argv[2])
with mlflow.start_run(experiment_id=sys.argv[3]) as run:
    result = mlflow.models.evaluate(sys.argv[1], frame, targets="y", model_type="regressor")
print(json.dumps({"run_id": run.info.run_id, "metrics": sorted(result.metrics)}))
"""


def test_evaluate_without_evaluators_ignores_the_plugin(credit_store, sorted_model, tmp_path: Path) -> None:
    """The first evaluate() of a fresh process (where MLflow loads the plugin) and a later one."""
    import os
    import subprocess
    import sys

    uri, frame = sorted_model
    frame.to_parquet(tmp_path / "frame.parquet")
    proc = subprocess.run([sys.executable, "-c", FRESH_EVALUATE, uri, str(tmp_path / "frame.parquet"),
                           credit_store.experiment_id], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, MLFLOW_TRACKING_URI=credit_store.tracking_uri))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])

    def evaluate(**kw):
        with mlflow.start_run(experiment_id=credit_store.experiment_id) as run:
            result = mlflow.models.evaluate(uri, frame, targets="y", model_type="regressor", **kw)
        return result, run.info.run_id

    result, rid = evaluate()  # the engine has no rule for aten.sort: this must not matter here
    plain, _ = _without_plugin(evaluate)
    assert sorted(result.metrics) == sorted(plain.metrics) == fresh["metrics"]
    assert "mean_squared_error" in result.metrics
    for run_id in (rid, fresh["run_id"]):
        assert not any(p.startswith("governance/") for p in artifact_paths(run_id))
        assert not any(k.startswith("governance.") for k in mlflow.MlflowClient().get_run(run_id).data.tags)
    assert not any(k.startswith("governance") for k in result.metrics)
    # named, it runs, and fails on the op it cannot explain, naming it
    with pytest.raises(Exception, match="no relevance rule for op 'aten.sort.default'"):
        evaluate(evaluators=["governance"], evaluator_config={"governance": FAST})


class SmallRegressor(nn.Module):
    """A regressor the engine explains, with one output per sample (N,) as MLflow's regressor wants."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x)))[:, 0]


def test_named_evaluator_logs_the_evidence(credit_store, sorted_model) -> None:
    df = pd.read_parquet(credit_store.validation_parquet).head(120)
    with mlflow.start_run(experiment_id=credit_store.experiment_id) as run:
        result = mlflow.models.evaluate(
            f"models:/{MODEL_NAME}/1", df, targets="default", model_type="classifier",
            evaluators=["governance"], evaluator_config={"governance": {**FAST, "modes": ["signed"]}},
        )
    assert result.metrics["governance_n_samples"] == 120
    files = artifact_paths(run.info.run_id)
    assert EXPL + "global_importance.json" in files and EXPL + "reason_codes.parquet" in files
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                     artifact_path=EXPL + "global_importance.json"))
    gi = json.loads(local.read_text())
    assert "default" not in {f["feature"] for f in gi["features"]}  # the target is not a feature
    # beside MLflow's default evaluator
    _, frame = sorted_model
    torch.manual_seed(0)
    with mlflow.start_run(experiment_id=credit_store.experiment_id) as run:
        info = mlflow.pytorch.log_model(SmallRegressor().eval(), name="reg", pip_requirements=["torch"],
                                        input_example=frame[list("abcd")].to_numpy()[:4])
        both = mlflow.models.evaluate(info.model_uri, frame, targets="y", model_type="regressor",
                                      evaluators=["default", "governance"],
                                      evaluator_config={"governance": {**FAST, "modes": ["signed"]}})
    assert "mean_squared_error" in both.metrics and both.metrics["governance_n_samples"] == len(frame)
    assert EXPL + "global_importance.json" in artifact_paths(run.info.run_id)
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.tags["governance.status"] == "explained"


def test_non_pytorch_models_are_left_alone(credit_store) -> None:
    from sklearn.linear_model import LogisticRegression

    x = pd.DataFrame(np.random.default_rng(0).normal(size=(80, 3)), columns=list("abc"))
    y = (x["a"] > 0).astype(int)
    with mlflow.start_run(experiment_id=credit_store.experiment_id) as run:
        info = mlflow.sklearn.log_model(LogisticRegression().fit(x, y), name="m")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = mlflow.models.evaluate(info.model_uri, x.assign(y=y), targets="y", model_type="classifier")
        assert not any("governance" in str(w.message) for w in caught)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            named = mlflow.models.evaluate(info.model_uri, x.assign(y=y), targets="y", model_type="classifier",
                                           evaluators=["default", "governance"])
    assert any("PyTorch-flavour models only" in str(w.message) for w in caught)
    for r in (result, named):
        assert "accuracy_score" in r.metrics and "governance_n_samples" not in r.metrics
    assert not any(p.startswith("governance/") for p in artifact_paths(run.info.run_id))
