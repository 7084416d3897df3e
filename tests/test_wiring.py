"""The explanation stage uses what the model carries (issues 9 and 10, stage side), on a real
MLflow sqlite store, through ``mlflow-governance explain``:

* feature order: columns are selected by name in the model's order (signature, the training
  dataset's stored schema even when its rows cannot be loaded, or config): a validation file with
  its columns in another order gives the same explanation; with no names anywhere the stage says
  so on stderr, tags ``feature_order=unverified`` and the report flags it;
* a contract derived from the data it checks says so (stderr, tag, validation_result.json, the
  report), with no meaningless bounds; the training schema is preferred when its rows are gone;
* the task is inferred from the output when nothing names it (a 2-logit classifier, a sigmoid,
  an unbounded output as regression, never thresholded at 0);
* every expected failure is one line naming what is wrong;
* multi-input models, the model as a run input, the pickle opt-in tag, and the registered
  version's state after an explanation.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from governance.cli import main as cli

FEATURES = ["income", "debt", "age", "tenure", "utilisation"]
QUICK = ["--set", "quality.enabled=false", "--set", "aggregation.n_bootstrap=20", "--modes", "signed",
         "--primary-mode", "signed", "--quiet"]


def _frame(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Five features of very different scales (income in thousands, ratios in [0, 1]) and a label."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "income": rng.normal(50.0, 15.0, n), "debt": rng.uniform(0, 1, n), "age": rng.normal(40, 10, n),
        "tenure": rng.integers(0, 30, n).astype(float), "utilisation": rng.uniform(0, 1, n),
    }).astype(np.float32)
    df["y"] = (df["debt"] + df["utilisation"] > 1.0).astype(int)
    return df


def _net(head: nn.Module, n_in: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 8), nn.ReLU(), head).eval()


def _log(model: nn.Module, store, *, name: str, train: pd.DataFrame | None = None,
         example: object = None, register: str | None = None, **kw: object) -> str:
    """Log ``model`` in pt2 format in a new run of the store, with ``train`` logged as its training
    dataset WITHOUT a loadable source (``from_pandas(df)``: MLflow keeps only its schema)."""
    x = np.ascontiguousarray(_frame(8)[FEATURES].to_numpy(np.float32)) if example is None else example
    with mlflow.start_run(experiment_id=store.experiment_id):
        if train is not None:
            mlflow.log_input(mlflow.data.from_pandas(train, name="train", targets="y"), context="training")
        info = mlflow.pytorch.log_model(model, name=name, input_example=x, pip_requirements=["torch"],
                                        registered_model_name=register, **kw)
    return info.model_uri


def _explain(uri: str, data: Path, *extra: str) -> tuple[int, str, str, str | None]:
    """Run ``explain``; returns (exit code, stdout, stderr, run id)."""
    res = CliRunner().invoke(cli, ["explain", "--model-uri", uri, "--data", str(data), *extra])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    out = res.stdout.strip().splitlines()
    return res.exit_code, res.stdout, res.stderr, out[-1] if res.exit_code == 0 and out else None


def _tags(rid: str) -> dict[str, str]:
    return mlflow.MlflowClient().get_run(rid).data.tags


def _json(rid: str, path: str) -> dict:
    return json.loads(Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=path)).read_text())


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture()
def data(tmp_path: Path) -> dict[str, Path]:
    """The validation table as parquet, the same rows with the columns reversed, and as CSV."""
    df = _frame(240, seed=3)
    paths = {"ordered": tmp_path / "valid.parquet", "reversed": tmp_path / "reversed.parquet",
             "reversed_csv": tmp_path / "reversed.csv"}
    df.to_parquet(paths["ordered"], index=False)
    df[list(reversed(df.columns))].to_parquet(paths["reversed"], index=False)
    df[list(reversed(df.columns))].to_csv(paths["reversed_csv"], index=False)
    return paths


# ----------------------------------------------------------------------------- feature order


def test_training_schema_orders_the_features_even_without_its_rows(credit_store, data) -> None:
    """No signature names, training data logged without a source: the stored schema gives the
    order, the contract comes from it (independent, no bounds), and a reordered file (parquet or
    CSV) gives identical global importance."""
    uri = _log(_net(nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())), credit_store, name="schema-only",
               train=_frame(300, seed=1))
    results = {}
    for key in ("ordered", "reversed", "reversed_csv"):
        code, _, err, rid = _explain(uri, data[key], "--target-column", "y", *QUICK)
        assert code == 0, err
        tags = _tags(rid)
        assert tags["governance.feature_order"] == "verified"
        assert tags["governance.feature_order_source"] == "training dataset schema"
        assert tags["governance.contract_independent"] == "true"
        assert "feature order" not in err and "not independent" not in err
        results[key] = _json(rid, "governance/explanations/global_importance.json")
        validation = _json(rid, "governance/data_quality/validation_result.json")
    assert validation["independent"] is True
    assert validation["contract_source"].startswith("training dataset schema (training data 'train' of run ")
    assert any("stored schema" in n and "300 rows" in n for n in validation["notes"])
    assert results["ordered"]["feature_columns"] == FEATURES
    for key in ("reversed", "reversed_csv"):
        assert results[key]["features"] == results["ordered"]["features"]
        assert results[key]["feature_columns"] == FEATURES


def test_reordered_file_without_the_schema_explains_other_features(credit_store, data, tmp_path) -> None:
    """The mistake the order check prevents: the same model without a logged schema explains the
    reversed file's columns as whatever sits in each position (different importance), and says
    it could not be sure: stderr once, tags, contract not independent, the report's flags."""
    from governance.report.evidence import load_run_evidence
    from governance.report.inputs import NOT_INDEPENDENT, ReportInputs

    uri = _log(_net(nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())), credit_store, name="no-names")
    runs = {}
    for key in ("ordered", "reversed"):
        code, _, err, rid = _explain(uri, data[key], "--target-column", "y", *QUICK)
        assert code == 0, err
        assert err.count("the model carries no feature names") == 1
        assert err.count("contract not independent of the data it checks") == 1
        runs[key] = rid
    tags = _tags(runs["ordered"])
    assert tags["governance.feature_order"] == "unverified" and tags["governance.feature_order_source"] == "none"
    assert tags["governance.contract_independent"] == "false"
    a = _json(runs["ordered"], "governance/explanations/global_importance.json")
    b = _json(runs["reversed"], "governance/explanations/global_importance.json")
    assert b["feature_columns"] == list(reversed(FEATURES))
    by_name = lambda gi: {f["feature"]: f["importance"] for f in gi["features"]}  # noqa: E731
    assert by_name(a) != pytest.approx(by_name(b), rel=1e-3)
    validation = _json(runs["ordered"], "governance/data_quality/validation_result.json")
    assert validation["independent"] is False and validation["contract_source"] == "validation data schema"
    assert validation["notes"]
    for e in validation["expectations"]:  # a finiteness check, no bounds that mean nothing
        assert "min_value" not in e or abs(float(e["min_value"])) < 1e300, e
        assert "max_value" not in e or abs(float(e["max_value"])) < 1e300, e
    assert {"type": "expect_column_values_to_not_be_in_set", "column": "income",
            "value_set": ["inf", "-inf"]} in validation["expectations"]
    inp = ReportInputs(load_run_evidence(runs["ordered"], with_architecture=False, workdir=tmp_path))
    texts = " ".join(f["text"] for f in inp.flags)
    assert "Feature order UNVERIFIED" in texts and NOT_INDEPENDENT in texts
    assert inp.validation["success"] == NOT_INDEPENDENT


def test_signature_names_select_columns_by_name_and_extra_columns_are_ignored(credit_store, data,
                                                                               tmp_path: Path) -> None:
    """A model logged with a DataFrame input example (pickle format keeps its column names):
    the signature orders the features; an extra column is ignored with a note; config that
    contradicts the signature is one line."""
    example = _frame(8)[FEATURES]
    uri = _log(_net(nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())), credit_store, name="named", example=example,
               serialization_format="pickle")
    extra = _frame(240, seed=3).assign(branch=7.0)
    path = tmp_path / "extra.parquet"
    extra[["branch"] + list(reversed(extra.columns[:-1]))].to_parquet(path, index=False)
    code, _, err, rid = _explain(uri, path, "--target-column", "y", "--allow-pickle", *QUICK)
    assert code == 0, err
    assert err.count("'branch' of the data are not features of the model (model signature); they are ignored") == 1
    tags = _tags(rid)
    assert tags["governance.feature_order_source"] == "model signature"
    assert tags["governance.allow_pickle"] == "true"
    ordered_code, _, _, ordered = _explain(uri, data["ordered"], "--target-column", "y", "--allow-pickle", *QUICK)
    assert ordered_code == 0
    assert (_json(rid, "governance/explanations/global_importance.json")["features"]
            == _json(ordered, "governance/explanations/global_importance.json")["features"])
    code, _, err, _ = _explain(uri, data["ordered"], "--target-column", "y", "--allow-pickle",
                               "--feature-columns", ",".join(reversed(FEATURES)), *QUICK)
    assert code == 1
    assert "differ from the model signature's columns" in _one_line(err)


# ----------------------------------------------------------------------------- task


@pytest.mark.parametrize("head, task, source, note", [
    (nn.Linear(8, 2), "multiclass-classification", "inferred from output (2 outputs per sample)", None),
    (nn.Sequential(nn.Linear(8, 1), nn.Sigmoid()), "binary-classification",
     "inferred from output (one output per sample in [0, 1])", None),
    (nn.Linear(8, 1), "regression", "inferred from output (one output per sample, not in [0, 1])",
     "explained as regression of that score, not thresholded into classes"),
])
def test_task_inferred_without_any_config(credit_store, data, head, task, source, note) -> None:
    model = _net(head)
    if task == "regression":  # centre the output on the data: negative and positive predictions
        with torch.no_grad():
            y = model(torch.from_numpy(pd.read_parquet(data["ordered"])[FEATURES].to_numpy(np.float32)))
            head.bias -= y.median()
    uri = _log(model, credit_store, name=task, train=_frame(300, seed=1))
    code, _, err, rid = _explain(uri, data["ordered"], "--target-column", "y", *QUICK)
    assert code == 0, err
    tags = _tags(rid)
    assert tags["governance.task"] == task and tags["governance.task_source"] == source
    if note:
        assert err.count(note) == 1
    else:
        assert "regression" not in err
    local = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=rid, artifact_path="governance/explanations/local_relevance.parquet"))
    reasons = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=rid, artifact_path="governance/explanations/reason_codes.parquet"))
    if task == "regression":  # the score itself, never a class from a threshold at 0
        assert local["prediction"].dtype.kind == "f" and local["prediction"].nunique() > 10
        assert (local["prediction"] < 0).any() and (local["prediction"] > 0).any()
        # positive relevance raises the predicted value whatever the value's sign: the first
        # supporting reason is the feature that raises it most (not flipped below 0)
        rel = local[FEATURES].to_numpy()
        raises = rel.max(1) > 0
        expected = np.array(FEATURES)[rel.argmax(1)]
        assert raises.sum() > 10
        assert (reasons["supporting_1"].to_numpy()[raises] == expected[raises]).all()
    else:
        assert set(local["prediction"].unique()) <= {0, 1}


def test_task_that_cannot_fit_the_output_is_one_line(credit_store, data) -> None:
    uri = _log(_net(nn.Linear(8, 2)), credit_store, name="two-logits", train=_frame(300, seed=1))
    code, _, err, _ = _explain(uri, data["ordered"], "--target-column", "y", "--task", "binary-classification",
                               *QUICK)
    assert code == 1
    line = _one_line(err)
    assert "binary-classification (config) expects one output per sample" in line and "multiclass" in line


# ----------------------------------------------------------------------------- one clear line


def test_expected_failures_are_one_line(credit_store, data, tmp_path: Path) -> None:
    uri = _log(_net(nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())), credit_store, name="lines",
               train=_frame(300, seed=1))
    code, _, err, _ = _explain(uri, data["ordered"], "--target-column", "label", *QUICK)
    assert code == 1 and "target column 'label' is not a column of the data" in _one_line(err)
    # the target not named: the schema's 6 columns cannot be the model's 5 inputs
    code, _, err, _ = _explain(uri, data["ordered"], *QUICK)
    assert code == 1
    line = _one_line(err)
    assert "names 6 feature columns but the model takes 5 inputs" in line and "--target-column" in line
    # a feature column missing: the contract names it in one line (exit 2, the failed contract is logged)
    missing = tmp_path / "missing.parquet"
    _frame(50).drop(columns=["age"]).to_parquet(missing, index=False)
    code, _, err, _ = _explain(uri, missing, "--target-column", "y", *QUICK)
    line = _one_line(err)
    assert code == 2 and line.startswith("error: data contract failed (training dataset schema (")
    assert "expect_table_columns_to_match_set: missing column(s) ['age']" in line


class Sorted(nn.Module):
    """torch.sort has no relevance rule."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(torch.sort(self.fc(x), dim=1).values))


def test_an_op_without_a_rule_is_one_line(credit_store, data) -> None:
    torch.manual_seed(0)
    uri = _log(Sorted().eval(), credit_store, name="sorted", train=_frame(300, seed=1))
    code, _, err, _ = _explain(uri, data["ordered"], "--target-column", "y", *QUICK)
    assert code == 1
    line = _one_line(err)
    assert "no relevance rule for op 'aten.sort" in line and "governance.backtrace.register_rule" in line


# ----------------------------------------------------------------------------- several inputs


class TwoInputs(nn.Module):
    """Four numeric features plus a categorical index through an embedding; one probability."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 3)
        self.fc1 = nn.Linear(7, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 1)

    def forward(self, numeric: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(self.act(self.fc1(torch.cat([numeric, self.emb(category)], dim=1)))))


def test_a_model_with_two_inputs(credit_store, tmp_path: Path) -> None:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    torch.manual_seed(0)
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 4), name="numeric"),
                                        TensorSpec(np.dtype("int64"), (-1,), name="category")]),
                         outputs=Schema([TensorSpec(np.dtype("float32"), (-1, 1))]))
    example = (np.zeros((4, 4), np.float32), np.arange(4, dtype=np.int64))
    uri = _log(TwoInputs().eval(), credit_store, name="two-inputs", example=example, signature=sig)
    df = _frame(120, seed=5)
    path = tmp_path / "two.parquet"
    df.to_parquet(path, index=False)
    code, _, err, _ = _explain(uri, path, "--target-column", "y", *QUICK)
    assert code == 1
    assert "takes 2 inputs (numeric: float32 (-1, 4); category: int64 (-1,))" in _one_line(err)
    mapping = ["--set", "inputs.numeric=[income, debt, age, utilisation]", "--set", "inputs.category=[tenure]"]
    code, _, err, rid = _explain(uri, path, "--target-column", "y", *mapping, *QUICK)
    assert code == 0, err
    gi = _json(rid, "governance/explanations/global_importance.json")
    assert gi["feature_columns"] == ["income", "debt", "age", "utilisation", "tenure"]
    assert _tags(rid)["governance.feature_order_source"] == "config"


# ----------------------------------------------------------------------------- run and registry


def test_the_run_records_its_model_and_the_version_its_evidence(credit_store, data) -> None:
    from governance import registry

    name = "wiring-registered"
    uri = _log(_net(nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())), credit_store, name="registered",
               train=_frame(300, seed=1), register=name)
    code, _, err, rid = _explain(f"models:/{name}/1", data["ordered"], "--target-column", "y", *QUICK)
    assert code == 0, err
    run = mlflow.MlflowClient().get_run(rid)
    model_id = mlflow.models.get_model_info(uri).model_id
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    state = registry.version_state(mlflow.MlflowClient(), name, "1")
    assert state.current_run_id == rid
    assert "governance.allow_pickle" not in run.data.tags


def test_two_logits_with_nothing_but_the_model_and_its_features(credit_store, tmp_path: Path) -> None:
    """No config, no training data, no target: the features file alone; multiclass is inferred and
    the unverified order and the self-derived contract are said, each once."""
    uri = _log(_net(nn.Linear(8, 2)), credit_store, name="bare")
    path = tmp_path / "features.csv"
    _frame(100, seed=4)[FEATURES].to_csv(path, index=False)
    res = CliRunner().invoke(cli, ["explain", "--model-uri", uri, "--data", str(path), "--quiet",
                                   "--set", "quality.enabled=false", "--set", "aggregation.n_bootstrap=20"])
    assert res.exit_code == 0, res.stderr
    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 2 and "Traceback" not in res.stderr, res.stderr
    tags = _tags(res.stdout.strip().splitlines()[-1])
    assert tags["governance.task"] == "multiclass-classification"
    assert tags["governance.feature_order"] == "unverified" and tags["governance.contract_independent"] == "false"
