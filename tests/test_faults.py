"""Faults of the explanation stage, reproduced for real against a real MLflow store: a real
`mlflow-governance explain` process sent SIGTERM / SIGINT / SIGKILL while it explains, a crash
inside the stage, `--run-id` into a run that holds evidence or that a dead process was working
in, folders a killed process left behind, and errors that must stay one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from explain_fixtures import MODEL_NAME, artifact_paths
from governance import tracking
from governance.cli import main as cli
from governance.owner import Owner
from governance.workdirs import MARKER, clean_stale, make_owned_dir

CLI = str(Path(sys.executable).parent / "mlflow-governance")
FAST = ["--modes", "signed", "--set", "quality.enabled=false", "--set", "aggregation.n_bootstrap=20", "--quiet"]
OWNER_TAGS = set(tracking.OWNER_TAGS.values())


# ----------------------------------------------------------------------------- helpers


def _data(store, tmp_path: Path, copies: int = 1, name: str = "v.parquet") -> Path:
    """The validation table, ``copies`` times over (a longer run to interrupt)."""
    df = pd.read_parquet(store.validation_parquet)
    path = tmp_path / name
    pd.concat([df] * copies, ignore_index=True).to_parquet(path, index=False)
    return path


def _env(store, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env.update(MLFLOW_TRACKING_URI=store.tracking_uri, MLFLOW_EXPERIMENT_ID=store.experiment_id, TMPDIR=str(tmp),
               MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_GOVERNANCE_DEBUG", None)
    return env


def _explain_args(data: Path, *extra: str) -> list[str]:
    return [CLI, "explain", "--model-uri", f"models:/{MODEL_NAME}/1", "--data", str(data),
            "--target-column", "default", *FAST, *extra]


def _stages(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("governance-stage-*"))


def _owned(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.glob("governance-*") if (p / MARKER).exists())


def _claimed_run(experiment_id: str, pid: int) -> str | None:
    runs = mlflow.MlflowClient().search_runs([experiment_id], f"tags.`governance.owner_pid` = '{pid}'")
    return runs[0].info.run_id if runs else None


def _default_sigint() -> None:
    """In the child: SIGINT back to its default. A test suite started in the background by a
    non-interactive shell (``pytest ... &``) runs with SIGINT ignored, and its children inherit
    that; a process that ignores SIGINT rightly keeps ignoring it (explain leaves such a
    disposition alone), which is not what the SIGINT test is about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_explaining(store, tmp: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start `mlflow-governance explain` and wait (polling) until it has claimed its run and
    written explanation batches into its staging folder; returns the process and its run."""
    proc = subprocess.Popen(_explain_args(data, "--batch-size", "1", *extra), env=_env(store, tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 240
    rid = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"explain ended before it could be interrupted (rc {proc.returncode}): {err[-2000:]}")
        rid = rid or _claimed_run(store.experiment_id, proc.pid)
        written = [f for s in _stages(tmp) for f in (s / "governance" / "explanations").glob("*.parquet")]
        if rid and written:
            return proc, rid
        time.sleep(0.2)
    proc.kill()
    pytest.fail("explain did not start explaining within 240 s")


def _run(rid: str):
    return mlflow.MlflowClient().get_run(rid)


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_explaining_fails_the_run_and_leaves_no_staging(credit_store, tmp_path: Path, signum) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    data = _data(credit_store, tmp_path, copies=10)
    proc, rid = _start_explaining(credit_store, tmp, data)
    assert _run(rid).info.status == "RUNNING" and _stages(tmp)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert lines[-1] == (f"error: interrupted by {signal.Signals(signum).name}, stopped: run {rid} is tagged "
                         "governance.status=failed and the staging folders were removed")
    assert out.strip() == ""  # no run id printed: nothing to hand to the next step
    run = _run(rid)
    assert run.info.status == "FAILED" and run.data.tags["governance.status"] == "failed"
    assert not OWNER_TAGS & set(run.data.tags)
    assert not [p for p in artifact_paths(rid) if p.startswith("governance/explanations/")]
    assert _owned(tmp) == []  # staging, model and data folders all removed


def test_sigkill_leaves_what_the_next_start_cleans_and_refuses(credit_store, tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the staging folder stays and the run stays RUNNING. The next
    start removes the folder (its owner is gone) and refuses the run (marking it FAILED, as this
    tool created it); a folder the tool did not make, or one whose owner lives, is kept."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    data = _data(credit_store, tmp_path, copies=10)
    foreign = tmp / "governance-not-ours"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("someone else's")
    proc, rid = _start_explaining(credit_store, tmp, data)
    proc.kill()
    proc.communicate(timeout=60)
    left = _stages(tmp)
    assert left and _run(rid).info.status == "RUNNING"  # what SIGKILL leaves

    small = _data(credit_store, tmp_path, name="small.parquet")
    res = subprocess.run(_explain_args(small, "--run-id", rid), env=_env(credit_store, tmp),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: run {rid} was being explained by an mlflow-governance process that is gone "
                     f"(pid {proc.pid} on host {Owner.current().host}, killed?), so its evidence is incomplete "
                     "(this tool created it: now marked FAILED): explain into a new run (leave out --run-id "
                     "and MLFLOW_RUN_ID)"]
    assert all(f"note: removed {p}, left by an mlflow-governance process that is gone" in res.stderr for p in left)
    assert not any(p.exists() for p in left) and _owned(tmp) == []
    assert (foreign / "keep.txt").read_text() == "someone else's"
    run = _run(rid)
    assert run.info.status == "FAILED" and run.data.tags["governance.status"] == "failed"
    assert not [p for p in artifact_paths(rid) if p.startswith("governance/explanations/")]


def test_stale_folders_only_ours_and_only_when_the_owner_is_gone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    code = "from governance.workdirs import make_owned_dir; print(make_owned_dir('governance-stage-'))"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    dead = Path(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               check=True).stdout.strip())
    alive = subprocess.Popen([sys.executable, "-c", code + "; import sys, time; sys.stdout.flush(); time.sleep(600)"],
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        living = Path(alive.stdout.readline().strip())
        mine = make_owned_dir("governance-stage-")
        reused = make_owned_dir("governance-stage-")  # this pid, but another process started it: dead
        marker = json.loads((reused / MARKER).read_text())
        (reused / MARKER).write_text(json.dumps({**marker, "start": "another-boot:1"}))
        other_host = make_owned_dir("governance-stage-")
        (other_host / MARKER).write_text(json.dumps({**marker, "host": "elsewhere.example", "pid": 1}))
        not_tool = make_owned_dir("governance-stage-")
        (not_tool / MARKER).write_text(json.dumps({**marker, "tool": "something-else", "pid": 999999999}))
        unmarked = tmp_path / "governance-stage-unmarked"
        unmarked.mkdir()
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        (outside / MARKER).write_text((dead / MARKER).read_text())  # a marker, but not our name
        link = tmp_path / "governance-stage-link"
        link.symlink_to(dead)
        assert sorted(clean_stale()) == sorted([dead, reused])
        assert not dead.exists() and not reused.exists()
        for kept in (living, mine, other_host, not_tool, unmarked, outside):
            assert kept.is_dir(), kept
        assert link.is_symlink()
    finally:
        alive.kill()
        alive.communicate()
    assert clean_stale() == [living]


# ----------------------------------------------------------------------------- --run-id


def test_run_id_into_a_run_with_evidence_is_refused_and_left_as_it_was(credit_store, tmp_path: Path) -> None:
    first = _data(credit_store, tmp_path)
    res = CliRunner().invoke(cli, _explain_args(first)[1:])
    assert res.exit_code == 0, res.output
    rid = res.stdout.strip().splitlines()[-1]
    before = artifact_paths(rid), _run(rid).data.tags, len(_run(rid).inputs.dataset_inputs)
    other = tmp_path / "other.parquet"
    pd.read_parquet(first).iloc[::-1].head(300).to_parquet(other, index=False)
    expected = (f"error: run {rid} already holds governance evidence (governance.status=explained): explain into a "
                "new run (leave out --run-id and MLFLOW_RUN_ID) rather than mixing two datasets in one run\n")
    res = CliRunner().invoke(cli, _explain_args(other, "--run-id", rid)[1:])
    assert res.exit_code == 1 and res.output == expected
    os.environ["MLFLOW_RUN_ID"] = rid
    try:
        res = CliRunner().invoke(cli, _explain_args(other)[1:])
    finally:
        del os.environ["MLFLOW_RUN_ID"]
    assert res.exit_code == 1 and res.output == expected
    after = artifact_paths(rid), _run(rid).data.tags, len(_run(rid).inputs.dataset_inputs)
    assert after == before  # nothing logged, no tag changed, no second dataset


def test_run_id_refusals_name_the_reason(credit_store, tmp_path: Path) -> None:
    """Artifacts under governance/ without a status; a failed attempt; a live claim; another host."""
    data = _data(credit_store, tmp_path)
    client = mlflow.MlflowClient()

    def refused(rid: str) -> str:
        res = CliRunner().invoke(cli, _explain_args(data, "--run-id", rid)[1:])
        assert res.exit_code == 1, res.output
        assert len(res.output.strip().splitlines()) == 1
        return res.output

    with mlflow.start_run(experiment_id=credit_store.experiment_id) as run:
        mlflow.log_text("x", "governance/data_quality/validation_result.json")
    assert "already holds governance evidence (artifacts under governance/)" in refused(run.info.run_id)

    failed = client.create_run(credit_store.experiment_id).info.run_id
    tracking.set_tags(failed, {"status": "failed"})
    assert "holds a failed governance attempt (governance.status=failed)" in refused(failed)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = Owner.of(sleeper.pid)
        busy = client.create_run(credit_store.experiment_id).info.run_id
        tracking.set_tags(busy, {k: getattr(live, f) for f, k in tracking.OWNER_TAGS.items()})
        assert f"is in use by another mlflow-governance process (pid {sleeper.pid} on host" in refused(busy)
        assert _run(busy).info.status == "RUNNING"  # a live owner's run is not touched
    finally:
        sleeper.kill()
        sleeper.communicate()

    remote = client.create_run(credit_store.experiment_id).info.run_id
    tracking.set_tags(remote, {"owner_host": "elsewhere.example", "owner_pid": 12, "owner_start": "b:1"})
    assert "on another host (pid 12 on host elsewhere.example) that cannot be checked" in refused(remote)
    for rid in (run.info.run_id, failed, remote):
        assert not [p for p in artifact_paths(rid) if p.startswith("governance/explanations/")]


def test_a_running_run_someone_else_created_is_used_and_released(credit_store, tmp_path: Path) -> None:
    """A notebook's active run (or `mlflow run`'s, through MLFLOW_RUN_ID): RUNNING, no claim."""
    from governance.pipeline import explain_model

    data = _data(credit_store, tmp_path)
    with mlflow.start_run(experiment_id=credit_store.experiment_id) as run:
        res = explain_model(f"models:/{MODEL_NAME}/1", data, target_column="default", modes="signed", quiet=True,
                            config={"quality": {"enabled": False}, "aggregation": {"n_bootstrap": 20}})
        assert res.run_id == run.info.run_id
        live = _run(run.info.run_id)
        assert live.info.status == "RUNNING" and live.data.tags["governance.status"] == "explained"
        assert not OWNER_TAGS & set(live.data.tags)  # the claim ends with the stage
    assert _run(run.info.run_id).info.status == "FINISHED"  # ended by its creator, not the stage


# ----------------------------------------------------------------------------- exceptions


def test_a_crash_inside_the_stage_fails_the_run_and_removes_staging(credit_store, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import tempfile

    from governance import pipeline

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_plots", disk_full)
    with pytest.raises(OSError, match="No space left"):
        pipeline.explain_model(f"models:/{MODEL_NAME}/1", _data(credit_store, tmp_path), target_column="default",
                               modes="signed", quiet=True, experiment_name="faults-crash",
                               config={"quality": {"enabled": False}, "aggregation": {"n_bootstrap": 20}})
    exp = mlflow.MlflowClient().get_experiment_by_name("faults-crash")
    (run,) = mlflow.MlflowClient().search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["governance.status"] == "failed"
    assert not OWNER_TAGS & set(run.data.tags)
    assert not [p for p in artifact_paths(run.info.run_id) if p.startswith("governance/explanations/")]
    assert _owned(tmp_path / "tmp") == []


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path: Path) -> None:
    """A real process: the group turns a bug into one line (exit 1); --debug shows the traceback."""
    code = ("import sys, click; from governance.cli import main\n"
            "@main.command('boom')\n"
            "def boom():\n"
            "    raise KeyError('columns')\n"
            "sys.argv[0] = 'mlflow-governance'; main()\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_GOVERNANCE_DEBUG"}
    res = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, env=env)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: unexpected KeyError: 'columns' (a bug: rerun with --debug or MLFLOW_GOVERNANCE_DEBUG=1 for the "
        "traceback and report it)"]
    res = subprocess.run([sys.executable, "-c", code, "--debug", "boom"], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and "Traceback" in res.stderr and res.stderr.strip().endswith("report it)")


def test_unknown_run_id_is_one_line(credit_store, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, _explain_args(_data(credit_store, tmp_path), "--run-id", "0" * 32)[1:])
    assert res.exit_code == 1
    assert res.output.startswith(f"error: --run-id {'0' * 32}: no such run at ")
    assert res.output.strip().endswith("leave out --run-id to log into a new run")
    assert len(res.output.strip().splitlines()) == 1


def test_a_second_signal_during_clean_up_ends_the_process_and_own_handlers_are_kept() -> None:
    """Real signals in a real process: the first raises Interrupted (exit code 143), a second one
    while cleaning up ends the process the default way; a handler the program set is not replaced
    and every handler is restored on leaving."""
    code = ("import signal\n"
            "from governance.signals import Interrupted, interruptible\n"
            "seen = []\n"
            "signal.signal(signal.SIGHUP, lambda s, f: seen.append(s))\n"
            "with interruptible():\n"
            "    signal.raise_signal(signal.SIGHUP)\n"
            "    print('own handler kept', seen == [signal.SIGHUP], flush=True)\n"
            "print('restored', signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)\n"
            "with interruptible():\n"
            "    try:\n"
            "        signal.raise_signal(signal.SIGTERM)\n"
            "    except Interrupted as exc:\n"
            "        print('first', exc.name, exc.exit_code, flush=True)\n"
            "        signal.raise_signal(signal.SIGTERM)\n"
            "        print('survived the second', flush=True)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGTERM, res.stderr
    assert res.stdout.splitlines() == ["own handler kept True", "restored True", "first SIGTERM 143"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(credit_store, tmp_path: Path) -> None:
    """The command loads the model before the stage runs: the device is checked there."""
    res = CliRunner().invoke(cli, _explain_args(_data(credit_store, tmp_path), "--device", "cuda")[1:])
    assert res.exit_code == 1
    assert res.output == "error: device 'cuda' was asked for but torch sees no CUDA device; use --device cpu\n"
