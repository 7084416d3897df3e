"""Every configuration key on the command line: named options, `--set key=value` (nested keys,
YAML values), `--allow-pickle`; errors name the key; the MLproject `explain` entry point takes
the same; the config records which keys the user gave."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from explain_fixtures import MODEL_NAME
from governance.cli import main
from governance.config import ConfigError, apply_settings, config_from_dict, load_config, user_settings

ROOT = Path(__file__).resolve().parents[1]


def test_set_nests_keys_and_reads_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(settings=["reason_codes.top_n=2", "quality.enabled=false", "modes=[signed, default]",
                                "feature_columns=[a, b]", "target_column=y", "report.intended_purpose=Triage",
                                "multiplier=2.5", "cpu_threads=1", "allow_pickle=true",
                                "inputs.numeric=[a]", "inputs.category={columns: [b], dtype: int64}"])
    assert cfg.reason_codes.top_n == 2 and cfg.quality.enabled is False
    assert cfg.modes == ["signed", "default"] and cfg.feature_columns == ["a", "b"] and cfg.target_column == "y"
    assert cfg.report == {"intended_purpose": "Triage"} and cfg.multiplier == 2.5 and cfg.cpu_threads == 1
    assert cfg.allow_pickle is True
    assert cfg.inputs == {"numeric": ["a"], "category": {"columns": ["b"], "dtype": "int64"}}
    assert cfg.configured == {"reason_codes", "quality", "modes", "feature_columns", "target_column", "report",
                              "multiplier", "cpu_threads", "allow_pickle", "inputs"}
    assert not cfg.given("task") and cfg.task == "binary-classification"  # a default, not a choice
    assert "configured" not in cfg.to_dict() and "configured" not in cfg.to_yaml()


def test_precedence_file_then_set_then_options(tmp_path: Path) -> None:
    p = tmp_path / "governance.yaml"
    p.write_text("task: regression\nprimary_mode: default\nreason_codes: {top_n: 5}\n")
    cfg = load_config(p, settings=["primary_mode=contrastive", "reason_codes.top_n=3"], primary_mode="signed")
    assert cfg.task == "regression" and cfg.given("task")
    assert cfg.primary_mode == "signed" and cfg.reason_codes.top_n == 3
    given = user_settings(p, ["batch_size=64"], modes="signed", task=None)
    assert given == {"task": "regression", "primary_mode": "default", "reason_codes": {"top_n": 5},
                     "batch_size": 64, "modes": "signed"}
    assert apply_settings({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
    again = cfg.with_overrides(batch_size=32, task=None)
    assert again.configured == cfg.configured | {"batch_size"} and again.batch_size == 32
    assert not load_config().with_overrides(modes="signed").given("task")


@pytest.mark.parametrize("settings, message", [
    (["nonsense=1"], "unknown configuration key(s) ['nonsense']"),
    (["reason_codes.nope=1"], "reason_codes: unknown key(s) ['nope']"),
    (["task.x=1"], "--set task.x: task is not a section"),
    (["batch_size"], "--set: 'batch_size' is not key=value"),
    (["batch_size=abc"], "batch_size: must be a positive integer, got 'abc'"),
    (["modes=[signed, nope]"], "modes: unknown mode(s) ['nope']"),
    (["allow_pickle=maybe"], "allow_pickle: must be true or false, got 'maybe'"),
    (["quality.enabled=3"], "quality.enabled: must be true or false, got 3"),
    (["aggregation.seed=-1"], "aggregation.seed: must be a non-negative integer, got -1"),
    (["task=ranking"], "task: 'ranking' is not one of"),
    (["gates={a: 1}"], "gates: must be a list of mappings"),
    (["reason_codes.top_n=[1"], "--set reason_codes.top_n: the value is not valid YAML"),
    (["inputs.numeric={columns: []}"], "inputs.numeric.columns: must be a non-empty list of column names"),
    (["inputs.a=[x]", "inputs.b=[x]"], "inputs.b.columns: column 'x' is already fed to inputs.a"),
    (["inputs.a={columns: [x], dtype: complex}"], "inputs.a.dtype: 'complex' is not one of"),
    ([".a=1"], "--set .a: empty part in the key"),
])
def test_errors_name_the_key(settings: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, settings=settings)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_setting_is_one_line_exit_1() -> None:
    res = CliRunner().invoke(main, ["explain", "--model-uri", "models:/x/1", "--data", "x.parquet",
                                    "--set", "reason_codes.nope=1"])
    assert res.exit_code == 1
    assert res.output.strip() == "error: reason_codes: unknown key(s) ['nope']; known: ['dictionary', 'top_n']"


def _config_of(rid: str) -> dict:
    return yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=rid, artifact_path="governance/config.yaml")).read_text())


def test_cli_options_and_settings_reach_the_run(credit_store, tmp_path: Path) -> None:
    cols = list(pd.read_parquet(credit_store.validation_parquet).columns[:-1])
    data = tmp_path / "v.parquet"
    pd.read_parquet(credit_store.validation_parquet).head(60).to_parquet(data)
    res = CliRunner().invoke(main, [
        "explain", "--model-uri", f"models:/{MODEL_NAME}/1", "--data", str(data), "--target-column", "default",
        "--task", "binary-classification", "--feature-columns", ",".join(cols), "--modes", "signed,default",
        "--primary-mode", "default", "--set", "reason_codes.top_n=2", "--set", "quality.enabled=false",
        "--set", "aggregation.n_bootstrap=20", "--experiment-name", "cli-test", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    cfg = _config_of(res.stdout.strip().splitlines()[-1])
    assert cfg["task"] == "binary-classification" and cfg["feature_columns"] == cols
    assert cfg["modes"] == ["signed", "default"] and cfg["primary_mode"] == "default"
    assert cfg["reason_codes"]["top_n"] == 2 and cfg["quality"]["enabled"] is False
    assert cfg["aggregation"]["n_bootstrap"] == 20


def test_cli_refuses_a_pickle_unless_allowed(credit_store, tmp_path: Path, monkeypatch) -> None:
    from pickle_models import MARKER_ENV, MarkerMLP

    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    with mlflow.start_run(experiment_id=credit_store.experiment_id):
        info = mlflow.pytorch.log_model(MarkerMLP(78), name="pk", serialization_format="pickle",
                                        pip_requirements=["torch"])
    data = tmp_path / "v.parquet"
    pd.read_parquet(credit_store.validation_parquet).head(40).to_parquet(data)
    base = ["explain", "--model-uri", info.model_uri, "--data", str(data), "--target-column", "default",
            "--set", "quality.enabled=false", "--set", "aggregation.n_bootstrap=20", "--modes", "signed", "--quiet"]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 1 and res.output.startswith(f"error: model '{info.model_uri}' is stored as a pickle")
    assert "serialization_format='pt2'" in res.output and "--allow-pickle" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not marker.exists()
    for extra in (["--allow-pickle"], ["--set", "allow_pickle=true"]):
        marker.unlink(missing_ok=True)
        res = CliRunner().invoke(main, base + extra)
        assert res.exit_code == 0, res.output + repr(res.exception)
        assert marker.exists()  # the opt-in really loaded the pickle
        assert _config_of(res.stdout.strip().splitlines()[-1])["allow_pickle"] is True


def test_mlproject_explain_takes_every_key(credit_store, tmp_path: Path) -> None:
    """The entry point's parameters reach the command (`set` items separated by ';')."""
    import subprocess

    spec = yaml.safe_load((ROOT / "pipelines" / "MLproject").read_text())["entry_points"]["explain"]
    assert {"task", "feature_columns", "modes", "primary_mode", "set", "allow_pickle"} <= set(spec["parameters"])
    data = tmp_path / "v.parquet"
    pd.read_parquet(credit_store.validation_parquet).head(50).to_parquet(data)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_RUN")}
    env.update(MLFLOW_TRACKING_URI=credit_store.tracking_uri, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT / "pipelines"), "-e", "explain",
         "--env-manager", "local", "--experiment-id", credit_store.experiment_id,
         "--storage-dir", str(tmp_path / "storage"),
         "-P", f"model_uri=models:/{MODEL_NAME}/1", "-P", f"data={data}", "-P", "target_column=default",
         "-P", "task=binary-classification", "-P", "modes=signed",
         "-P", "set=reason_codes.top_n=1;quality.enabled=false;aggregation.n_bootstrap=20;"
               "report.intended_purpose=Loan triage, with review"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rid = proc.stdout.strip().splitlines()[-1]
    cfg = _config_of(rid)
    assert cfg["reason_codes"]["top_n"] == 1 and cfg["quality"]["enabled"] is False
    assert cfg["report"]["intended_purpose"] == "Loan triage, with review" and cfg["modes"] == ["signed"]
