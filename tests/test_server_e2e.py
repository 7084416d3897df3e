"""End to end on a real deployment: `mlflow server` with a sqlite backend and proxied artifacts
(`--artifacts-destination`, `mlflow-artifacts:/` URIs) on a free loopback port, started and
stopped by pid. The bundled pipeline (`mlflow run pipelines --env-manager local`) and the five
commands (explain, report, card, verify, approve) run through it; nothing is left in the temp
directory; the server's processes are gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from mlflow_server import MlflowServer, _alive, cli_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "srv-credit"
# torch keeps its compile cache in the temp dir (shared by every torch program, not a run's leftover)
SHARED_CACHES = ("torchinductor_",)


def _run(cmd: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def approve_args(cli: str, env: dict, version: str) -> list[str]:
    """The sign-off command, in one place, with the approver's policy (the packaged ``default``)."""
    return ["approve", "--model-name", MODEL, "--version", version, "--approver", "A. Validator",
            "--role", "Independent validator", "--policy", "default"]


def _leftovers(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith(SHARED_CACHES))


@pytest.mark.slow
def test_pipeline_and_commands_on_a_tracking_server(tmp_path: Path, record_property) -> None:
    t0 = time.monotonic()
    work, tmpdir = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmpdir.mkdir()
    server = MlflowServer(tmp_path / "server")
    try:
        server.start()
        started = time.monotonic() - t0
        env = cli_env(server.uri, tmpdir)
        cli = str(BIN / "mlflow-governance")

        # the whole pipeline through the server, small: 1,500 training rows and three epochs;
        # 2,000 validation rows so the default policy's stability gate measures something
        _ok(_run([str(BIN / "mlflow"), "run", str(ROOT / "pipelines"), "--env-manager", "local",
                  "--experiment-name", "srv", "--storage-dir", str(work / "mlflow-run"),
                  "-P", "n_train=1500", "-P", "n_valid=2000", "-P", "epochs=3",
                  "-P", f"registered_model_name={MODEL}"], env, work, timeout=900))
        pipeline_s = time.monotonic() - t0 - started

        client = mlflow.MlflowClient(server.uri)
        exp = client.get_experiment_by_name("srv")
        assert exp.artifact_location.startswith("mlflow-artifacts:/")
        runs = client.search_runs([exp.experiment_id])
        by_entry = {r.data.tags.get("mlflow.project.entryPoint"): r for r in runs}
        # one run per step, no extra run for the report (it is logged into the explain run)
        assert sorted(by_entry) == ["explain", "main", "train", "validate"] and len(runs) == 4
        assert all(r.info.status == "FINISHED" for r in runs)
        main, train, explain = by_entry["main"], by_entry["train"], by_entry["explain"]
        assert all(by_entry[s].data.tags["mlflow.parentRunId"] == main.info.run_id
                   for s in ("train", "validate", "explain"))
        assert explain.data.tags["governance.status"] == "reported"
        sources = {d.dataset.name: (d.dataset.source_type, json.loads(d.dataset.source))
                   for d in train.inputs.dataset_inputs}
        valid_uri = sources["validation"][1]["uri"]
        assert sources["validation"][0] == "mlflow_artifact" and valid_uri.startswith("mlflow-artifacts:/")
        assert explain.data.tags["governance.contract_source"].startswith("training data 'train'")

        # the five commands, --data as a proxied artifact URI
        out = _ok(_run([cli, "explain", "--model-uri", f"models:/{MODEL}/1", "--data", valid_uri,
                        "--target-column", "default", "--config", str(ROOT / "pipelines" / "governance.yaml"),
                        "--experiment-name", "srv-cli", "--quiet"], env, work))
        rid = out.strip().splitlines()[-1]
        run = client.get_run(rid)
        assert run.data.tags["governance.status"] == "explained" and run.info.status == "FINISHED"
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["validation"]
        _ok(_run([cli, "report", "--run-id", rid], env, work))
        assert client.get_run(rid).data.tags["governance.status"] == "reported"
        card = _ok(_run([cli, "card", "--model-uri", f"models:/{MODEL}/1", "--run-id", rid,
                         "--output-dir", str(work / "card")], env, work))
        assert any(Path(line).suffix == ".md" and Path(line).is_file() for line in card.split())
        assert "OK" in _run([cli, "verify", "--run-id", rid], env, work).stdout
        approved = _run([cli, *approve_args(cli, env, "1")], env, work)
        _ok(approved)
        mv = client.get_model_version(MODEL, "1")
        assert mv.tags["governance.approval_decision"] == "approve" and "audited" in mv.aliases
        total = time.monotonic() - t0
    finally:
        server.stop()
    assert not _alive(server.stopped_group), "mlflow server processes left running"
    assert _leftovers(tmpdir) == []
    timings = {"server_start_s": round(started, 1), "pipeline_s": round(pipeline_s, 1), "total_s": round(total, 1)}
    print("\nserver e2e timings:", timings)
    for k, v in timings.items():
        record_property(k, v)
