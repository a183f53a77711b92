"""Real servers for tests, on 127.0.0.1 and free ports: `mlflow server` and `prefect server start` (the command
and settings `make serve` starts it with: flows.deploy).

Each is a context manager that starts the server as a subprocess, waits for its health endpoint,
yields its URL and terminates it (the whole process group) on exit. The server's own log is kept in a
file and shown when it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.deploy import server_command, server_settings

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the server's log if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def background(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own process group, output to `log`; on exit SIGTERM the group, then SIGKILL."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class MlflowServer:
    url: str
    db: Path
    artifacts: Path
    proc: subprocess.Popen


_migrated: Path | None = None


def _migrated_db(workdir: Path) -> Path:
    """An empty MLflow database with the schema already created (creating it takes seconds), made once
    per test session and copied for each server."""
    global _migrated
    if _migrated is None or not _migrated.is_file():
        from mlflow.tracking import MlflowClient

        _migrated = workdir / "template-mlflow.db"
        MlflowClient(f"sqlite:///{_migrated}").search_experiments()  # runs the migrations
    return _migrated


@contextlib.contextmanager
def mlflow_server(workdir: Path, env: dict | None = None) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact root (proxied artifacts)."""
    workdir.mkdir(parents=True, exist_ok=True)
    db, artifacts, port = workdir / "mlflow.db", workdir / "mlartifacts", free_port()
    shutil.copyfile(_migrated_db(workdir), db)
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts),
    ]
    env = {**os.environ, **(env or {}), "MLFLOW_DISABLE_TELEMETRY": "true"}
    with background(cmd, workdir / "mlflow-server.log", env=env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, workdir / "mlflow-server.log", timeout=120)
        yield MlflowServer(url=url, db=db, artifacts=artifacts, proc=proc)


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        """What a client process needs to talk to this server (and nothing of the test session's harness)."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home)}


@contextlib.contextmanager
def prefect_server(workdir: Path, env: dict | None = None) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1 as `make serve` starts it (CSRF protection on, CORS for its own origin:
    flows.deploy.server_settings), without the UI, with its own PREFECT_HOME (SQLite database inside), scheduler on.

    env: extra server settings, e.g. {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}.
    """
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_URL": "",
        **(env or {}),
        **server_settings(port),
    }
    cmd = [*server_command(port), "--no-ui"]
    log = workdir / "prefect-server.log"
    with background(cmd, log, env=env) as proc:
        api = f"http://127.0.0.1:{port}/api"
        wait_http(f"{api}/health", proc, log, timeout=180)
        yield PrefectServer(api_url=api, home=home, proc=proc)
