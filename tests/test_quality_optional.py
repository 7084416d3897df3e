"""SHAP and LIME baselines: optional, used only when their packages are installed."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
import torch
from torch import nn

from governance.quality import quality_report
from governance.quality.baselines import GradientXInput, RandomAttribution


def _linear(F: int = 5) -> nn.Linear:
    m = nn.Linear(F, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0]]))
        m.bias.fill_(0.2)
    return m.eval()


def _data(n: int = 200) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(7)) * torch.tensor([1.0, 2.0, 0.5, 1.0, 1.5])


def test_missing_package_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "shap", None)  # import shap -> ImportError
    monkeypatch.setitem(sys.modules, "lime", None)
    monkeypatch.setitem(sys.modules, "lime.lime_tabular", None)
    q = quality_report(_linear(), _data(), task="regression", modes=(), n_samples=16, metrics=("complexity",),
                       explainers=[GradientXInput(), RandomAttribution()], optional_baselines=("kernel_shap", "lime"))
    assert q["errors"]["kernel_shap"].startswith("not installed")
    assert q["errors"]["lime"].startswith("not installed")
    assert "kernel_shap" not in q["methods"] and "gradient_x_input" in q["methods"]


def test_kernel_shap_is_exact_on_a_linear_model():
    pytest.importorskip("shap")
    from governance.quality.baselines import KernelShap

    X = _data()
    m = _linear()
    ks = KernelShap(X, nsamples=64, n_background=50, seed=0)  # 2^5 = 32 coalitions: enumerated exactly
    x = X[:6]
    att = ks.explain(m, x, torch.zeros(6, dtype=torch.long))
    mean = torch.as_tensor(ks.background).float().mean(0)
    assert torch.allclose(att.values, m.weight.detach() * (x - mean), atol=1e-4)
    assert torch.allclose(att.values.sum(1), att.total, atol=1e-4)  # efficiency


def test_lime_recovers_the_linear_coefficients():
    pytest.importorskip("lime")
    from governance.quality.baselines import Lime

    X = _data()
    m = _linear()
    att = Lime(X, num_samples=400, seed=0).explain(m, X[:3], torch.zeros(3, dtype=torch.long))
    # LIME fits on standardised features: coefficient_i = w_i * std_i
    expected = m.weight.detach()[0] * X.double().std(0).float()
    for row in att.values:
        assert torch.allclose(row, expected, rtol=0.05, atol=0.05)
    again = Lime(X, num_samples=400, seed=0).explain(m, X[:3], torch.zeros(3, dtype=torch.long))
    assert torch.equal(att.values, again.values)  # seeded


def test_optional_baselines_in_the_report():
    pytest.importorskip("shap")
    pytest.importorskip("lime")
    q = quality_report(_linear(), _data(), task="regression", modes=(), n_samples=12,
                       metrics=("faithfulness_correlation", "complexity", "completeness"),
                       explainers=[RandomAttribution()], optional_baselines=("kernel_shap", "lime"))
    assert not q["errors"], q["errors"]
    assert q["methods"]["kernel_shap"]["completeness_gap"] < 1e-3
    assert q["methods"]["kernel_shap"]["faithfulness_correlation"] > 0.9
