"""The data contract (real great-expectations), data loading and the configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from governance.config import ConfigError, config_from_dict, load_config
from governance.data import DataLoadError, load_data, read_table
from governance.validation import derive_contract, feature_checks, validate_table

FEATURES = ["income", "debt_ratio", "age"]


def _frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"income": rng.normal(50, 10, n), "debt_ratio": rng.uniform(0, 1, n),
                         "age": rng.integers(18, 80, n), "default": rng.integers(0, 2, n)})


def _failed(outcome) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in outcome.failures}


def test_clean_data_passes_the_derived_contract() -> None:
    train, valid = _frame(seed=0), _frame(seed=1)
    outcome = validate_table(valid, derive_contract(train, FEATURES), contract_source="training")
    assert outcome.success, outcome.message()
    doc = outcome.to_dict()
    assert doc["success"] is True and doc["n_expectations"] == 2 + 4 * len(FEATURES)
    json.dumps(doc, allow_nan=True)  # the document is JSON


@pytest.mark.parametrize("breakage, expectation, column", [
    ("missing", "expect_table_columns_to_match_set", None),
    ("nan", "expect_column_values_to_not_be_null", "debt_ratio"),
    ("string", "expect_column_values_to_be_in_type_list", "income"),
    ("inf", "expect_column_values_to_be_between", "income"),
    ("drift", "expect_column_values_to_be_between", "age"),
])
def test_broken_data_fails_naming_expectation_and_column(breakage: str, expectation: str, column: str | None) -> None:
    train, df = _frame(seed=0), _frame(seed=1)
    if breakage == "missing":
        df = df.drop(columns=["age"])
    elif breakage == "nan":
        df.loc[7, "debt_ratio"] = np.nan
    elif breakage == "string":
        df["income"] = df["income"].astype(object)
        df.loc[3, "income"] = "n/a"
    elif breakage == "inf":
        df.loc[2, "income"] = np.inf
    elif breakage == "drift":
        df["age"] = df["age"] + 500
    outcome = validate_table(df, derive_contract(train, FEATURES), contract_source="training")
    assert not outcome.success
    assert (expectation, column) in _failed(outcome)
    msg = outcome.message()
    assert expectation in msg
    if breakage == "missing":
        assert "missing column(s) ['age']" in msg
    else:
        assert f"column '{column}'" in msg
    if breakage == "string":
        assert "'n/a'" in msg and "not numeric" in msg
    # only the broken thing fails
    assert all(c in (column, "age" if breakage == "missing" else column) for _, c in _failed(outcome) if c)


def test_empty_table_fails_row_count_and_columns(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    outcome = validate_table(read_table(empty), feature_checks(FEATURES), contract_source="schema")
    assert not outcome.success
    failed = _failed(outcome)
    assert ("expect_table_row_count_to_be_between", None) in failed
    assert ("expect_table_columns_to_match_set", None) in failed
    header_only = tmp_path / "header.csv"
    header_only.write_text("income,debt_ratio,age\n")
    out2 = validate_table(read_table(header_only), feature_checks(FEATURES), contract_source="schema")
    assert ("expect_table_row_count_to_be_between", None) in _failed(out2)


def test_derived_range_tolerates_rare_new_extremes_but_not_a_shift() -> None:
    train = _frame(seed=0)
    contract = derive_contract(train, FEATURES)
    rare = _frame(5000, seed=2)
    rare.loc[0, "age"] = 200  # one applicant far outside the training range: 0.02% of rows
    assert validate_table(rare, contract).success
    shifted = _frame(5000, seed=2)
    shifted.loc[:99, "age"] = 500  # 2% of rows
    assert ("expect_column_values_to_be_between", "age") in _failed(validate_table(shifted, contract))


def test_config_expectations_are_added_to_the_feature_checks() -> None:
    df = _frame()
    extra = [{"type": "expect_column_values_to_be_between", "column": "debt_ratio", "min_value": 0, "max_value": 0.5}]
    outcome = validate_table(df, feature_checks(FEATURES) + extra, contract_source="config")
    assert not outcome.success
    assert _failed(outcome) == {("expect_column_values_to_be_between", "debt_ratio")}


def test_read_table_formats_and_errors(tmp_path: Path) -> None:
    df = _frame(20)
    df.to_parquet(tmp_path / "a.parquet", index=False)
    df.to_csv(tmp_path / "a.csv", index=False)
    pd.testing.assert_frame_equal(read_table(tmp_path / "a.parquet"), df)
    assert read_table(tmp_path / "a.csv").shape == df.shape
    with pytest.raises(DataLoadError, match="not found"):
        read_table(tmp_path / "nope.parquet")
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(DataLoadError, match="unsupported data file type"):
        read_table(tmp_path / "a.xlsx")
    with pytest.raises(DataLoadError, match="mlflow-dataset:<run-id>/<dataset-name>"):
        load_data("mlflow-dataset:only-a-run-id")
    assert load_data(df).frame is df


def test_config_defaults_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_config()
    assert cfg.primary_mode == "signed" and cfg.modes == ["default", "contrastive", "signed"]
    assert cfg.reason_codes.top_n == 4
    p = tmp_path / "governance.yaml"
    p.write_text("task: binary-classification\nmodes: [default]\nprimary_mode: default\n"
                 "reason_codes: {top_n: 2, dictionary: {income: Income}}\n")
    cfg = load_config(p, modes="default,signed", batch_size=128)
    assert cfg.modes == ["default", "signed"] and cfg.batch_size == 128
    assert cfg.reason_codes.dictionary == {"income": "Income"}
    assert "primary_mode: default" in cfg.to_yaml()
    assert config_from_dict({"modes": ["default"], "primary_mode": "signed"}).modes == ["signed", "default"]
    with pytest.raises(ConfigError, match="unknown configuration key"):
        config_from_dict({"bach_size": 3})
    with pytest.raises(ConfigError, match="modes: unknown mode"):
        config_from_dict({"modes": ["fancy"]})
    with pytest.raises(ConfigError, match="reason_codes: unknown key"):
        config_from_dict({"reason_codes": {"topn": 3}})
    with pytest.raises(ConfigError, match=r"expectations\[0\]"):
        config_from_dict({"expectations": [{"column": "x"}]})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
