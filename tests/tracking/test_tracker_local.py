"""MlflowTracker against a local sqlite store, the secret filter, and metrics.jsonl + its plot."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import flatten, load_config, save_resolved
from pipeline.tracking import (
    MetricsLog,
    MlflowTracker,
    bound_http_retries,
    default_tracking_uri,
    is_secret_key,
    plot_metrics,
    read_metrics,
    redact_params,
    resolve_tracking_uri,
)

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "abc/def",
    "AWS_ACCESS_KEY_ID": "AKIAABCDEFGHIJKLMNOP",
    "aws.region": "eu-west-1",
    "env.HF_TOKEN": "hf_xxx",
    "db_password": "hunter2",
    "github.personalAccessToken": "ghp_x",
    "service.api_key": "k",
    "storage.key": "k",
    "model.access_key": "k",
    "auth_header": "Bearer x",
    "client_secret": "s",
}
NOT_SECRETS = {
    "model.tokens": "0",
    "model.key_dim": "64",
    "model.key": "q",
    "optim.lr": "0.001",
    "data.shards": "s3://bucket/shards",
    "tracking.uri": "http://host:5000",
    "eval.metric": "val_bits_per_dim",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables costs seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _wait_sent(tracker: MlflowTracker, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while tracker.stats.sent < n and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("key", sorted(SECRETS))
def test_secret_keys_are_recognised(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", sorted(NOT_SECRETS))
def test_hyperparameters_are_not_secrets(key):
    assert not is_secret_key(key)


def test_redact_params_drops_secrets_and_url_passwords():
    out = redact_params(
        {
            **SECRETS,
            **NOT_SECRETS,
            "tracking.uri": "https://alice:s3cr3t@mlflow.example/x",
            "note": "AKIAABCDEFGHIJKLMNOP leaked",
            "long": "x" * 7000,
        }
    )
    assert not set(SECRETS) & set(out)
    assert "note" not in out
    assert out["tracking.uri"] == "https://***@mlflow.example/x"
    assert len(out["long"]) == 6000
    # every field of the real config survives: the typed config holds no secrets
    assert set(flatten(load_config(None, []))) <= set(redact_params(flatten(load_config(None, []))))


def test_default_store_is_one_sqlite_db_at_the_project_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MANGO_PROJECT_ROOT", str(tmp_path))
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("") == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert resolve_tracking_uri("") == "http://elsewhere:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("MANGO_PROJECT_ROOT")
    assert (Path(default_tracking_uri().removeprefix("sqlite:///")).parent / "pyproject.toml").is_file()


def test_bound_http_retries_sets_defaults_but_respects_the_user(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    bound_http_retries(retries=2, timeout_s=3.5)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "4"
    with pytest.raises(ValueError, match="retries"):
        bound_http_retries(retries=11)


def test_run_lands_in_local_store_with_params_metrics_tags_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MANGO_TEST_TOKEN", "must-not-leak")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["run.name=local", f"run.dir={tmp_path / 'run'}"])
    yaml_path = save_resolved(cfg, tmp_path / "run" / "config.yaml")
    jsonl = MetricsLog(tmp_path / "run" / "metrics.jsonl")

    tracker = MlflowTracker("local-exp", uri=uri, log_every=5)
    run_id = tracker.start("local", tags={"data.manifest_sha256": "ab12"})
    assert run_id
    tracker.log_config(cfg, yaml_path)
    tracker.log_params({**SECRETS, "env.MANGO_TEST_TOKEN": "must-not-leak"})
    for step in range(20):
        m = {"loss": 2.0 / (step + 1), "bits_per_dim": 4.0 / (step + 1)}
        tracker.log_metrics(m, step)
        jsonl.log(step, m)
    tracker.log_metrics({"val_bits_per_dim": 1.5}, 19, force=True)
    jsonl.log(19, {"val_bits_per_dim": 1.5})
    tracker.set_tags({"phase": "done"})
    tracker.log_metrics_plot(jsonl.path, tmp_path / "run" / "plot.png")
    stats = tracker.close()
    assert stats.dropped == 0

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: v for k, v in flatten(cfg).items()}
    assert not set(SECRETS) & set(run.data.params)
    assert "must-not-leak" not in json.dumps(run.data.params)
    assert run.data.tags["data.manifest_sha256"] == "ab12" and run.data.tags["phase"] == "done"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 5, 10, 15]
    assert client.get_metric_history(run_id, "val_bits_per_dim")[0].value == 1.5
    artifacts = {a.path for d in ("config", "plots") for a in client.list_artifacts(run_id, d)}
    assert artifacts == {"config/config.yaml", "plots/plot.png"}
    # artifacts sit next to the database, not in whatever directory the process started in
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns" / "local-exp").as_uri())
    back = Path(client.download_artifacts(run_id, "config/config.yaml", str(tmp_path / "dl")))
    assert back.read_text() == yaml_path.read_text()


def test_resume_and_nested_runs(store):
    uri = store
    parent = MlflowTracker("sweep", uri=uri)
    parent_id = parent.start("sweep")
    child = MlflowTracker("sweep", uri=uri)
    child_id = child.start("trial-0", parent_run_id=parent_id)
    child.log_params({"optim.lr": "0.001", "checkpoint.resume": ""})
    child.log_params({"optim.lr": "0.001"})  # same value again: a no-op
    with pytest.raises(ValueError, match="already logged"):
        child.log_params({"optim.lr": "0.1"})
    child.log_metrics({"loss": 1.0}, 0)
    child.close("KILLED")
    parent.close()

    resumed = MlflowTracker("sweep", uri=uri)
    assert resumed.start(run_id=child_id) == child_id
    resumed.log_params({"optim.lr": "0.001", "checkpoint.resume": "latest", "train.max_steps": "10"})
    resumed.log_metrics({"loss": 0.5}, 1)
    assert resumed.close().dropped == 0

    client = MlflowClient(uri)
    run = client.get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.001", "checkpoint.resume": "", "train.max_steps": "10"}
    assert [m.value for m in client.get_metric_history(child_id, "loss")] == [1.0, 0.5]


def test_resuming_a_run_the_store_does_not_know_starts_a_new_one(store, caplog):
    caplog.set_level(logging.WARNING)
    tracker = MlflowTracker("moved", uri=store)
    new_id = tracker.start("moved", run_id="0" * 32)
    tracker.close()
    assert new_id and new_id != "0" * 32
    assert MlflowClient(store).get_run(new_id).data.tags["mango.resumed_from"] == "0" * 32
    assert [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]


def test_full_queue_drops_the_oldest_and_counts(store):
    tracker = MlflowTracker("q", uri=store, queue_size=10)
    run_id = tracker.start("q")
    # holding the queue's (re-entrant) lock stalls the sender, as a slow server would
    with tracker._cond:
        for step in range(25):
            tracker.log_metrics({"loss": float(step)}, step)
        assert len(tracker._queue) == 10
    stats = tracker.close()
    assert stats.dropped_full == 15 and stats.sent == 11  # 10 metrics + the end of the run
    steps = [m.step for m in MlflowClient(tracker.uri).get_metric_history(run_id, "loss")]
    assert steps == list(range(15, 25))


def test_bad_inputs_are_clear_errors(store, tmp_path):
    tracker = MlflowTracker("bad", uri=store)
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"loss": 1.0}, 0)
    tracker.start("bad")
    with pytest.raises(ValueError, match="real number"):
        tracker.log_metrics({"loss": "high"}, 0)
    with pytest.raises(ValueError, match="not accepted"):
        tracker.log_metrics({"bad|name": 1.0}, 0)
    with pytest.raises(ValueError, match="non-negative"):
        tracker.log_metrics({"loss": 1.0}, -1)
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="status"):
        tracker.close("DONE")
    tracker.close()
    with pytest.raises(ValueError, match="experiment"):
        MlflowTracker("")
    with pytest.raises(ValueError, match="queue_size"):
        MlflowTracker("x", uri="sqlite:///x.db", queue_size=0)


def test_metrics_log_appends_json_lines_and_truncates_on_resume(tmp_path):
    import torch

    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    for step in range(5):
        log.log(step, {"loss": torch.tensor(1.0 / (step + 1)), "bits_per_dim": float("nan") if step == 2 else 3.0})
    records = read_metrics(log.path)
    assert [r["step"] for r in records] == list(range(5))
    assert records[2]["bits_per_dim"] is None and records[0]["loss"] == 1.0
    assert all(isinstance(r["time"], float) for r in records)
    assert log.truncate_after(2) == 2
    assert [r["step"] for r in read_metrics(log.path)] == [0, 1, 2]
    with log.path.open("a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    assert [r["step"] for r in read_metrics(log.path)] == [0, 1, 2]
    with pytest.raises(ValueError, match="step"):
        log.log(-1, {})
    with pytest.raises(ValueError, match="number"):
        log.log(6, {"loss": [1.0]})


def test_plot_renders_a_png_from_metrics_jsonl(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(0, 50, 5):
        log.log(step, {"loss": 5.0 - step / 20, "bits_per_dim": 6.0 - step / 20})
    log.log(49, {"val_bits_per_dim": 3.8})
    png = plot_metrics(log.path, tmp_path / "plots" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    empty = MetricsLog(tmp_path / "other.jsonl")
    empty.log(0, {"lr": 0.1})
    with pytest.raises(ValueError, match="no values"):
        plot_metrics(empty.path, tmp_path / "x.png")


def test_logging_is_quiet_on_a_healthy_store(store, caplog):
    caplog.set_level(logging.WARNING)
    tracker = MlflowTracker("quiet", uri=store)
    tracker.start("quiet")
    tracker.log_metrics({"loss": 1.0}, 0)
    _wait_sent(tracker, 1)
    tracker.close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_refusals_by_a_live_store_drop_only_their_batch_and_warn_once(store, caplog):
    caplog.set_level(logging.DEBUG)
    tracker = MlflowTracker("refused", uri=store)
    run_id = tracker.start("refused")
    tracker.log_metrics({"loss": 1.0}, 0)
    _wait_sent(tracker, 1)
    MlflowClient(store).delete_run(run_id)  # a deleted run refuses further writes (INVALID_PARAMETER_VALUE)
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0}, step)
        time.sleep(0.2)  # one batch each
    stats = tracker.close()
    assert stats.sent == 1 and stats.rejected == 4  # three metric batches and the end of the run
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "refused" in warnings[0] and "active" in warnings[0], warnings
