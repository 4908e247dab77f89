"""Suite-wide fixtures: an isolated environment, and one real S3 API for the whole session.

``s3_server`` (session scope): moto's server on 127.0.0.1, an :class:`S3Server` with ``endpoint_url``, ``env``
(the ``AWS_*`` variables a client or subprocess needs — botocore's standard chain picks the endpoint up from
``AWS_ENDPOINT_URL_S3``) and ``make_bucket(name)``. ``s3_env`` (function scope) puts ``env`` into
``os.environ`` for one test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory):
    # MLflow, Ray and DeepSpeed write caches and stores to the working directory or $HOME by default.
    base = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        if "RAY_TMPDIR" not in os.environ:
            mp.setenv("RAY_TMPDIR", str(base / "ray"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


_WORLD_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    # An in-process train_loop starts a process group and exports MASTER_PORT etc.; left behind, the port is
    # inherited by every later torchrun/jobs.train subprocess (EADDRINUSE) and later tests see a live group.
    saved = {k: os.environ.get(k) for k in _WORLD_VARS}
    yield
    from pipeline import dist

    dist.cleanup()  # the group and DeepSpeed's clones of it
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for test servers and torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running moto S3 server; ``make_bucket`` returns ``s3://<name>`` (a fresh unique name by default)."""

    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, url: str) -> list[str]:
        """Object keys under ``s3://bucket/prefix``."""
        bucket, _, prefix = url[len("s3://") :].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from exc
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL_S3": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        yield S3Server(url, env)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
