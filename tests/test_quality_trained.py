"""Quality metrics on trained models: a tabular MLP with known drivers and a CNN on digits.

Gradient x input, integrated gradients and DLBacktrace must beat the random explainer on delta AUC
and faithfulness correlation, and their explanations must lose similarity when the model's layers
are randomised (MPRT). The DLBacktrace cases skip only while the engine cannot be imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
import torch

from _quality_models import accuracy, digits, synthetic_tabular, train_digits_cnn, train_tabular_mlp
from governance.quality import quality_report
from governance.quality.baselines import GradientXInput, IntegratedGradients, RandomAttribution


def _engine_available() -> bool:
    try:
        from governance.backtrace import Backtrace  # noqa: F401
    except ImportError:
        return False
    return True


ENGINE = _engine_available()
BACKTRACE = ["backtrace_default", "backtrace_contrastive", "backtrace_signed"]


@pytest.fixture(scope="module")
def tabular():
    X, y, names, drivers = synthetic_tabular(n=1000)
    model = train_tabular_mlp(X[:800], y[:800], epochs=120)
    assert accuracy(model, X[800:], y[800:]) > 0.85
    modes = ("default", "contrastive", "signed") if ENGINE else ()
    q = quality_report(model, X[800:], task="binary-classification", modes=modes, n_samples=96,
                       feature_names=names, ground_truth=drivers, sensitivity_perturbations=4, faithfulness_runs=48)
    return q


@pytest.fixture(scope="module")
def image():
    Xtr, ytr, Xte, yte = digits()
    model = train_digits_cnn(Xtr, ytr, epochs=4)
    assert accuracy(model, Xte, yte) > 0.85
    modes = ("default", "contrastive", "signed") if ENGINE else ()
    q = quality_report(model, Xte, task="multiclass-classification", modes=modes, n_samples=64, baseline="zero",
                       metrics=("faithfulness_correlation", "flipping", "mprt", "complexity"),
                       faithfulness_runs=48, flip_steps=16)
    return q


def _methods(q: dict) -> list[str]:
    return ["gradient_x_input", "integrated_gradients"] + (BACKTRACE if ENGINE else [])


def test_tabular_methods_beat_random(tabular):
    assert not tabular["errors"], tabular["errors"]
    rnd = tabular["methods"]["random"]
    assert abs(rnd["delta_auc"]) < 0.1 and abs(rnd["faithfulness_correlation"]) < 0.1
    for m in _methods(tabular):
        row = tabular["methods"][m]
        assert row["delta_auc"] > rnd["delta_auc"] + 0.15, m
        assert row["faithfulness_correlation"] > rnd["faithfulness_correlation"] + 0.15, m


def test_tabular_true_drivers_found(tabular):
    for m in ["gradient_x_input", "integrated_gradients"] + (["backtrace_signed"] if ENGINE else []):
        assert tabular["methods"][m]["ground_truth_hits"] >= 3, m
    assert tabular["methods"]["random"]["ground_truth_local_recall"] < 0.6


def test_tabular_mprt_similarity_falls(tabular):
    for m in _methods(tabular):
        row = tabular["methods"][m]
        assert row["mprt_spearman"] < 0.95, m  # falls from 1.0 once every layer is random
        per_layer = tabular["details"][m]["mprt_spearman_per_layer"]
        assert list(per_layer) == ["4", "2", "0"]  # top-down: output layer first
    for m in ["gradient_x_input", "integrated_gradients"] + (["backtrace_signed"] if ENGINE else []):
        assert tabular["methods"][m]["mprt_spearman"] < 0.7, m


def test_tabular_completeness(tabular):
    assert tabular["methods"]["integrated_gradients"]["completeness_gap"] < 0.1
    if ENGINE:  # contrastive mode conserves R+ and R- exactly (no bias absorption)
        assert tabular["methods"]["backtrace_contrastive"]["completeness_gap"] < 1e-3


def test_image_methods_beat_random(image):
    assert not image["errors"], image["errors"]
    rnd = image["methods"]["random"]
    assert abs(rnd["delta_auc"]) < 0.1
    for m in _methods(image):
        row = image["methods"][m]
        assert row["delta_auc"] > rnd["delta_auc"] + 0.2, m
        assert row["faithfulness_correlation"] > rnd["faithfulness_correlation"] + 0.2, m
        assert row["entropy"] < rnd["entropy"], m  # more focused than noise


def test_image_mprt_similarity_falls(image):
    for m in _methods(image):
        assert image["methods"][m]["mprt_spearman"] < 0.99, m
    assert image["methods"]["gradient_x_input"]["mprt_spearman"] < 0.95
    assert list(image["details"]["gradient_x_input"]["mprt_spearman_per_layer"]) == ["fc", "conv2", "conv1"]


def test_image_max_sensitivity_orders_methods():
    """Integrated gradients are smoother than random noise under small input perturbations."""
    from governance.quality.features import forward, make_space, resolve_target
    from governance.quality.robustness import max_sensitivity

    Xtr, ytr, Xte, _ = digits()
    model = train_digits_cnn(Xtr[:600], ytr[:600], epochs=3)
    x = Xte[:32]
    t = resolve_target(forward(model, x), "multiclass-classification", None)
    space = make_space(x, baseline="zero")
    scores = {}
    for ex in (IntegratedGradients(n_steps=16), GradientXInput(), RandomAttribution(0)):
        ms = max_sensitivity(lambda xs, ts: ex(model, xs, ts), x, t, space, n_perturb=4, radius=0.02)
        scores[ex.name] = float(ms[torch.isfinite(ms)].mean())
    assert scores["integrated_gradients"] < scores["random"]
    assert scores["gradient_x_input"] < scores["random"]
