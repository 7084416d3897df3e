"""A real `mlflow server` for deployment tests: sqlite backend, proxied artifacts
(``--artifacts-destination``, so runs get ``mlflow-artifacts:/`` URIs), on a free loopback port.
Started in its own process group and stopped by its pid (the whole group: uvicorn workers and the
job runner are its children), also when the test fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def cli_env(tracking_uri: str, tmpdir: Path) -> dict[str, str]:
    """The environment of a command-line run against ``tracking_uri``: offline, no telemetry, this
    venv's commands first, a private temp dir (to see what a run leaves there), no inherited run."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true",
               HF_HUB_OFFLINE="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", TMPDIR=str(tmpdir),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(k, None)
    return env


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MlflowServer:
    """``with MlflowServer(root) as srv: srv.uri`` -- the tracking URI of a healthy server."""

    def __init__(self, root: Path, startup_timeout: float = 240.0) -> None:
        self.root = Path(root)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "server-tmp").mkdir(exist_ok=True)
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", TMPDIR=str(self.root / "server-tmp"))
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM the server's process group (its pid is the group id), then SIGKILL what remains."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if _alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 15
        while _alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        self.stopped_group = pgid

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
