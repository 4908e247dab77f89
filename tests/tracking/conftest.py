"""Real ``mlflow server`` processes for tracking and registry tests.

``mlflow_server`` (session scope) is one server shared by every test that asks for it: a sqlite backend in
a temporary directory, proxied artifacts (``--serve-artifacts``), 127.0.0.1 on a free port. It yields the
tracking URI (``http://127.0.0.1:<port>``). Starting one takes ~10 s on 2 cores, so tests that need to
*kill* a server use ``mlflow_server_factory`` to start their own instead of killing the shared one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

_HTTP_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)
_STARTUP_S = 120.0


@dataclass
class MlflowServer:
    """A running ``mlflow server``; ``kill`` ends it (and its uvicorn child) at once, like a crash."""

    uri: str
    root: Path
    proc: subprocess.Popen

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the group is the server and its workers
        self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def start_mlflow_server(root: Path) -> MlflowServer:
    """Start a server storing everything under ``root``; returns once ``/health`` answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job runner forks workers we do not use
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", root, proc)
    deadline = time.monotonic() + _STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"mlflow server did not answer within {_STARTUP_S:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URI of one real ``mlflow server`` shared by the whole session."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server.uri
    server.kill()


@pytest.fixture
def mlflow_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], MlflowServer]]:
    """Start private servers (for tests that kill them); all are killed at teardown."""
    servers: list[MlflowServer] = []

    def start() -> MlflowServer:
        servers.append(start_mlflow_server(tmp_path_factory.mktemp("mlflow-private")))
        return servers[-1]

    yield start
    for server in servers:
        server.kill()


@pytest.fixture(autouse=True)
def _restore_mlflow_http_env() -> Iterator[None]:
    # the tracker bounds MLflow's HTTP retries process-wide (setdefault); undo it between tests
    saved = {k: os.environ.get(k) for k in _HTTP_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
