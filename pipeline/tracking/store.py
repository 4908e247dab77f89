"""Where MLflow runs go, and MLflow's HTTP retry bounds — shared by the tracker, the registry and sweeps.

Resolution (:func:`resolve_tracking_uri`): ``tracking.uri`` if set, else ``MLFLOW_TRACKING_URI``, else the
project's one shared local store ``sqlite:///<root>/mlflow.db`` with artifacts in ``<root>/mlruns``, so runs
and the model registry live together. ``<root>`` is the repository holding this package (found from its
location), or ``MANGO_PROJECT_ROOT``. For any ``sqlite:`` store, new experiments put their artifacts in
``mlruns/<experiment>`` next to the database (MLflow's own default is ``./mlruns`` of whatever directory the
process happens to start in). Artifact stores on S3 go through a tracking server, or through
``MLFLOW_S3_ENDPOINT_URL`` and the usual ``AWS_*`` variables, none of which are ever logged.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

PROJECT_ROOT_ENV = "MANGO_PROJECT_ROOT"


def project_root() -> Path:
    """``MANGO_PROJECT_ROOT`` if set, else the repository that holds this package (has ``pyproject.toml``)."""
    if os.environ.get(PROJECT_ROOT_ENV):
        return Path(os.environ[PROJECT_ROOT_ENV]).expanduser().resolve()
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise RuntimeError(
            f"cannot find the project root above {Path(__file__).parent} (the package is not installed from a "
            f"checkout): set {PROJECT_ROOT_ENV}, MLFLOW_TRACKING_URI or tracking.uri"
        )
    return root


def default_tracking_uri() -> str:
    """``sqlite:///<project root>/mlflow.db`` — the shared local store."""
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str = "") -> str:
    """``uri`` if non-empty, else ``MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI", "") or default_tracking_uri()


def bound_http_retries(retries: int = 2, timeout_s: float = 10.0) -> None:
    """Bound MLflow's HTTP retries for this process (defaults: 7 retries with backoff, 120 s timeouts —
    minutes per request against a dead server). Sets, unless the user already did:
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=retries``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` (sleeps 0, 2, 4 s …),
    ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER=0.1`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=ceil(timeout_s)`` (seconds per
    connect/read). MLflow reads them on every request, so this works after MLflow is imported.
    """
    if not (0 <= retries <= 10):  # MLflow refuses more than 10
        raise ValueError(f"bound_http_retries: retries must be in [0, 10]; got {retries}")
    if timeout_s <= 0:
        raise ValueError(f"bound_http_retries: timeout_s must be > 0; got {timeout_s}")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts next to a ``sqlite:`` database).

    Safe when several processes (sweep trials) create it at once. Raises ``RuntimeError`` for a deleted one.
    """
    from mlflow.exceptions import MlflowException  # heavy: optional tracking dependency

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        uri = client.tracking_uri
        if uri.startswith("sqlite:///"):
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
            location = (Path(uri[len("sqlite:///") :]).parent / "mlruns" / safe).resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)  # another process created it first
    if exp.lifecycle_stage != "active":
        raise RuntimeError(
            f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore) or pick another "
            "tracking.experiment"
        )
    return exp.experiment_id


def client_for(tracking_uri: str = "") -> MlflowClient:
    """A client for the resolved store (registry = tracking store), with bounded HTTP retries."""
    from mlflow import MlflowClient  # heavy: optional tracking dependency

    bound_http_retries()
    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
