"""``quality_report`` (the quality.json document) and ``evaluate_gates`` as docs/contracts.md states them."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pandas as pd
import pytest
import torch
from torch import nn

from governance.quality import METRICS, evaluate_gates, quality_metrics, quality_report
from governance.quality.baselines import Attribution, Explainer, GradientXInput, RandomAttribution
from governance.quality.report import decision_polarity


def _mlp(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def _data(n: int = 50) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(1))


BASELINES = [GradientXInput(), RandomAttribution(0)]


def test_document_shape_directions_and_json():
    q = quality_report(_mlp(), _data(), task="multiclass-classification", modes=(), explainers=BASELINES, n_samples=32)
    assert q["n_samples"] == 32 and q["modality"] == "tabular"
    assert set(q["methods"]) == {"gradient_x_input", "random"}
    for name, spec in q["metrics"].items():
        assert spec["direction"] in ("higher", "lower") and "parameters" in spec and name in METRICS
    for row in q["methods"].values():
        assert set(row) <= set(q["metrics"])
        assert all(v is None or isinstance(v, float) for v in row.values())
    assert "completeness_gap" not in q["methods"]["random"]  # random distributes nothing
    json.dumps(q, allow_nan=False)  # strict JSON: undefined values are None, never NaN
    flat = quality_metrics(q)
    assert flat["governance_quality_gradient_x_input_delta_auc"] == q["methods"]["gradient_x_input"]["delta_auc"]


def test_deterministic_and_leaves_model_and_torch_state_alone():
    model = _mlp().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    kw = dict(task="multiclass-classification", modes=(), n_samples=40, seed=3)
    q1 = quality_report(model, _data(), explainers=[GradientXInput(), RandomAttribution(3)], **kw)
    q2 = quality_report(model, _data(), explainers=[GradientXInput(), RandomAttribution(3)], **kw)
    assert q1 == q2
    assert model.training  # mode restored
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.is_grad_enabled() == grad and torch.get_num_threads() == threads
    q3 = quality_report(model, _data(), explainers=[GradientXInput(), RandomAttribution(3)],
                        **{**kw, "seed": 4})
    assert q3["methods"]["random"] != q1["methods"]["random"]  # the seed matters


def test_dataframe_names_ground_truth_and_metric_selection():
    w = torch.tensor([[4.0, 0.0, -3.0, 0.0, 0.1]])
    model = nn.Linear(5, 1)
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.zero_()
    df = pd.DataFrame(_data(200).numpy(), columns=list("abcde"))
    q = quality_report(model, df, task="regression", modes=(), explainers=BASELINES, ground_truth=["a", "c"],
                       metrics=("ground_truth", "faithfulness_correlation"), n_samples=100)
    gxi = q["methods"]["gradient_x_input"]
    assert gxi["ground_truth_hits"] == 2.0 and gxi["ground_truth_recall"] == 1.0
    assert q["details"]["gradient_x_input"]["top_features"] == ["a", "c"]
    assert set(gxi) == {"ground_truth_hits", "ground_truth_recall", "ground_truth_local_recall", "faithfulness_correlation"}
    with pytest.raises(ValueError):
        quality_report(model, df, task="regression", modes=(), explainers=BASELINES, ground_truth=["zz"])
    with pytest.raises(ValueError):
        quality_report(model, df, task="regression", modes=(), explainers=BASELINES, metrics=("nonsense",))


def test_failing_method_is_reported_not_raised():
    class Broken(Explainer):
        name = "backtrace_default"

        def explain(self, model, x, target) -> Attribution:
            raise RuntimeError("no relevance rule for op 'aten.foo'")

    q = quality_report(_mlp(), _data(), task="multiclass-classification", explainers=[Broken(), RandomAttribution()],
                       n_samples=16)
    assert "backtrace_default" not in q["methods"] and "aten.foo" in q["errors"]["backtrace_default"]
    g = evaluate_gates(q, [{"name": "bt", "metric": "delta_auc", "method": "primary", "op": ">", "threshold": "random"}])
    assert not g["passed"] and "aten.foo" in g["gates"][0]["reason"]


def test_binary_decision_polarity():
    out = torch.tensor([[0.9], [0.2], [0.5]])
    assert decision_polarity(out, "binary-classification", "raw").tolist() == [1.0, -1.0, 1.0]
    assert decision_polarity(torch.tensor([[2.0], [-1.0]]), "binary-classification", "sigmoid").tolist() == [1.0, -1.0]
    assert decision_polarity(torch.rand(2, 3), "multiclass-classification", "softmax").tolist() == [1.0, 1.0]


def test_binary_model_class0_decisions_are_explained_consistently():
    # p = sigmoid(w.x): for class-0 decisions the explained score is 1 - p and the attribution is negated,
    # so the exact (linear-in-logit) gradient x input still flips faithfully: delta AUC > 0 on both classes.
    model = nn.Sequential(nn.Linear(5, 1), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -2.0, 1.0, 0.0, 0.0]]))
        model[0].bias.zero_()
    q = quality_report(model, _data(300), task="binary-classification", modes=(), n_samples=300,
                       explainers=[GradientXInput(), RandomAttribution(1)], metrics=("flipping",), baseline="zero")
    assert q["methods"]["gradient_x_input"]["delta_auc"] > 0.2
    assert abs(q["methods"]["random"]["delta_auc"]) < 0.05


def test_token_inputs_need_a_baseline_token():
    emb_model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    ids = torch.randint(0, 10, (8, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="baseline_token_id"):
        quality_report(emb_model, ids, task="multiclass-classification", explainers=BASELINES)
    q = quality_report(emb_model, ids, task="multiclass-classification", explainers=BASELINES, baseline_token_id=0,
                       protected_ids=[1], metrics=("flipping", "complexity", "max_sensitivity", "faithfulness_correlation"))
    assert q["modality"] == "token" and q["methods"]["gradient_x_input"]["delta_auc"] is not None
    assert q["metrics"]["max_sensitivity"]["parameters"]["neighbourhood"].startswith("one token")


# -- gates ------------------------------------------------------------------------------------------

Q = {
    "primary_method": "backtrace_signed",
    "methods": {
        "backtrace_signed": {"delta_auc": 0.4, "mprt_spearman": 0.3, "entropy": None},
        "random": {"delta_auc": 0.01, "mprt_spearman": 0.0},
    },
    "errors": {},
}


def test_gates_pass_and_fail():
    res = evaluate_gates(Q, [
        {"name": "beats random", "metric": "delta_auc", "method": "backtrace_signed", "op": ">", "threshold": "random"},
        {"name": "mprt", "metric": "mprt_spearman", "method": "primary", "op": "<", "threshold": 0.5},
    ])
    assert res["passed"] is True
    assert [g["passed"] for g in res["gates"]] == [True, True]
    assert res["gates"][0]["threshold_value"] == 0.01 and res["gates"][0]["value"] == 0.4
    assert res["gates"][1]["method"] == "backtrace_signed"
    res = evaluate_gates(Q, [
        {"name": "beats random", "metric": "delta_auc", "method": "backtrace_signed", "op": ">", "threshold": "random"},
        {"name": "strict", "metric": "delta_auc", "method": "backtrace_signed", "op": ">=", "threshold": 0.5},
    ])
    assert res["passed"] is False and [g["passed"] for g in res["gates"]] == [True, False]
    assert set(res["gates"][1]) >= {"name", "metric", "method", "op", "threshold", "value", "passed"}


def test_gates_missing_values_fail_with_reason_and_bad_config_raises():
    res = evaluate_gates(Q, [
        {"name": "undefined", "metric": "entropy", "method": "backtrace_signed", "op": "<", "threshold": 2},
        {"name": "no method", "metric": "delta_auc", "method": "integrated_gradients", "op": ">", "threshold": 0},
        {"name": "no ref", "metric": "delta_auc", "method": "backtrace_signed", "op": ">", "threshold": "shap"},
        {"name": "string number", "metric": "delta_auc", "method": "backtrace_signed", "op": ">", "threshold": "0.1"},
    ])
    assert [g["passed"] for g in res["gates"]] == [False, False, False, True]
    assert all("reason" in g for g in res["gates"][:3])
    assert evaluate_gates(Q, []) == {"passed": True, "gates": []}
    with pytest.raises(ValueError, match="op"):
        evaluate_gates(Q, [{"metric": "delta_auc", "method": "random", "op": "~", "threshold": 0}])
    with pytest.raises(ValueError, match="threshold"):
        evaluate_gates(Q, [{"metric": "delta_auc", "method": "random", "op": ">"}])


def test_token_path_on_a_tiny_bert_with_every_method():
    """quality_report on (N, T) ids of a small random BERT + head: every method (DLBacktrace included
    when the engine is importable) produces (N, T) attributions; [CLS]/[SEP]/[PAD] are never ranked."""
    transformers = pytest.importorskip("transformers")
    try:
        from governance.backtrace import Backtrace  # noqa: F401
        modes = ("default", "signed")
    except ImportError:
        modes = ()

    class TinyBert(nn.Module):
        def __init__(self):
            super().__init__()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=32, max_position_embeddings=16)
                self.encoder = transformers.BertModel(cfg, add_pooling_layer=False)
                self.head = nn.Linear(16, 2)

        def forward(self, input_ids):
            mask = (input_ids != 0).long()
            h = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
            return self.head(h[:, 0])

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (12, 8), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    ids[:4, 5:] = 0  # padded rows
    ids[:4, 5] = 3
    q = quality_report(TinyBert().eval(), ids, task="multiclass-classification", modes=modes, baseline_token_id=4,
                       protected_ids=(0, 2, 3), metrics=("flipping", "complexity", "completeness"), ig_steps=64)
    assert not q["errors"], q["errors"]
    assert set(q["methods"]) == {f"backtrace_{m}" for m in modes} | {"gradient_x_input", "integrated_gradients", "random"}
    assert q["metrics"]["morf_auc"]["parameters"]["n_steps"] == 6  # the longest row has 6 free tokens
    assert q["methods"]["integrated_gradients"]["completeness_gap"] < 0.05


def test_exported_graph_module_as_mlflow_loads_it():
    """MLflow's pt2 flavour hands back torch.export's GraphModule: no eval()/train(), parameters read
    with get_attr. MPRT still finds the layers (top-down) and the report runs."""
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid()).eval()
    x = _data(40)
    gm = torch.export.export(m, (x[:4],), dynamic_shapes={"input": {0: torch.export.Dim("batch")}}).module()
    q = quality_report(gm, x, task="binary-classification", modes=(), explainers=BASELINES, n_samples=24,
                       metrics=("mprt", "flipping"))
    assert not q["errors"], q["errors"]
    assert list(q["details"]["gradient_x_input"]["mprt_spearman_per_layer"]) == ["2", "0"]
    assert q["methods"]["gradient_x_input"]["mprt_spearman"] < 0.95


def test_primary_gate_without_a_primary_method_fails():
    q = {"primary_method": None, "methods": {"random": {"delta_auc": 0.0}}, "errors": {}}
    res = evaluate_gates(q, [{"metric": "delta_auc", "method": "primary", "op": ">", "threshold": -1}])
    assert res["passed"] is False and "no results" in res["gates"][0]["reason"]
    assert res["gates"][0]["method"] == "primary"
