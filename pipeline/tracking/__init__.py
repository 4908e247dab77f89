"""Run tracking on rank 0: MLflow (never blocking training) and a server-free ``metrics.jsonl``."""

from .metrics_log import MetricsLog, plot_metrics, read_metrics
from .mlflow_tracker import MlflowTracker, TrackerStats
from .redaction import is_secret_key, redact_params
from .store import bound_http_retries, default_tracking_uri, ensure_experiment, project_root, resolve_tracking_uri

__all__ = [
    "MetricsLog",
    "MlflowTracker",
    "TrackerStats",
    "bound_http_retries",
    "default_tracking_uri",
    "ensure_experiment",
    "is_secret_key",
    "plot_metrics",
    "project_root",
    "read_metrics",
    "redact_params",
    "resolve_tracking_uri",
]
