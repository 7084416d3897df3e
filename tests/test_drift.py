"""Explanation drift (issue 13): compare two models / two data sets / two runs, and monitoring.

Real components: credit-example data (800 validation rows), MLPs trained here, a real MLflow
sqlite store with the models logged in pt2 format, the real explanation stage (quality off,
signed mode only), the CLI through click.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from examples.credit_risk.generator import FEATURE_NAMES, TARGET, Standardiser, generate_loans
from examples.credit_risk.model import train_mlp
from governance.config import DriftConfig, config_from_dict
from governance.drift.compare import compare, js_divergence, same_rows
from governance.drift.workflow import explain_side

NAME = "credit-drift"
EXPLAIN = {"target_column": TARGET, "task": "binary-classification", "modes": ["signed"], "primary_mode": "signed",
           "quality": {"enabled": False}, "batch_size": 512}
#: The driver the challenger loses and the control that replaces it.
REPLACED, REPLACEMENT = "fico_score", "noise_01"
#: The feature recorded in other units in the shifted production data.
SHIFTED = "annual_income"


def labels(df: pd.DataFrame, driver: str = REPLACED, seed: int = 0) -> np.ndarray:
    """A label from a known risk model on the standardised features; ``driver`` carries the
    strongest effect (the challenger's data puts a control there instead of the credit score)."""
    z = df[FEATURE_NAMES]
    logit = (-1.5 - 1.2 * z[driver] + 0.9 * z["debt_to_income"] + 0.7 * z["revolving_utilization"]
             - 0.6 * z["annual_income"] + 0.4 * z["term_60_months"] + 0.3 * z["delinquencies_2y"])
    p = 1.0 / (1.0 + np.exp(-logit.to_numpy()))
    return (np.random.default_rng(seed).random(len(df)) < p).astype(np.int64)


def units_changed(df: pd.DataFrame, std: Standardiser) -> pd.DataFrame:
    """Production rows in which ``SHIFTED`` is recorded in thousands instead of dollars: its
    relationship with the label (which still follows the true income) is changed."""
    out = df.copy()
    raw = out[SHIFTED] * std.std[SHIFTED] + std.mean[SHIFTED]
    out[SHIFTED] = ((raw / 1000.0 - std.mean[SHIFTED]) / std.std[SHIFTED]).astype(np.float32)
    return out


@dataclass
class DriftStore:
    tracking_uri: str
    experiment_id: str
    root: Path
    std: Standardiser
    valid: pd.DataFrame
    valid_path: Path
    champion: object
    sibling: object
    challenger: object
    baseline_run: str


def _log_model(model: object, name: str, example: np.ndarray) -> str:
    import mlflow
    import mlflow.pytorch

    with mlflow.start_run(run_name=f"train {name}"):
        mlflow.pytorch.log_model(model, name="model", input_example=example, registered_model_name=NAME,
                                 pip_requirements=["torch", "mlflow"])
    return mlflow.last_active_run().info.run_id


@pytest.fixture(scope="module")
def drift_store(tmp_path_factory: pytest.TempPathFactory) -> DriftStore:
    """Champion (v1, explained, alias ``audited``), a sibling trained with another seed (in
    memory), and a challenger whose data replaced the credit score by a control (v2)."""
    import mlflow

    from governance.pipeline import explain_model

    root = tmp_path_factory.mktemp("drift_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    previous = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("drift", artifact_location=(root / "artifacts").as_uri())
    os.environ["MLFLOW_EXPERIMENT_ID"] = exp_id
    train_raw, valid_raw = generate_loans(3000, seed=1), generate_loans(800, seed=2)
    std = Standardiser.fit(train_raw)
    train, valid = std.transform(train_raw), std.transform(valid_raw)
    train[TARGET], valid[TARGET] = labels(train), labels(valid, seed=1)
    x, y = train[FEATURE_NAMES].to_numpy(), train[TARGET].to_numpy()
    champion = train_mlp(x, y, epochs=12, seed=0)
    sibling = train_mlp(x, y, epochs=12, seed=1)
    challenger = train_mlp(x, labels(train, REPLACEMENT), epochs=12, seed=0)
    valid_path = root / "valid.parquet"
    valid.to_parquet(valid_path, index=False)
    example = np.ascontiguousarray(valid[FEATURE_NAMES].to_numpy()[:4], dtype=np.float32)
    try:
        _log_model(champion, "champion", example)
        _log_model(challenger, "challenger", example)
        res = explain_model(f"models:/{NAME}/1", str(valid_path), config=EXPLAIN, quiet=True)
        client.set_registered_model_alias(NAME, "audited", "1")
        yield DriftStore(uri, exp_id, root, std, valid, valid_path, champion, sibling, challenger, res.run_id)
    finally:
        mlflow.set_tracking_uri(previous)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def store(drift_store: DriftStore, monkeypatch: pytest.MonkeyPatch) -> DriftStore:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", drift_store.tracking_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", drift_store.experiment_id)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(drift_store.tracking_uri)
    return drift_store


@pytest.fixture(scope="module")
def sides(drift_store: DriftStore):
    """Explanations of the in-memory models, each computed once for the module: ``sides(model,
    data)`` with model in champion / sibling / challenger and data in valid / prod / shifted."""
    prod = drift_store.std.transform(generate_loans(800, seed=7))
    prod[TARGET] = labels(prod, seed=3)
    tables = {"valid": drift_store.valid, "prod": prod, "shifted": units_changed(prod, drift_store.std)}
    cache: dict = {}

    def get(model: str, data: str = "valid"):
        if (model, data) not in cache:
            cache[model, data] = explain_side(getattr(drift_store, model), tables[data], EXPLAIN, f"{model} on {data}")[0]
        return cache[model, data]

    return get


def _flagged(result) -> set[str]:
    return {u.unit for u in result.units if u.significant}


def test_js_divergence_bounds() -> None:
    p = np.array([0.5, 0.5, 0.0])
    assert js_divergence(p, p) == 0.0
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    from scipy.spatial.distance import jensenshannon

    q = np.array([0.2, 0.6, 0.2])
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2)
    assert js_divergence(2 * p, q) == pytest.approx(js_divergence(p, q))  # normalised first


def test_a_side_from_per_sample_rows_does_not_depend_on_how_they_are_cut() -> None:
    from governance.drift.summary import side_from_samples

    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame({"sample_id": np.arange(n), "prediction": rng.integers(0, 2, n), "score": rng.random(n),
                          **{f"u{i}": rng.normal(size=n).astype(np.float32) for i in range(6)}})
    kw = dict(task="binary-classification", seed=3, n_bootstrap=50, global_importance={"features": []},
              layer_ranking=None)
    whole = side_from_samples([frame], "whole", **kw)
    cut = side_from_samples([frame.iloc[:7], frame.iloc[7:7], frame.iloc[7:200], frame.iloc[200:]], "cut", **kw)
    shuffled = side_from_samples([frame.sample(frac=1.0, random_state=1)], "shuffled", **kw)
    for other in (cut, shuffled):
        assert other.units == whole.units == [f"u{i}" for i in range(6)]
        np.testing.assert_allclose(other.replicates, whole.replicates, rtol=1e-12)
        np.testing.assert_allclose(other.importance, whole.importance, rtol=1e-12)
        np.testing.assert_array_equal(other.reason_keys, whole.reason_keys)
        np.testing.assert_array_equal(other.top_reason, whole.top_reason)
    assert same_rows(whole, shuffled)
    assert not same_rows(whole, side_from_samples([frame.iloc[1:]], "fewer", **kw))


def test_false_positive_two_seeds_same_data_is_stable(sides) -> None:
    cfg = DriftConfig()
    before, after = sides("champion"), sides("sibling")
    assert same_rows(before, after)
    result = compare(before, after, cfg, paired=True, kind="models")
    o = result.overall
    print(f"\nfalse positive: verdict {result.verdict}, JS {o.js_divergence:.4f}, spearman {o.spearman:.3f}, "
          f"top-{o.top_k} overlap {o.top_k_overlap:.2f}, significant in top {o.n_significant_top} "
          f"(rate {o.significant_rate:.2f}), all significant {o.n_significant}")
    assert result.verdict == "stable", result.reasons
    assert o.significant_rate <= cfg.max_significant_rate
    assert o.top_k_overlap >= cfg.min_top_k_overlap


def test_true_positive_replaced_driver_is_flagged(sides) -> None:
    before, after = sides("champion"), sides("challenger")
    result = compare(before, after, DriftConfig(), paired=True, kind="models")
    print(f"\ntrue positive (model): {result.reasons}")
    assert result.verdict == "changed"
    flagged = _flagged(result)
    assert {REPLACED, REPLACEMENT} <= flagged
    rows = {u.unit: u for u in result.units}
    assert rows[REPLACED].difference < 0 < rows[REPLACEMENT].difference
    assert rows[REPLACEMENT].rank_shift  # a control enters the top k
    assert {x.side for x in result.overall.leaders} == {"supporting", "adverse"}
    assert {s.module for s in result.overall.layer_shifts} >= {"fc1", "fc2", "out"}
    assert result.overall.max_layer_shift is not None
    assert result.overall.top_reason_changed is not None and result.overall.top_reason_changed > 0.2


def test_true_positive_production_data_with_a_changed_feature(sides) -> None:
    before, same, moved = sides("champion"), sides("champion", "prod"), sides("champion", "shifted")
    calm = compare(before, same, DriftConfig(), paired=False, kind="data")
    drifted = compare(before, moved, DriftConfig(), paired=False, kind="data")
    print(f"\nproduction data: unchanged -> {calm.verdict} (JS {calm.overall.js_divergence:.4f}); "
          f"{SHIFTED} in thousands -> {drifted.verdict}: {drifted.reasons}")
    assert calm.verdict == "stable", calm.reasons
    assert drifted.verdict == "changed"
    assert SHIFTED in _flagged(drifted)
    assert SHIFTED not in _flagged(calm)


def test_paired_intervals_are_narrower_than_unpaired(store: DriftStore, sides) -> None:
    before, after = sides("champion"), sides("sibling")
    paired = compare(before, after, DriftConfig(), paired=True, kind="models")
    unpaired = compare(before, after, DriftConfig(), paired=False, kind="models")
    w_p, w_u = paired.overall.mean_interval_width, unpaired.overall.mean_interval_width
    t_p, t_u = paired.overall.mean_interval_width_top, unpaired.overall.mean_interval_width_top
    print(f"\ninterval width (mean over units): paired {w_p:.5f}, unpaired {w_u:.5f}, ratio {w_p / w_u:.2f}; "
          f"top units: paired {t_p:.5f}, unpaired {t_u:.5f}, ratio {t_p / t_u:.2f}")
    assert w_p < w_u and t_p < t_u
    # the same point estimates either way: only the intervals differ
    assert [u.difference for u in paired.units] == [u.difference for u in unpaired.units]
    # other rows numbered alike have the same ids: the ids alone cannot tell that rows are shared,
    # which is why runs are paired only when their dataset hashes agree too
    assert same_rows(before, sides("champion", "prod"))
    half, _ = explain_side(store.champion, store.valid.iloc[:400], EXPLAIN, "half")
    with pytest.raises(ValueError, match="same sample ids"):
        compare(before, half, DriftConfig(), paired=True, kind="models")


def test_the_same_comparison_writes_the_same_bytes(sides, tmp_path: Path) -> None:
    from governance.drift.documents import write_drift

    first = compare(sides("champion"), sides("challenger"), DriftConfig(), paired=True, kind="models")
    again = compare(sides("champion"), sides("challenger"), DriftConfig(), paired=True, kind="models")
    a = write_drift(first, tmp_path / "a")
    b = write_drift(again, tmp_path / "b")
    assert [p.name for p in a] == ["drift.json", "drift.png"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_run_side_equals_state_side(store: DriftStore, tmp_path: Path) -> None:
    """The side read back from the explain run's local_relevance.parquet holds the numbers of the
    side computed from the live state over the same rows (the id-keyed weights agree)."""
    from governance.drift.workflow import run_side

    live, _ = explain_side(f"models:/{NAME}/1", str(store.valid_path), EXPLAIN, "live")
    logged, _ = run_side(store.baseline_run, "logged", config_from_dict(EXPLAIN), tmp_path)
    assert logged.units == live.units
    np.testing.assert_allclose(logged.importance, live.importance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logged.replicates, live.replicates, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(logged.weight_totals, live.weight_totals)
    assert same_rows(live, logged)


def _cli(args: list[str]):
    from governance.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def _artifact_json(run_id: str, path: str, tmp: Path) -> dict:
    import mlflow

    local = mlflow.MlflowClient().download_artifacts(run_id, path, str(tmp))
    return json.loads(Path(local).read_text())


def test_cli_compare_models_logs_drift(store: DriftStore, tmp_path: Path) -> None:
    import mlflow

    res = _cli(["compare", "--baseline-model", f"models:/{NAME}/1", "--model-uri", f"models:/{NAME}/2",
                "--data", str(store.valid_path), "--set", f"target_column={TARGET}", "--set", "modes=[signed]",
                "--quiet"])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags["governance.drift_verdict"] == "changed"
    assert run.data.tags["governance.drift_paired"] == "true"
    assert run.data.metrics["governance_drift_changed"] == 1.0
    doc = _artifact_json(run_id, "governance/drift/drift.json", tmp_path)
    assert doc["format"] == "governance-drift" and doc["kind"] == "models" and doc["paired"] is True
    assert {REPLACED, REPLACEMENT} <= {u["unit"] for u in doc["units"] if u["significant"]}
    names = {f.path for f in mlflow.MlflowClient().list_artifacts(run_id, "governance/drift")}
    assert "governance/drift/drift.png" in names


def test_cli_compare_runs_is_paired_and_feeds_the_report(store: DriftStore, tmp_path: Path) -> None:
    import mlflow

    from governance.pipeline import explain_model
    from governance.report.context import build_context
    from governance.report.evidence import load_run_evidence
    from governance.report.model_card import build_model_card, render_model_card
    from governance.report.render import render_html

    challenger_run = explain_model(f"models:/{NAME}/2", str(store.valid_path), config=EXPLAIN, quiet=True).run_id
    res = _cli(["compare", "--baseline-run-id", store.baseline_run, "--run-id", challenger_run])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == challenger_run  # logged into run B (no report yet)
    tags = mlflow.MlflowClient().get_run(challenger_run).data.tags
    assert tags["governance.drift_verdict"] == "changed" and tags["governance.drift_paired"] == "true"
    ev = load_run_evidence(challenger_run, with_architecture=False, workdir=tmp_path / "ev")
    assert ev.drift is not None and ev.drift["verdict"] == "changed" and ev.drift_plot
    assert "governance/drift/drift.json" in ev.input_files  # the report's manifest covers it
    ctx = build_context(ev)
    block = ctx["changes"]["drift"]
    assert block["missing"] is None and block["verdict"] == "changed"
    assert any(r["unit"] == REPLACED and r["significant"] == "yes" for r in block["rows"])
    html = render_html(ctx)
    changes = html[html.index('id="changes"'):]
    assert "Explanation drift" in changes and "Verdict: <strong>changed</strong>" in changes
    assert "data:image/png;base64," in changes
    card = build_model_card(ev.model, ev, {}, date=None)
    assert card["explanation"]["drift"].startswith("changed against " + store.baseline_run)
    assert "Explanation drift: changed against" in render_model_card(card)["model_card.md"].decode()


def test_cli_compare_rejects_a_mixed_form(store: DriftStore) -> None:
    res = _cli(["compare", "--baseline-run-id", store.baseline_run, "--data", str(store.valid_path)])
    assert res.exit_code == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: compare: give --baseline-run-id and --run-id")
    res = _cli(["compare", "--baseline-run-id", "0" * 32, "--run-id", store.baseline_run])
    assert res.exit_code == 1 and res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr
    res = _cli(["compare", "--baseline-run-id", store.baseline_run, "--run-id", store.baseline_run,
                "--log-run-id", "f" * 32])
    assert res.exit_code == 1 and res.stderr.strip().startswith(f"error: --log-run-id {'f' * 32}: no such run")


def test_monitor_ten_batches_flags_the_shifted_one_only(store: DriftStore) -> None:
    import mlflow

    from governance.drift.monitor import monitor_batch

    shifted_at = 6
    run_ids, verdicts = set(), []
    for i in range(10):
        batch = store.std.transform(generate_loans(200, seed=100 + i))
        if i == shifted_at:
            batch = units_changed(batch, store.std)
        out = monitor_batch(f"models:/{NAME}@audited", batch, batch_time=f"2026-01-{i + 1:02d}T08:00:00Z")
        assert out.step == i and out.baseline_run_id == store.baseline_run
        run_ids.add(out.run_id)
        verdicts.append(out.result.verdict)
    print(f"\nmonitoring verdicts: {verdicts}; last batch timings {out.timings}")
    assert len(run_ids) == 1
    assert [v == "changed" for v in verdicts] == [i == shifted_at for i in range(10)]
    client = mlflow.MlflowClient()
    run = client.get_run(run_ids.pop())
    assert run.data.tags["governance.drift_flagged_batches"] == str(shifted_at)
    assert SHIFTED in run.data.tags[f"governance.drift_batch_{shifted_at}"] or run.data.tags[
        f"governance.drift_batch_{shifted_at}"]
    history = client.get_metric_history(run.info.run_id, "governance_drift_changed")
    assert sorted((m.step, m.value) for m in history) == [(i, float(i == shifted_at)) for i in range(10)]
    js = {m.step: m for m in client.get_metric_history(run.info.run_id, "governance_drift_js_divergence")}
    assert max(js, key=lambda s: js[s].value) == shifted_at
    assert js[3].timestamp == int(pd.Timestamp("2026-01-04T08:00:00Z").timestamp() * 1000)


def test_mlproject_monitor_entry_point(store: DriftStore, tmp_path: Path) -> None:
    """`mlflow run pipelines -e monitor` logs one more step into the version's monitoring run and
    points its own run at it."""
    import subprocess
    import sys

    import mlflow

    batch = tmp_path / "batch.parquet"
    store.std.transform(generate_loans(200, seed=500)).to_parquet(batch, index=False)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.tracking_uri, "MLFLOW_EXPERIMENT_ID": store.experiment_id,
           "PYTHONPATH": str(root), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(root / "pipelines"), "-e", "monitor",
                           "--env-manager", "local", "--experiment-id", store.experiment_id,
                           "-P", f"model_uri=models:/{NAME}@audited", "-P", f"data={batch}",
                           "-P", "batch_index=42", "-P", "batch_time=2026-02-01T00:00:00Z"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(store.tracking_uri)
    outer = client.search_runs([store.experiment_id], filter_string="tags.`governance.monitor_step` = '42'")
    assert len(outer) == 1
    monitor_run = outer[0].data.tags["governance.monitor_run_id"]
    steps = {m.step for m in client.get_metric_history(monitor_run, "governance_drift_changed")}
    assert 42 in steps
    assert client.get_run(monitor_run).data.tags["governance.monitor_model_version"] == f"{NAME}/1"


@pytest.mark.parametrize("setting, message", [
    ("drift.top_k=0", "drift.top_k: must be a positive integer"),
    ("drift.min_difference=2", "drift.min_difference: must be a number from 0 to 1"),
    ("drift.confidence=1.5", "drift.confidence: must be a number from 0.5 to below 1"),
    ("drift.nope=1", "drift: unknown key(s) ['nope']"),
])
def test_drift_thresholds_are_validated(setting: str, message: str) -> None:
    from governance.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        config_from_dict({}, settings=[setting])
    assert message in str(exc.value)


def test_monitor_needs_a_registered_version_with_an_explanation(store: DriftStore, tmp_path: Path) -> None:
    import mlflow

    batch = tmp_path / "b.parquet"
    store.valid.head(50).to_parquet(batch, index=False)
    # a version nobody explained (the monitor refuses before loading anything)
    bare = mlflow.MlflowClient().create_model_version(NAME, source=tmp_path.as_uri()).version
    for uri, says in ((f"runs:/{store.baseline_run}/model", "monitor needs a registered model version"),
                      (f"models:/{NAME}/{bare}", f"{NAME} version {bare} has no explanation")):
        res = _cli(["monitor", "--model-uri", uri, "--data", str(batch), "--quiet"])
        assert res.exit_code == 1, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    res = _cli(["monitor", "--model-uri", f"models:/{NAME}@audited", "--data", str(batch), "--batch-time", "yesterday"])
    assert res.exit_code == 1 and "--batch-time: 'yesterday' is not an ISO 8601 time" in res.stderr
