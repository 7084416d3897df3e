"""Task inference (governance.task_inference): config > model metadata > output, every branch; and
real logged models (2 logits, 3 classes, regression, probability) explained with the inferred task."""

from __future__ import annotations

import pytest

from governance.errors import InputError
from governance.task_inference import TaskDecision, TaskError, check_task_output, infer_task, output_facts


def test_config_wins_over_everything() -> None:
    d = infer_task("regression", ("multiclass-classification", "tag"), (-1, 3), (0.0, 1.0))
    assert d == TaskDecision("regression", "config", None)
    task, source, note = infer_task("binary-classification", None, (8,), (0.1, 0.9))
    assert (task, source, note) == ("binary-classification", "config", None)


def test_metadata_wins_over_the_output() -> None:
    where = "governance.task tag on registered version m/1"
    d = infer_task(None, ("regression", where), (-1, 1), (0.2, 0.4))
    assert d == TaskDecision("regression", f"model metadata ({where})")
    assert infer_task(None, ("Multiclass", "x"), (5, 4), None).task == "multiclass-classification"
    assert infer_task(None, ("regressor", "evaluate model_type"), (5, 1), (0, 1)).task == "regression"


@pytest.mark.parametrize("shape, rng, task, source", [
    ((32, 2), (-7.0, 9.0), "multiclass-classification", "inferred from output (2 outputs per sample)"),
    ((32, 3), (0.0, 1.0), "multiclass-classification", "inferred from output (3 outputs per sample)"),
    ((32, 1), (0.01, 0.98), "binary-classification", "inferred from output (one output per sample in [0, 1])"),
    ((32,), (0.0, 1.0), "binary-classification", "inferred from output (one output per sample in [0, 1])"),
])
def test_output_rules_without_a_note(shape, rng, task, source) -> None:
    assert infer_task(None, None, shape, rng) == TaskDecision(task, source, None)


@pytest.mark.parametrize("shape, rng", [((32, 1), (-3.2, 4.1)), ((32,), (0.0, 1.5)), ((32, 1), (-0.1, 0.9)),
                                        ((32, 1), (float("nan"), 0.5)), ((32, 1), None)])
def test_unbounded_single_output_is_regression_with_a_note(shape, rng) -> None:
    d = infer_task(None, None, shape, rng)
    assert d.task == "regression" and d.source == "inferred from output (one output per sample, not in [0, 1])"
    assert "explained as regression" in d.note and "not thresholded" in d.note
    assert "--task" in d.note and "\n" not in d.note


def test_other_output_shapes_are_regression_with_a_note() -> None:
    d = infer_task(None, None, (4, 1, 8, 8), (0.0, 1.0))
    assert d.task == "regression" and d.source == "inferred from output (shape (N, 1, 8, 8))"
    assert "(N, 1, 8, 8) is not one score per class" in d.note


def test_a_classifier_hint_takes_its_width_from_the_output() -> None:
    where = "evaluate model_type"
    d = infer_task(None, ("classifier", where), (10, 2), (-2.0, 2.0))
    assert d.task == "multiclass-classification"
    assert d.source == f"model metadata ({where}: a classifier), inferred from output (2 outputs per sample)"
    assert infer_task(None, ("classifier", where), (10, 1), (0.0, 1.0)).task == "binary-classification"
    logit = infer_task(None, ("classifier", where), (10, 1), (-5.0, 3.0))
    assert logit.task == "regression" and "recorded as a classifier" in logit.note


def test_unknown_metadata_is_ignored_with_a_note() -> None:
    d = infer_task(None, ("ranking", "tag on run r"), (10, 3), None)
    assert d.task == "multiclass-classification" and "unknown task 'ranking' (tag on run r); ignored" in d.note


@pytest.mark.parametrize("configured, hint, shape, message", [
    ("binary-classification", None, (10, 2),
     "task binary-classification (config) expects one output per sample, but the model gives 2 (N, 2)"),
    ("multiclass-classification", None, (10, 1), "expects one output per class, but the model gives one (N, 1)"),
    (None, ("binary-classification", "tag t"), (10, 3), "task binary-classification (model metadata: tag t)"),
    ("bogus", None, (10, 1), "task: 'bogus' is not one of"),
    (None, None, None, "cannot be inferred without the model's output"),
])
def test_mismatches_are_one_clear_error(configured, hint, shape, message) -> None:
    with pytest.raises(TaskError) as err:
        infer_task(configured, hint, shape, (0.0, 1.0))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, InputError) and err.value.exit_code == 1


def test_check_task_output_accepts_fitting_shapes() -> None:
    for task, shape in [("binary-classification", (3,)), ("binary-classification", (3, 1)),
                        ("multiclass-classification", (3, 4)), ("regression", (3, 7)), ("generation", (2, 5, 9))]:
        check_task_output(task, shape, "config")


def test_output_facts_of_tensors_and_arrays() -> None:
    import numpy as np
    import torch

    assert output_facts(torch.tensor([[0.2], [0.7]])) == ((2, 1), (pytest.approx(0.2), pytest.approx(0.7)))
    assert output_facts(np.array([[-1.0, 3.0]])) == ((1, 2), (-1.0, 3.0))


@pytest.mark.parametrize("kind, expected", [("two_logits", "multiclass-classification"),
                                            ("three_classes", "multiclass-classification"),
                                            ("regression", "regression"), ("probability", "binary-classification")])
def test_logged_models_explained_with_the_inferred_task(credit_store, kind: str, expected: str) -> None:
    """Real pt2 models, no config: the handle's hint (none) and the output decide; the stage then
    explains each with the decided task (the call the stage makes once wired)."""
    import mlflow
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from governance.pipeline import explain_model
    from governance.tracking import load_model

    heads = {"two_logits": nn.Linear(6, 2), "three_classes": nn.Linear(6, 3), "regression": nn.Linear(6, 1),
             "probability": nn.Sequential(nn.Linear(6, 1), nn.Sigmoid())}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), heads[kind]).eval()
    x = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32) * 3
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        info = mlflow.pytorch.log_model(model, name=kind, input_example=x[:4], pip_requirements=["torch"])
    handle = load_model(info.model_uri)
    hint = (handle.task_hint, handle.task_hint_source) if handle.task_hint else None
    shape, rng = output_facts(handle.model(torch.from_numpy(x[:16])))
    decision = infer_task(None, hint, shape, rng)
    assert decision.task == expected and decision.source.startswith("inferred from output")
    assert (decision.note is not None) == (kind == "regression")
    res = explain_model(handle, pd.DataFrame(x, columns=list("abcde")), log=False, quiet=True,
                        config={"task": decision.task, "modes": ["signed"], "quality": {"enabled": False},
                                "aggregation": {"n_bootstrap": 20}})
    assert res.n_samples == 40 and len(res.global_importance["features"]) == 5


def test_a_per_pixel_output_at_the_input_size_is_segmentation() -> None:
    d = infer_task(None, None, (4, 3, 16, 16), (-2.0, 5.0), input_shape=(4, 1, 16, 16))
    assert d.task == "segmentation" and d.note is None
    assert d.source == "inferred from output (per-pixel scores (N, 3, 16, 16) at the input's height and width)"
    other = infer_task(None, None, (4, 3, 8, 8), (-2.0, 5.0), input_shape=(4, 1, 16, 16))
    assert other.task == "regression" and "set --task segmentation" in other.note
    assert infer_task(None, None, (4, 3, 16, 16), (0.0, 1.0)).task == "regression"  # no image input known


def test_four_outputs_of_an_image_model_say_box_regression_is_not_assumed() -> None:
    d = infer_task(None, None, (4, 4), (0.0, 1.0), input_shape=(4, 1, 16, 16))
    assert d.task == "multiclass-classification" and "--task box-regression" in d.note
    assert infer_task(None, None, (4, 4), (0.0, 1.0), input_shape=(4, 7)).note is None  # a table: no note
    assert infer_task("box-regression", None, (4, 4), (0.0, 1.0)).task == "box-regression"


@pytest.mark.parametrize("task,shape,message", [
    ("segmentation", (4, 10), "task segmentation (config) expects per-pixel class scores (N, K, H, W), but the "
                              "model gives (N, 10)"),
    ("box-regression", (4, 3, 16, 16), "task box-regression (config) expects box coordinates (N, 4)"),
    ("box-regression", (4, 5), "but the model gives (N, 5)"),
])
def test_image_tasks_that_do_not_fit_the_output_fail(task, shape, message) -> None:
    with pytest.raises(TaskError) as err:
        infer_task(task, None, shape, (0.0, 1.0))
    assert message in str(err.value)
