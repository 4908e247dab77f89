"""Suite-wide settings: keep every test's temporary state out of the repository and the user's home."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory):
    # MLflow, Ray and DeepSpeed write caches and stores to the working directory or $HOME by default.
    base = tmp_path_factory.mktemp("env")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RAY_TMPDIR")}
    os.environ.setdefault("RAY_TMPDIR", str(base / "ray"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
