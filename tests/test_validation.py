"""The data contract (real great-expectations), data loading and the configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from governance.config import ConfigError, config_from_dict, load_config
from governance.data import DataLoadError, load_data, open_table, read_table
from governance.validation import (
    ContractPlanError,
    ContractRun,
    derive_contract,
    feature_checks,
    validate_source,
    validate_table,
)

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
    ("inf", "expect_column_values_to_not_be_in_set", "income"),
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


# ----------------------------------------------------------------------------- checked in blocks


COUNT_KEYS = ("element_count", "unexpected_count", "unexpected_percent", "missing_count", "missing_percent",
              "unexpected_percent_total", "unexpected_percent_nonmissing", "partial_unexpected_list",
              "partial_unexpected_index_list", "observed_value")


def _plain_gx(df: pd.DataFrame, specs: list[dict]) -> list[dict]:
    """The reference: great-expectations on the whole table in one call (SUMMARY results, in the
    order of ``specs``)."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    ctx = gx.get_context(mode="ephemeral")
    batch = ctx.data_sources.add_pandas("ref").add_dataframe_asset("t").add_batch_definition_whole_dataframe(
        "w").get_batch(batch_parameters={"dataframe": df})
    out = []
    for spec in specs:  # one suite per expectation: results in the order asked for
        exp = ExpectationConfiguration(type=spec["type"], kwargs={k: v for k, v in spec.items() if k != "type"})
        suite = gx.ExpectationSuite(name="ref", expectations=[exp.to_domain_obj()])
        out.append(batch.validate(suite, result_format="SUMMARY").results[0].to_json_dict())
    return out


def _blocks_frame(n: int = 3000) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"a": rng.normal(0, 1, n), "b": rng.uniform(0, 1, n), "c": rng.normal(5, 1, n),
                       "d": rng.integers(0, 10, n).astype(np.int64)})
    df.loc[n - 1, "c"] = np.nan                  # a failure only in the last block
    df.loc[:19, "b"] = 2.0                       # 20 rows out of range, all in the first block
    df.loc[[700, 1500, 2100, 2500, 2999], "a"] = 9.0  # spread over several blocks
    df.loc[1200, "d"] = 60                       # the column's max, in a middle block
    return df


BLOCK_CONTRACT = feature_checks(["a", "b", "c", "d"]) + [
    # 20 / 3000 = 0.67% out of range: passes at mostly=0.99 although the first blocks fail it
    {"type": "expect_column_values_to_be_between", "column": "b", "min_value": 0, "max_value": 1, "mostly": 0.99},
    # 5 / 3000 = 0.17%: fails at mostly=0.999 although most blocks pass it
    {"type": "expect_column_values_to_be_between", "column": "a", "min_value": -6, "max_value": 6, "mostly": 0.999},
    {"type": "expect_column_max_to_be_between", "column": "d", "max_value": 50},
    {"type": "expect_column_mean_to_be_between", "column": "a", "min_value": -0.5, "max_value": 0.5},
    {"type": "expect_table_row_count_to_be_between", "min_value": 1, "max_value": 2999},  # fails on the total only
    {"type": "expect_column_pair_values_a_to_be_greater_than_b", "column_A": "c", "column_B": "b", "mostly": 0.9},
    {"type": "expect_column_values_to_be_in_set", "column": "d", "value_set": list(range(10))},
]


@pytest.mark.parametrize("kind", ["dataframe", "parquet", "csv"])
def test_blocks_give_the_verdict_and_counts_of_one_whole_table_run(kind: str, tmp_path: Path) -> None:
    df = _blocks_frame()
    if kind == "dataframe":
        table = open_table(df)
    elif kind == "parquet":
        df.to_parquet(tmp_path / "t.parquet", index=False)
        table = open_table(tmp_path / "t.parquet")
    else:
        df.to_csv(tmp_path / "t.csv", index=False)
        table = open_table(tmp_path / "t.csv")
    run = ContractRun(table, BLOCK_CONTRACT, cell_budget=1000)
    outcome = run.run()
    assert run.n_blocks >= 8  # columnar: 3 row ranges x 4 single columns; CSV: 12 row chunks of 4 columns
    assert outcome.n_rows == 3000
    ref = _plain_gx(df, BLOCK_CONTRACT)
    got = {i: r for i, r in enumerate(outcome.gx_result["results"])}
    failed = {(r["expectation_config"]["type"], json.dumps(r["expectation_config"]["kwargs"], sort_keys=True)): r
              for r in outcome.gx_result["failed_expectations"]}
    for i, (spec, want) in enumerate(zip(BLOCK_CONTRACT, ref)):
        assert got[i]["success"] == want["success"], spec
        if not want["success"]:
            mine = failed[(spec["type"], json.dumps(got[i]["expectation_config"]["kwargs"], sort_keys=True))]
            for key in COUNT_KEYS:
                if key in want["result"]:
                    assert mine["result"][key] == want["result"][key], (spec, key)
    assert {(f.expectation, f.column) for f in outcome.failures} == {
        ("expect_column_values_to_not_be_null", "c"), ("expect_column_values_to_be_between", "a"),
        ("expect_column_max_to_be_between", "d"), ("expect_table_row_count_to_be_between", None),
        ("expect_column_values_to_be_in_set", "d")}
    one_block = validate_source(open_table(df), BLOCK_CONTRACT, cell_budget=10**9)
    assert outcome.message() == one_block.message()


def test_a_failure_no_later_block_can_undo_is_signalled_early() -> None:
    df = _blocks_frame()
    run = ContractRun(open_table(df), feature_checks(["a", "b", "c", "d"]), cell_budget=1000)
    run.run()
    assert run.failed_early.is_set()  # the NaN in column c
    clean = df.fillna(0.0)
    mostly_only = [{"type": "expect_column_values_to_be_between", "column": "b", "min_value": 0, "max_value": 1,
                    "mostly": 0.99}]
    run = ContractRun(open_table(clean), mostly_only, cell_budget=1000)
    assert run.run().success and not run.failed_early.is_set()  # blocks failed, the total passes


def test_a_wrong_type_in_the_last_chunk_of_a_csv(tmp_path: Path) -> None:
    df = _frame(3000)
    df.to_csv(tmp_path / "t.csv", index=False)
    lines = (tmp_path / "t.csv").read_text().splitlines()
    cols = lines[0].split(",")
    row = lines[-1].split(",")
    row[cols.index("income")] = "unknown"
    lines[-1] = ",".join(row)
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    outcome = validate_source(open_table(tmp_path / "t.csv"), feature_checks(FEATURES), cell_budget=4000)
    assert not outcome.success and outcome.n_rows == 3000
    msg = outcome.message()
    assert "expect_column_values_to_be_in_type_list on column 'income'" in msg
    assert "non-numeric value(s) such as ['unknown'] (1 row(s))" in msg


def test_whole_table_expectations_need_one_block() -> None:
    df = _frame(500)
    unique = feature_checks(FEATURES) + [{"type": "expect_column_values_to_be_unique", "column": "income"}]
    assert validate_source(open_table(df), unique, cell_budget=10_000).success
    with pytest.raises(ContractPlanError, match="needs every row at once"):
        validate_source(open_table(df), unique, cell_budget=100)


# ----------------------------------------------------------------------------- streamed sources


def test_sources_read_in_chunks_with_global_positions_and_file_hashes(tmp_path: Path) -> None:
    import hashlib

    from governance.data import files_sha256

    df = _frame(250)
    folder = tmp_path / "parts"
    (folder / "year=2024").mkdir(parents=True)
    df.iloc[:100].to_parquet(folder / "year=2024" / "part-0.parquet", index=False)
    df.iloc[100:].to_parquet(folder / "part-1.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-1.parquet.crc").write_text("x")
    table = open_table(folder, source="runs:/abc/parts")
    assert table.columnar and table.n_rows == 250 and table.columns == list(df.columns)
    frames = list(table.iter_frames(64, ["age", "income"]))
    # files in sorted path order: part-1 (rows 100..249) comes before year=2024/part-0 (rows 0..99)
    got = pd.concat(frames)
    assert list(got.index) == list(range(250)) and list(got.columns) == ["age", "income"]
    pd.testing.assert_frame_equal(got.reset_index(drop=True),
                                  pd.concat([df.iloc[100:], df.iloc[:100]])[["age", "income"]].reset_index(drop=True))
    block = table.read_columns(["debt_ratio"], 90, 160)
    assert list(block.index) == list(range(90, 160)) and len(block) == 70
    files = table.file_hashes()
    assert [f.relative for f in files] == ["part-1.parquet", "year=2024/part-0.parquet"]
    for f in files:
        assert f.sha256 == hashlib.sha256(f.path.read_bytes()).hexdigest() and f.size == f.path.stat().st_size
    lines = "".join(sorted(f"{f.relative}\0{f.sha256}\n" for f in files))
    assert files_sha256(files) == hashlib.sha256(lines.encode()).hexdigest()
    table.check_unchanged()
    (folder / "part-1.parquet").write_bytes((folder / "part-1.parquet").read_bytes() + b"\0")
    with pytest.raises(DataLoadError, match="changed while it was being read"):
        table.check_unchanged()


def test_csv_source_counts_rows_on_the_way(tmp_path: Path) -> None:
    df = _frame(130)
    df.to_csv(tmp_path / "a.csv", index=False)
    table = open_table(tmp_path / "a.csv")
    assert not table.columnar and table.n_rows is None
    assert [len(f) for f in table.iter_frames(50)] == [50, 50, 30]
    assert table.n_rows == 130
    assert open_table(df).n_rows == 130


def test_bad_folders_fail_clearly(tmp_path: Path) -> None:
    df = _frame(20)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    df.to_parquet(mixed / "a.parquet", index=False)
    df.to_csv(mixed / "b.csv", index=False)
    with pytest.raises(DataLoadError, match="mixes parquet and CSV"):
        open_table(mixed)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataLoadError, match="is a folder but not a dataset"):
        open_table(empty)
    other = tmp_path / "other"
    other.mkdir()
    df.to_parquet(other / "a.parquet", index=False)
    df.drop(columns=["age"]).to_parquet(other / "b.parquet", index=False)
    with pytest.raises(DataLoadError, match="different columns"):
        open_table(other)


@pytest.mark.parametrize("n", [9_000, 50_000])
def test_non_finite_values_are_counted_exactly_whichever_path_pandas_takes(n: int) -> None:
    """pandas tests set membership with a hash table on small columns and numpy's ``==`` on
    large ones (the contract lowers the size cut); both count every infinity and nothing else."""
    train, df = _frame(seed=0), _frame(n=n, seed=1)
    rng = np.random.default_rng(3)
    pos = rng.choice(n, size=42, replace=False)
    df.loc[pos[:37], "income"] = np.inf
    df.loc[pos[37:], "income"] = -np.inf
    df.loc[pos[:3] + 1, "debt_ratio"] = np.nan  # missing, not infinite
    outcome = validate_table(df, derive_contract(train, FEATURES), contract_source="training")
    infinite = [f for f in outcome.failures if f.expectation == "expect_column_values_to_not_be_in_set"]
    assert [f.column for f in infinite] == ["income"]
    assert infinite[0].detail.startswith("42 unexpected value(s)")
