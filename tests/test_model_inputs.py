"""Models with several inputs (numeric features plus a categorical embedding index): the inputs
are read from the logged model, a missing mapping is one clear line, columns become the tensors
the model takes, and the engine's relevance comes back per column."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from governance.backtrace import Backtrace
from governance.config import ConfigError
from governance.model_inputs import (InputMapping, InputMappingError, build_inputs, check_inputs,
                                     column_relevance, input_columns, parse_input_mapping)
from governance.tracking import ModelInputSpec, load_model
from pickle_models import TwoInputs

NUMERIC = ["income", "debt", "utilisation", "age"]


@pytest.fixture()
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(30, 4)).astype(np.float32), columns=NUMERIC)
    df.insert(2, "region", rng.integers(0, 5, 30))  # a categorical index between numeric columns
    return df


@pytest.fixture()
def two_input_model(credit_store):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 4), name="numeric"),
                       TensorSpec(np.dtype("int64"), (-1,), name="category")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, 3))]))
    example = (np.zeros((4, 4), np.float32), np.arange(4, dtype=np.int64))
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        pt2 = mlflow.pytorch.log_model(model, name="two", input_example=example, signature=sig,
                                       pip_requirements=["torch"])
        pickled = mlflow.pytorch.log_model(model, name="two-pickled", serialization_format="pickle",
                                           pip_requirements=["torch"])
    return model, pt2.model_uri, pickled.model_uri


MAPPING = {"numeric": NUMERIC, "category": {"columns": ["region"]}}


def test_inputs_read_from_the_logged_model(two_input_model) -> None:
    _, pt2, pickled = two_input_model
    assert load_model(pt2).inputs == [ModelInputSpec("numeric", "float32", (-1, 4)),
                                      ModelInputSpec("category", "int64", (-1,))]
    # an eager module logged without a signature: names from its forward
    assert load_model(pickled, allow_pickle=True).inputs == [ModelInputSpec("numeric"), ModelInputSpec("category")]


def test_without_a_mapping_one_line_names_the_inputs(two_input_model) -> None:
    _, pt2, _ = two_input_model
    h = load_model(pt2)
    with pytest.raises(InputMappingError) as err:
        check_inputs(h.inputs, None, h.uri)
    msg = str(err.value)
    assert msg.startswith(f"model '{pt2}' takes 2 inputs (numeric: float32 (-1, 4); category: int64 (-1,)); ")
    assert "inputs: {numeric: [column, ...], category: [column, ...]}" in msg and "\n" not in msg
    check_inputs([ModelInputSpec("x", "float32", (-1, 78))], None, "m")  # one input needs no mapping
    with pytest.raises(InputMappingError, match="no columns for category; the model has no input cat"):
        check_inputs(h.inputs, parse_input_mapping({"numeric": NUMERIC, "cat": ["region"]}), h.uri)


def test_columns_to_tensors_and_relevance_back(two_input_model, frame) -> None:
    model, pt2, _ = two_input_model
    h = load_model(pt2)
    mapping = parse_input_mapping(MAPPING)
    check_inputs(h.inputs, mapping, h.uri)
    x = build_inputs(frame, mapping, h.inputs)
    assert list(x) == ["numeric", "category"]
    assert x["numeric"].dtype == torch.float32 and x["numeric"].shape == (30, 4)
    assert x["category"].dtype == torch.int64 and x["category"].shape == (30,)  # the model's (-1,)
    expected = model(torch.tensor(frame[NUMERIC].to_numpy()), torch.tensor(frame["region"].to_numpy()))
    assert torch.allclose(h.model(*x.values()), expected, atol=1e-6)
    exp = Backtrace(h.model).explain(tuple(x.values()), mode="default", task="multiclass-classification")
    per_column = column_relevance(exp.input_relevance, mapping)
    assert list(per_column) == input_columns(mapping) == NUMERIC + ["region"]
    assert all(v.shape == (30,) and np.isfinite(v).all() for v in per_column.values())
    assert np.allclose(np.stack([per_column[c] for c in NUMERIC], 1), exp.input_relevance["numeric"].numpy())


def test_eager_model_uses_the_configured_dtype_and_shape(two_input_model, frame) -> None:
    model, _, pickled = two_input_model
    h = load_model(pickled, allow_pickle=True)
    mapping = parse_input_mapping({"numeric": NUMERIC, "category": {"columns": ["region"], "dtype": "int64",
                                                                    "squeeze": True}})
    x = build_inputs(frame, mapping, h.inputs)
    assert x["category"].dtype == torch.int64 and x["category"].shape == (30,)
    assert h.model(*x.values()).shape == (30, 3)
    default = build_inputs(frame, parse_input_mapping({"numeric": NUMERIC, "category": ["region"]}), h.inputs)
    assert default["category"].dtype == torch.float32 and default["category"].shape == (30, 1)


def test_bad_values_and_columns_are_named(frame) -> None:
    mapping = parse_input_mapping({"numeric": NUMERIC, "category": {"columns": ["region"], "dtype": "int64"}})
    bad = frame.assign(region=frame["region"].astype(float))
    bad.loc[3, "region"] = 1.5
    with pytest.raises(InputMappingError, match="inputs.category: column 'region' holds non-integer values"):
        build_inputs(bad, mapping)
    with pytest.raises(InputMappingError, match=r"column\(s\) \['region'\] are not in the data"):
        build_inputs(frame.drop(columns="region"), mapping)
    with pytest.raises(ConfigError, match="inputs.category.squeeze: only one column"):
        parse_input_mapping({"category": {"columns": ["a", "b"], "squeeze": True}})
    assert parse_input_mapping({"x": "a"}) == [InputMapping("x", ("a",))]
